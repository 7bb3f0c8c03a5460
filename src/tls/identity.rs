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
//! # Matching
//!
//! Against the parsed `allow_clients` patterns ([`crate::access::ClientPattern`], the one
//! grammar): `CN=alice` matches when any CN of the subject is `alice`; any other
//! distinguished name matches the whole subject (the same single-valued RDNs in the same
//! order; types as the renderer names them, upper-cased; values exactly); `DNS:` (a leading
//! `*.` stands for one label, case-insensitive), `IP:` (as addresses), `EMAIL:` and `URI:`
//! (exactly) match a subject alternative name; `PSK:` the PSK identity.

use std::fmt::Write as _;
use std::net::IpAddr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

use super::TlsError;
use crate::access::{ClientIdentity, ClientPattern, escape_value};

/// A subject as relative distinguished names, most specific first; several attributes for a
/// multi-valued RDN.
type Rdns = Vec<Vec<Attribute>>;

/// One attribute of a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attribute {
    /// Type as rendered (`CN`, `emailAddress`, a dotted OID).
    kind: String,
    /// The string value, or `#` and the hex of a value that is not a string.
    value: String,
    /// `value` is a string (escaped when rendered), not hex.
    text: bool,
}

impl Attribute {
    /// Whether this is the pattern's `(TYPE, value)`; types compare case-insensitively.
    fn is(&self, (kind, value): &(String, String)) -> bool {
        self.kind.eq_ignore_ascii_case(kind) && self.value == *value
    }
}

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
    /// The subject's attributes, for matching (what `subject` renders).
    rdns: Rdns,
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
        let rdns = subject_rdns(certificate.subject());
        Ok(Identity {
            subject: Some(render_rdns(&rdns)),
            sans,
            psk_user: None,
            rdns,
        })
    }

    /// The identity of a PSK session.
    pub fn from_psk_user(user: &str) -> Identity {
        Identity {
            psk_user: Some(user.to_string()),
            ..Identity::default()
        }
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

impl ClientIdentity for Identity {
    fn matches(&self, pattern: &ClientPattern) -> bool {
        let san = |kind: &'static str| self.sans.iter().filter_map(move |s| s.strip_prefix(kind));
        match pattern {
            ClientPattern::Subject(want) => match want.as_slice() {
                [cn @ (kind, _)] if kind == "CN" => {
                    self.rdns.iter().flatten().any(|attribute| attribute.is(cn))
                }
                _ => {
                    self.rdns.len() == want.len()
                        && self.rdns.iter().zip(want).all(
                            |(rdn, wanted)| matches!(rdn.as_slice(), [only] if only.is(wanted)),
                        )
                }
            },
            ClientPattern::Dns(name) => san("DNS:").any(|n| dns_matches(name, n)),
            ClientPattern::Ip(address) => {
                san("IP:").any(|text| text.parse::<IpAddr>().is_ok_and(|a| a == *address))
            }
            ClientPattern::Email(address) => san("EMAIL:").any(|a| a == address),
            ClientPattern::Uri(uri) => san("URI:").any(|u| u == uri),
            ClientPattern::Psk(user) => self.psk_user.as_deref() == Some(user.as_str()),
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
    render_rdns(&subject_rdns(name))
}

/// The attributes of `name`, most specific RDN first (module docs: types and values).
fn subject_rdns(name: &X509Name<'_>) -> Rdns {
    let rdns: Vec<_> = name.iter().collect();
    rdns.iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|attribute| {
                    let oid = attribute.attr_type().to_id_string();
                    let kind = SHORT_NAMES
                        .iter()
                        .find(|(dotted, _)| *dotted == oid)
                        .map_or(oid.as_str(), |(_, short)| short)
                        .to_string();
                    let (value, text) = match attribute_text(attribute) {
                        Some(text) => (text, true),
                        None => {
                            let mut hex = String::from("#");
                            for byte in attribute.as_slice() {
                                let _ = write!(hex, "{byte:02x}");
                            }
                            (hex, false)
                        }
                    };
                    Attribute { kind, value, text }
                })
                .collect()
        })
        .collect()
}

/// `CN=alice,O=Example\, Ltd`: RDNs joined with `,`, a multi-valued RDN's parts with `+`.
fn render_rdns(rdns: &Rdns) -> String {
    let mut out = String::new();
    for (index, rdn) in rdns.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        for (position, attribute) in rdn.iter().enumerate() {
            if position > 0 {
                out.push('+');
            }
            out.push_str(&attribute.kind);
            out.push('=');
            if attribute.text {
                escape_value(&attribute.value, &mut out).expect("writing to a String");
            } else {
                out.push_str(&attribute.value);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `identity` matches the pattern `text` (which must parse).
    fn matches(identity: &Identity, text: &str) -> bool {
        let pattern = ClientPattern::parse(text).unwrap_or_else(|error| panic!("{error}"));
        identity.matches(&pattern)
    }

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
        assert!(matches(&identity, "DNS:*.example"));
        assert!(!matches(&identity, "DNS:*.host.example"));
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
            assert!(matches(&identity, good), "{good} should match");
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
        ] {
            assert!(!matches(&identity, bad), "{bad} must not match");
        }
    }

    #[test]
    fn psk_patterns() {
        let identity = Identity::from_psk_user("alice");
        assert!(matches(&identity, "PSK:alice"));
        assert!(matches(&identity, "psk:alice"));
        assert!(!matches(&identity, "PSK:bob"));
        assert!(!matches(&identity, "CN=alice"));
        assert_eq!(identity.describe(), "psk alice");
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
        let cn = " #lead+trail, \"q\" <x>; \\ ";
        let attribute = |kind: &str, value: &str| Attribute {
            kind: kind.into(),
            value: value.into(),
            text: true,
        };
        assert_eq!(
            identity.rdns,
            vec![vec![attribute("OU", "ops")], vec![attribute("CN", cn)]]
        );
        // The rendered subject, read back as a pattern, is this subject, and its CN part is
        // this CN: the renderer and the configuration's parser agree on every escape.
        assert!(matches(&identity, &subject));
        assert!(matches(
            &identity,
            &format!("CN={}", &subject[subject.find("CN=").unwrap() + 3..])
        ));
    }
}
