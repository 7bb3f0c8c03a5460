//! Who the peer is after a TLS handshake, and the patterns that authorise it per export.
//!
//! # Rendering of a certificate subject (stable; patterns are compared against it)
//!
//! RFC 4514 style: the relative distinguished names (RDNs) in *reverse* order of their
//! encoding (most specific first, e.g. `CN=alice,O=Example,C=GB` for a certificate whose
//! subject is encoded as C, O, CN), separated by `,` with no spaces; the attribute-value pairs
//! of a multi-valued RDN are joined with `+` in encoding order. Attribute types use the short
//! names `CN L ST O OU C STREET DC UID` of RFC 4514 plus `emailAddress`, `serialNumber`,
//! `title`, `SN`, `GN`; any other type is its dotted OID. String values are escaped as RFC 4514
//! §2.4 says (`\,` `\+` `\"` `\\` `\<` `\>` `\;`, a leading `#` or space, a trailing space,
//! NUL as `\00`); BMPString values are decoded from UTF-16; any other non-string value is `#`
//! followed by the lowercase hex of its content bytes.
//!
//! Subject alternative names render as `DNS:name`, `IP:address` (std formatting, so IPv6 is
//! compressed), `EMAIL:address` and `URI:uri`; other SAN kinds are not rendered.
//!
//! # Patterns ([`IdentityPattern`])
//!
//! * `CN=alice`: a single `CN` component matches when any CN of the subject equals `alice`.
//! * `CN=alice,O=Example`: any other distinguished name matches the whole subject: the same
//!   RDNs in the same order. Attribute types compare case-insensitively (`cn=` = `CN=`,
//!   `E=`/`EMAIL=` = `emailAddress=`), values exactly; spaces around `,` `+` `=` are ignored.
//! * `DNS:host.example` (case-insensitive; a leading `*.` stands for one label),
//!   `IP:10.0.0.1` (compared as addresses), `EMAIL:a@b` (exact), `URI:spiffe://…` (exact)
//!   match a subject alternative name.
//! * `PSK:alice` matches the PSK identity of a pre-shared-key session.
//!
//! The prefixes are case-insensitive. A malformed pattern is an error from
//! [`IdentityPattern::parse`], so configuration can reject it at load time.

use std::fmt::Write as _;
use std::net::IpAddr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

use super::TlsError;

/// The authenticated peer of a TLS session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The client certificate's subject, rendered as described in the module docs.
    pub subject: Option<String>,
    /// The client certificate's subject alternative names (`DNS:…`, `IP:…`, `EMAIL:…`,
    /// `URI:…`).
    pub sans: Vec<String>,
    /// The PSK identity (user name) of a pre-shared-key session.
    pub psk_user: Option<String>,
}

impl Identity {
    /// The identity of a client certificate (DER).
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity, TlsError> {
        let (_, certificate) = X509Certificate::from_der(der)
            .map_err(|error| TlsError::Protocol(format!("unparsable peer certificate: {error}")))?;
        let mut sans = Vec::new();
        if let Ok(Some(extension)) = certificate.subject_alternative_name() {
            for name in &extension.value.general_names {
                if let Some(rendered) = render_general_name(name) {
                    sans.push(rendered);
                }
            }
        }
        Ok(Identity {
            subject: Some(render_name(certificate.subject())),
            sans,
            psk_user: None,
        })
    }

    /// The identity of a PSK session.
    pub fn from_psk_user(user: &str) -> Identity {
        Identity {
            psk_user: Some(user.to_string()),
            ..Identity::default()
        }
    }

    /// Whether `pattern` (see the module docs) matches; a malformed pattern matches nothing.
    pub fn matches(&self, pattern: &str) -> bool {
        IdentityPattern::parse(pattern).is_ok_and(|pattern| pattern.matches(self))
    }

    /// One short phrase for logs: `x509 CN=…` or `psk alice`.
    pub fn describe(&self) -> String {
        match (&self.psk_user, &self.subject) {
            (Some(user), _) => format!("psk {user}"),
            (None, Some(subject)) => format!("x509 {subject}"),
            (None, None) => "anonymous".to_string(),
        }
    }
}

/// A parsed identity pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// `CN=value`: any CN of the subject.
    CommonName(String),
    /// A full distinguished name: RDNs of (upper-case type, value) pairs, most specific first.
    Subject(Vec<Vec<(String, String)>>),
    /// `DNS:name`, lower-cased (a leading `*.` stands for one label).
    Dns(String),
    /// `IP:address`.
    Ip(IpAddr),
    /// `EMAIL:address`.
    Email(String),
    /// `URI:uri`.
    Uri(String),
    /// `PSK:user`.
    Psk(String),
}

impl IdentityPattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<IdentityPattern, TlsError> {
        let invalid = |why: &str| TlsError::Config(format!("identity pattern {pattern:?}: {why}"));
        let (prefix, rest) = pattern.split_once(':').unwrap_or(("", pattern));
        let nonempty = |value: &str| {
            if value.is_empty() {
                Err(invalid("empty value"))
            } else {
                Ok(value.to_string())
            }
        };
        match prefix.to_ascii_uppercase().as_str() {
            "DNS" => return Ok(IdentityPattern::Dns(nonempty(rest)?.to_ascii_lowercase())),
            "IP" => {
                let address = rest
                    .parse()
                    .map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
                return Ok(IdentityPattern::Ip(address));
            }
            "EMAIL" => return Ok(IdentityPattern::Email(nonempty(rest)?)),
            "URI" => return Ok(IdentityPattern::Uri(nonempty(rest)?)),
            "PSK" => return Ok(IdentityPattern::Psk(nonempty(rest)?)),
            _ => {}
        }
        if !pattern.contains('=') {
            return Err(invalid(
                "expected CN=…, a distinguished name, or DNS:/IP:/EMAIL:/URI:/PSK: prefix",
            ));
        }
        let rdns = parse_dn(pattern).map_err(|why| invalid(&why))?;
        if let [rdn] = rdns.as_slice()
            && let [(kind, value)] = rdn.as_slice()
            && kind == "CN"
        {
            return Ok(IdentityPattern::CommonName(value.clone()));
        }
        Ok(IdentityPattern::Subject(rdns))
    }

    /// Whether this pattern matches `identity`.
    pub fn matches(&self, identity: &Identity) -> bool {
        let subject = || identity.subject.as_deref().and_then(|s| parse_dn(s).ok());
        let san = |kind: &str| {
            identity
                .sans
                .iter()
                .filter_map(move |san| san.strip_prefix(kind))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        match self {
            IdentityPattern::CommonName(name) => subject().is_some_and(|rdns| {
                rdns.iter()
                    .flatten()
                    .any(|(kind, value)| kind == "CN" && value == name)
            }),
            IdentityPattern::Subject(want) => subject().is_some_and(|rdns| &rdns == want),
            IdentityPattern::Dns(name) => san("DNS:").iter().any(|n| dns_matches(name, n)),
            IdentityPattern::Ip(address) => san("IP:")
                .iter()
                .any(|text| text.parse::<IpAddr>().is_ok_and(|a| a == *address)),
            IdentityPattern::Email(address) => san("EMAIL:").iter().any(|a| a == address),
            IdentityPattern::Uri(uri) => san("URI:").iter().any(|u| u == uri),
            IdentityPattern::Psk(user) => identity.psk_user.as_deref() == Some(user.as_str()),
        }
    }
}

/// `pattern` (lower-case) against a certificate's DNS name, case-insensitively; a leading
/// `*.` in the pattern stands for exactly one label (`*.example.org` matches
/// `hv1.example.org`, not `example.org` nor `a.b.example.org`).
fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => name == pattern,
    }
}

/// Short names by OID (RFC 4514 §3 plus a few common ones).
const SHORT_NAMES: [(&str, &str); 14] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.6", "C"),
    ("2.5.4.9", "STREET"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "emailAddress"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.12", "title"),
    ("2.5.4.4", "SN"),
    ("2.5.4.42", "GN"),
];

/// Renders a distinguished name as described in the module docs.
pub fn render_name(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter().collect();
    for (index, rdn) in rdns.iter().rev().enumerate() {
        if index > 0 {
            out.push(',');
        }
        for (position, attribute) in rdn.iter().enumerate() {
            if position > 0 {
                out.push('+');
            }
            let oid = attribute.attr_type().to_id_string();
            let kind = SHORT_NAMES
                .iter()
                .find(|(dotted, _)| *dotted == oid)
                .map_or(oid.as_str(), |(_, short)| short);
            out.push_str(kind);
            out.push('=');
            match attribute_text(attribute) {
                Some(text) => escape_value(&text, &mut out),
                None => {
                    out.push('#');
                    for byte in attribute.as_slice() {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
            }
        }
    }
    out
}

fn attribute_text(attribute: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    if let Ok(text) = attribute.as_str() {
        return Some(text.to_string());
    }
    // BMPString (tag 30): UTF-16BE.
    if attribute.attr_value().tag().0 == 30 {
        let bytes = attribute.as_slice();
        if bytes.len().is_multiple_of(2) {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            return String::from_utf16(&units).ok();
        }
    }
    None
}

fn escape_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (index, character) in value.chars().enumerate() {
        match character {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(character);
            }
            '#' | ' ' if index == 0 => {
                out.push('\\');
                out.push(character);
            }
            ' ' if index == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(character),
        }
    }
}

fn render_general_name(name: &GeneralName<'_>) -> Option<String> {
    match name {
        GeneralName::DNSName(dns) => Some(format!("DNS:{dns}")),
        GeneralName::RFC822Name(email) => Some(format!("EMAIL:{email}")),
        GeneralName::URI(uri) => Some(format!("URI:{uri}")),
        GeneralName::IPAddress(bytes) => {
            let address = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?),
                _ => return None,
            };
            Some(format!("IP:{address}"))
        }
        _ => None,
    }
}

/// Parses an RFC 4514-style DN (leniently: spaces around separators are ignored) into RDNs
/// of (canonical upper-case type, unescaped value).
fn parse_dn(text: &str) -> Result<Vec<Vec<(String, String)>>, String> {
    let mut rdns = vec![Vec::new()];
    let mut kind = String::new();
    let mut value = String::new();
    let mut in_value = false;
    // Whether `value` ends with an escaped character that trailing-space trimming must keep.
    let mut kept = 0usize;
    let mut chars = text.chars().peekable();
    let finish = |kind: &mut String,
                  value: &mut String,
                  kept: &mut usize,
                  rdns: &mut Vec<Vec<(String, String)>>|
     -> Result<(), String> {
        let trimmed_len = value.trim_end().len().max(*kept);
        value.truncate(trimmed_len);
        let canonical = canonical_type(kind.trim())?;
        rdns.last_mut()
            .expect("at least one RDN")
            .push((canonical, std::mem::take(value)));
        kind.clear();
        *kept = 0;
        Ok(())
    };
    while let Some(character) = chars.next() {
        if !in_value {
            match character {
                '=' => in_value = true,
                ',' | '+' => return Err(format!("missing `=` before {character:?}")),
                _ => kind.push(character),
            }
            continue;
        }
        match character {
            '\\' => {
                let escaped = match chars.next() {
                    Some(first) if first.is_ascii_hexdigit() => {
                        let second = chars.next().filter(char::is_ascii_hexdigit);
                        let second = second.ok_or("bad `\\` hex escape")?;
                        let byte = u8::from_str_radix(&format!("{first}{second}"), 16)
                            .map_err(|_| "bad `\\` hex escape")?;
                        char::from(byte)
                    }
                    Some(other) => other,
                    None => return Err("dangling `\\` at the end".to_string()),
                };
                value.push(escaped);
                kept = value.len();
            }
            ',' | '+' => {
                finish(&mut kind, &mut value, &mut kept, &mut rdns)?;
                in_value = false;
                if character == ',' {
                    rdns.push(Vec::new());
                }
            }
            ' ' if value.is_empty() => {}
            _ => value.push(character),
        }
    }
    if !in_value {
        return Err("a component has no `=`".to_string());
    }
    finish(&mut kind, &mut value, &mut kept, &mut rdns)?;
    Ok(rdns)
}

fn canonical_type(kind: &str) -> Result<String, String> {
    if kind.is_empty() {
        return Err("empty attribute type".to_string());
    }
    let upper = kind.to_ascii_uppercase();
    let canonical = match upper.as_str() {
        "E" | "EMAIL" => "EMAILADDRESS".to_string(),
        _ => upper,
    };
    let valid = canonical
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !valid {
        return Err(format!("bad attribute type {kind:?}"));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(subject: &[(rcgen::DnType, &str)], sans: &[rcgen::SanType]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.subject_alt_names = sans.to_vec();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn alice() -> Identity {
        let der = certificate(
            &[
                (rcgen::DnType::CountryName, "GB"),
                (rcgen::DnType::OrganizationName, "Example, Ltd"),
                (rcgen::DnType::CommonName, "alice"),
            ],
            &[
                rcgen::SanType::DnsName("Host.Example".try_into().unwrap()),
                rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()),
                rcgen::SanType::IpAddress("2001:db8::1".parse().unwrap()),
                rcgen::SanType::Rfc822Name("alice@example.org".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://example.org/alice".try_into().unwrap()),
            ],
        );
        Identity::from_certificate_der(&der).unwrap()
    }

    #[test]
    fn dns_wildcard_patterns_stand_for_one_label() {
        assert!(dns_matches("*.example.org", "HV1.example.org"));
        assert!(dns_matches("hv1.example.org", "hv1.Example.org"));
        assert!(!dns_matches("*.example.org", "example.org"));
        assert!(!dns_matches("*.example.org", "a.b.example.org"));
        assert!(!dns_matches("*.example.org", "xexample.org"));
        assert!(!dns_matches("hv1.example.org", "hv2.example.org"));
        let identity = alice();
        assert!(identity.matches("DNS:*.example"));
        assert!(!identity.matches("DNS:*.host.example"));
    }

    #[test]
    fn subject_renders_most_specific_first_with_escapes() {
        let identity = alice();
        assert_eq!(
            identity.subject.as_deref(),
            Some("CN=alice,O=Example\\, Ltd,C=GB")
        );
        assert_eq!(
            identity.sans,
            [
                "DNS:Host.Example",
                "IP:10.0.0.1",
                "IP:2001:db8::1",
                "EMAIL:alice@example.org",
                "URI:spiffe://example.org/alice"
            ]
        );
        assert_eq!(identity.psk_user, None);
    }

    #[test]
    fn patterns_match_cn_dn_and_sans() {
        let identity = alice();
        for good in [
            "CN=alice",
            "cn = alice",
            "CN=alice,O=Example\\, Ltd,C=GB",
            "cn=alice, o=Example\\2C Ltd, c=GB",
            "DNS:host.example",
            "dns:HOST.EXAMPLE",
            "IP:10.0.0.1",
            "IP:2001:0db8:0:0::1",
            "EMAIL:alice@example.org",
            "URI:spiffe://example.org/alice",
        ] {
            assert!(identity.matches(good), "{good} should match");
        }
        for bad in [
            "CN=bob",
            "CN=Alice",
            "CN=alice,O=Example",
            "C=GB,O=Example\\, Ltd,CN=alice",
            "O=Example\\, Ltd",
            "DNS:other.example",
            "IP:10.0.0.2",
            "EMAIL:bob@example.org",
            "URI:spiffe://example.org/bob",
            "PSK:alice",
            "alice",
            "",
        ] {
            assert!(!identity.matches(bad), "{bad} must not match");
        }
    }

    #[test]
    fn psk_patterns() {
        let identity = Identity::from_psk_user("alice");
        assert!(identity.matches("PSK:alice"));
        assert!(identity.matches("psk:alice"));
        assert!(!identity.matches("PSK:bob"));
        assert!(!identity.matches("CN=alice"));
        assert_eq!(identity.describe(), "psk alice");
    }

    #[test]
    fn malformed_patterns_are_errors() {
        for bad in [
            "IP:not-an-ip",
            "DNS:",
            "PSK:",
            "alice",
            "CN",
            "=x",
            "CN=a,",
            "CN=a\\",
        ] {
            assert!(
                IdentityPattern::parse(bad).is_err(),
                "{bad} should not parse"
            );
        }
        assert_eq!(
            IdentityPattern::parse("CN=alice").unwrap(),
            IdentityPattern::CommonName("alice".into())
        );
    }

    #[test]
    fn rendering_round_trips_through_the_parser() {
        let der = certificate(
            &[
                (rcgen::DnType::CommonName, " #lead+trail, \"q\" <x>; \\ "),
                (rcgen::DnType::OrganizationalUnitName, "ops"),
            ],
            &[],
        );
        let identity = Identity::from_certificate_der(&der).unwrap();
        let subject = identity.subject.clone().unwrap();
        let parsed = parse_dn(&subject).unwrap();
        assert_eq!(
            parsed,
            vec![
                vec![("OU".to_string(), "ops".to_string())],
                vec![("CN".to_string(), " #lead+trail, \"q\" <x>; \\ ".to_string())],
            ]
        );
        assert!(identity.matches(&format!(
            "CN={}",
            &subject[subject.find("CN=").unwrap() + 3..]
        )));
    }
}
