//! Access control: who may connect to a listener and who may use an export. Pure decisions
//! over a [`Peer`] (and, for exports, the client's TLS identity); the server calls them at
//! accept time and when a client chooses an export.
//!
//! # Peers
//!
//! A TCP peer is its socket address, with an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a
//! dual-stack `[::]` listener reports IPv4 clients) turned back into IPv4, so IPv4 rules match
//! IPv4 clients on any listener. A unix peer is the uid, gid and pid the kernel recorded when
//! it connected (`SO_PEERCRED`), which the peer cannot forge.
//!
//! # Allowlists
//!
//! `allow` is a list of CIDR networks (`10.0.0.0/8`, `fd00::/8`; a bare address is `/32` or
//! `/128`) and `allow_uids` a list of user ids (names are resolved when the configuration is
//! loaded). TCP peers are checked against `allow` only, unix peers against `allow_uids` only.
//! An empty list allows every peer of its kind. IPv4 peers match IPv4 entries only (a rule
//! written as an IPv4-mapped IPv6 network, `::ffff:10.0.0.0/104`, is stored as its IPv4
//! network); `0.0.0.0/0` and `::/0` together allow every address.
//!
//! # Export precedence
//!
//! [`ExportPolicy::admit`] requires every condition; the first one that fails is reported:
//!
//! 1. `tls_only`: the client must be on TLS.
//! 2. `allow_clients` (non-empty): the client must be on TLS with an identity matching one
//!    pattern (so a non-empty `allow_clients` implies `tls_only`).
//! 3. `allow` / `allow_uids` as above.
//!
//! The listener-wide [`ListenerPolicy`] is checked before any of these, when the connection
//! is accepted; the export's connection limit ([`ExportPolicy::check_connections`]) after them.
//!
//! # Client patterns
//!
//! `allow_clients` entries are parsed once, at load time, by [`ClientPattern::parse`] (the only
//! grammar; its `Display` is the canonical text configuration output shows): `CN=NAME` (any
//! common name of the subject) or a whole distinguished name `CN=NAME,O=ORG` (RFC 4514 order
//! and escapes, `\,` or `\2C`; attribute types upper-cased, `E`/`EMAIL` = `EMAILADDRESS`),
//! `DNS:NAME` (lower-cased), `IP:ADDRESS`, `EMAIL:ADDRESS`, `URI:URI` (subjectAltName entries
//! of the client certificate) and `PSK:IDENTITY` (the pre-shared-key identity). The TLS layer
//! implements [`ClientIdentity`] against the parsed patterns.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

use ipnet::{IpNet, Ipv4Net};

use crate::ring::sys;

/// Most entries in one allowlist (`allow`, `allow_uids`, `allow_clients`).
pub const ALLOWLIST_ENTRIES_MAX: usize = 4096;
/// Longest client pattern, in bytes.
pub const PATTERN_BYTES_MAX: usize = 1024;

/// The client at the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client (IPv4-mapped IPv6 addresses already turned into IPv4).
    Tcp(SocketAddr),
    /// A unix-socket client, as the kernel saw it connect.
    Unix {
        /// Effective user id.
        uid: u32,
        /// Effective group id.
        gid: u32,
        /// Process id (0 if the peer is in another pid namespace).
        pid: i32,
    },
}

impl Peer {
    /// A TCP peer; an IPv4-mapped IPv6 address becomes the IPv4 address.
    pub fn tcp(address: SocketAddr) -> Peer {
        Peer::Tcp(SocketAddr::new(address.ip().to_canonical(), address.port()))
    }

    /// A unix-socket peer, from the credentials of the connected socket `socket`.
    pub fn unix(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let (uid, gid, pid) = sys::peer_credentials(socket.as_raw_fd())?;
        Ok(Peer::Unix { uid, gid, pid })
    }

    /// The peer of any accepted stream socket: TCP (IPv4 or IPv6) or unix.
    pub fn of_socket(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let address = socket2::SockRef::from(&socket).peer_addr()?;
        if let Some(address) = address.as_socket() {
            return Ok(Peer::tcp(address));
        }
        if address.is_unix() {
            return Peer::unix(socket);
        }
        Err(io::Error::other(format!(
            "unsupported address family {}",
            address.family()
        )))
    }

    /// The IP address of a TCP peer.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Tcp(address) => Some(address.ip()),
            Peer::Unix { .. } => None,
        }
    }
}

impl fmt::Display for Peer {
    /// `10.0.0.1:51234`, `[fd00::1]:51234` or `unix uid=1000 gid=1000 pid=4242`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(address) => write!(f, "{address}"),
            Peer::Unix { uid, gid, pid } => write!(f, "unix uid={uid} gid={gid} pid={pid}"),
        }
    }
}

/// Why a client was refused; `Display` is the reason for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// The TCP peer's address is in no `allow` network.
    #[error("address {0} is not in the allowlist")]
    Address(IpAddr),
    /// The unix peer's uid is not in `allow_uids`.
    #[error("uid {0} is not in allow_uids")]
    Uid(u32),
    /// A plaintext client asked for an export that needs TLS (`tls_only` or `allow_clients`).
    #[error("the export requires TLS")]
    TlsRequired,
    /// A TLS client whose identity matches no `allow_clients` pattern.
    #[error("the client's TLS identity matches no allow_clients pattern")]
    ClientIdentity,
    /// The export already has its `max_connections` clients.
    #[error("the export has reached its limit of {0} connections")]
    ConnectionLimit(u32),
}

impl Denied {
    /// A short label for metrics (`address`, `uid`, `tls`, `identity`, `limit`).
    pub fn label(&self) -> &'static str {
        match self {
            Denied::Address(_) => "address",
            Denied::Uid(_) => "uid",
            Denied::TlsRequired => "tls",
            Denied::ClientIdentity => "identity",
            Denied::ConnectionLimit(_) => "limit",
        }
    }
}

/// The authenticated identity of a TLS client, as the TLS layer knows it.
pub trait ClientIdentity {
    /// Whether this identity matches `pattern`.
    fn matches(&self, pattern: &ClientPattern) -> bool;
}

/// A TLS client that presented no identity (no client certificate was requested): it is on
/// TLS, but matches no pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Anonymous;

impl ClientIdentity for Anonymous {
    fn matches(&self, _pattern: &ClientPattern) -> bool {
        false
    }
}

/// Rules checked when a connection is accepted, before the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerPolicy {
    /// Networks TCP clients may come from (empty: any).
    pub allow: Vec<IpNet>,
    /// Users that may connect over unix sockets (empty: any).
    pub allow_uids: Vec<u32>,
}

impl ListenerPolicy {
    /// Whether `peer` may connect.
    pub fn admit(&self, peer: &Peer) -> Result<(), Denied> {
        check_peer(&self.allow, &self.allow_uids, peer)
    }

    /// Whether every peer is admitted (both lists empty).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.allow_uids.is_empty()
    }
}

/// Rules of one export, checked when a client chooses it (NBD_OPT_GO/INFO) and when it lists
/// exports (an export the client may not use is not listed to it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportPolicy {
    /// Networks TCP clients may come from (empty: any).
    pub allow: Vec<IpNet>,
    /// Users that may use it over unix sockets (empty: any).
    pub allow_uids: Vec<u32>,
    /// Client patterns; non-empty: only TLS clients matching one of them.
    pub allow_clients: Vec<ClientPattern>,
    /// Refuse plaintext clients.
    pub tls_only: bool,
    /// Clients using the export at once (`None`: unlimited).
    pub max_connections: Option<u32>,
}

impl ExportPolicy {
    /// Whether `peer` may use the export; `tls` is `None` for a plaintext client and the
    /// client's identity (possibly [`Anonymous`]) on TLS. See the module docs for precedence.
    pub fn admit(&self, peer: &Peer, tls: Option<&dyn ClientIdentity>) -> Result<(), Denied> {
        if self.requires_tls() && tls.is_none() {
            return Err(Denied::TlsRequired);
        }
        if !self.allow_clients.is_empty() {
            let identity = tls.ok_or(Denied::TlsRequired)?;
            let matched = self
                .allow_clients
                .iter()
                .any(|pattern| identity.matches(pattern));
            if !matched {
                return Err(Denied::ClientIdentity);
            }
        }
        check_peer(&self.allow, &self.allow_uids, peer)
    }

    /// Whether a new client may join the `open` clients already using the export.
    pub fn check_connections(&self, open: u32) -> Result<(), Denied> {
        match self.max_connections {
            Some(limit) if open >= limit => Err(Denied::ConnectionLimit(limit)),
            _ => Ok(()),
        }
    }

    /// Whether plaintext clients are refused (and the export hidden from their LIST).
    pub fn requires_tls(&self) -> bool {
        self.tls_only || !self.allow_clients.is_empty()
    }

    /// Whether every client is admitted with no limit (the policy of an export without any
    /// access key).
    pub fn is_open(&self) -> bool {
        *self == ExportPolicy::default()
    }
}

fn check_peer(allow: &[IpNet], allow_uids: &[u32], peer: &Peer) -> Result<(), Denied> {
    match *peer {
        Peer::Tcp(address) => {
            let ip = address.ip().to_canonical();
            if allow.is_empty() || allow.iter().any(|net| net.contains(&ip)) {
                Ok(())
            } else {
                Err(Denied::Address(ip))
            }
        }
        Peer::Unix { uid, .. } => {
            if allow_uids.is_empty() || allow_uids.contains(&uid) {
                Ok(())
            } else {
                Err(Denied::Uid(uid))
            }
        }
    }
}

/// Parses an allowlist entry: `10.0.0.0/8`, `fd00::/8`, or a bare address (`/32`, `/128`).
/// Host bits beyond the prefix are an error (`10.0.0.1/8` is probably a typo); an
/// IPv4-mapped IPv6 network becomes the IPv4 network.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let trimmed = text.trim();
    let net = match trimmed.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match trimmed.parse::<IpAddr>() {
            Ok(address) => IpNet::from(address),
            Err(_) => {
                return Err(format!(
                    "'{text}' is not an IP address or CIDR network (10.0.0.0/8, fd00::/8, \
                     192.168.1.7)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "'{text}' has host bits set beyond the /{} prefix (did you mean {}?)",
            net.prefix_len(),
            net.trunc()
        ));
    }
    Ok(unmap(net))
}

/// `::ffff:a.b.c.d/N` (N >= 96) as `a.b.c.d/(N-96)`; other networks unchanged.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32 bits");
        return IpNet::V4(v4);
    }
    net
}

/// Parses an `allow_uids` entry: a numeric uid, or a user name looked up now.
pub fn parse_uid(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    if let Ok(uid) = trimmed.parse::<u32>() {
        return Ok(uid);
    }
    if trimmed.is_empty() {
        return Err("a user name or uid is empty".into());
    }
    match sys::user_ids(trimmed) {
        Ok(Some((uid, _))) => Ok(uid),
        Ok(None) => Err(format!("user '{trimmed}' does not exist")),
        Err(error) => Err(format!("cannot look up user '{trimmed}': {error}")),
    }
}

/// Checks the length of an allowlist.
pub fn check_entries(count: usize) -> Result<(), String> {
    if count > ALLOWLIST_ENTRIES_MAX {
        return Err(format!(
            "{count} entries is more than the {ALLOWLIST_ENTRIES_MAX} an allowlist may hold"
        ));
    }
    Ok(())
}

/// A parsed `allow_clients` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPattern {
    /// `CN=alice` (any common name of the subject is `alice`) or a whole subject
    /// `CN=alice,O=Example` (the same single-valued RDNs in RFC 4514 order, most specific
    /// first); attribute types upper-case, values unescaped.
    Subject(Vec<(String, String)>),
    /// `DNS:name`: a subjectAltName DNS entry (lower-case; `*.` wildcard first label allowed).
    Dns(String),
    /// `IP:address`: a subjectAltName IP entry.
    Ip(IpAddr),
    /// `EMAIL:address`: a subjectAltName rfc822Name entry.
    Email(String),
    /// `URI:uri`: a subjectAltName URI entry.
    Uri(String),
    /// `PSK:identity`: the client's pre-shared-key identity.
    Psk(String),
}

/// What [`ClientPattern::parse`] expects, for error messages.
const PATTERN_FORMS: &str = "CN=NAME, a subject such as CN=NAME,O=ORG, DNS:NAME, IP:ADDRESS, \
                             EMAIL:ADDRESS, URI:URI or PSK:IDENTITY";

impl ClientPattern {
    /// Parses and checks a pattern; the error says what is wrong and what is expected.
    pub fn parse(text: &str) -> Result<ClientPattern, String> {
        let fail = |why: &str| Err(format!("client pattern '{text}': {why}"));
        if text.is_empty() {
            return fail(&format!("empty; expected {PATTERN_FORMS}"));
        }
        if text.len() > PATTERN_BYTES_MAX {
            return fail(&format!("longer than {PATTERN_BYTES_MAX} bytes"));
        }
        if text.chars().any(char::is_control) {
            return fail("contains a control character");
        }
        let trailing_space = text.trim_end() != text && !text.trim_end().ends_with('\\');
        if text.trim_start() != text || trailing_space {
            return fail("has leading or trailing spaces (escape a significant one as '\\ ')");
        }
        let checked = match text.split_once(':') {
            Some((kind, value)) if is_san_kind(kind) => parse_tagged(kind, value),
            _ if text.contains('=') => parse_subject(text).map(ClientPattern::Subject),
            _ => Err(format!("expected {PATTERN_FORMS}")),
        };
        checked.or_else(|why| fail(&why))
    }

    /// Whether the pattern is about a client certificate (not a PSK identity).
    pub fn is_certificate(&self) -> bool {
        !matches!(self, ClientPattern::Psk(_))
    }
}

fn is_san_kind(kind: &str) -> bool {
    ["DNS", "IP", "EMAIL", "URI", "PSK"]
        .iter()
        .any(|known| kind.eq_ignore_ascii_case(known))
}

fn parse_tagged(kind: &str, value: &str) -> Result<ClientPattern, String> {
    if value.is_empty() {
        return Err(format!("nothing after {}:", kind.to_ascii_uppercase()));
    }
    match kind.to_ascii_uppercase().as_str() {
        "DNS" => check_dns(value).map(|()| ClientPattern::Dns(value.to_ascii_lowercase())),
        "IP" => value
            .parse::<IpAddr>()
            .map(ClientPattern::Ip)
            .map_err(|_| format!("'{value}' is not an IP address")),
        "EMAIL" => match value.split_once('@') {
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                no_spaces(value).map(|()| ClientPattern::Email(value.to_string()))
            }
            _ => Err(format!("'{value}' is not an e-mail address (user@domain)")),
        },
        "URI" => check_uri(value).map(|()| ClientPattern::Uri(value.to_string())),
        "PSK" if value.contains(':') => Err("a PSK identity cannot contain ':' (the psktool \
                                             key file separates identity and key with it)"
            .into()),
        "PSK" => Ok(ClientPattern::Psk(value.to_string())),
        other => unreachable!("is_san_kind accepted {other}"),
    }
}

fn no_spaces(value: &str) -> Result<(), String> {
    if value.contains(char::is_whitespace) {
        return Err(format!("'{value}' contains spaces"));
    }
    Ok(())
}

fn check_dns(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("'{name}' is not a DNS name: {why}"));
    if name.len() > 253 {
        return bad("longer than 253 bytes");
    }
    for (index, label) in name.trim_end_matches('.').split('.').enumerate() {
        if label == "*" && index == 0 && name.len() > 2 {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return bad("every label must have 1 to 63 characters");
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !label.chars().all(allowed) {
            return bad("letters, digits, '-' and '_' only (and a leading '*.' wildcard)");
        }
    }
    Ok(())
}

fn check_uri(uri: &str) -> Result<(), String> {
    no_spaces(uri)?;
    let scheme = uri.split_once(':').map_or("", |(scheme, _)| scheme);
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || uri.len() == scheme.len() + 1 {
        return Err(format!(
            "'{uri}' is not a URI (scheme:rest, e.g. spiffe://x/y)"
        ));
    }
    Ok(())
}

/// `A=v,B=w` with RFC 4514 escapes (`\,` `\+` `\\` ...); multi-valued RDNs (`+`) are refused.
fn parse_subject(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut attributes = Vec::new();
    for part in split_unescaped(text, ',')? {
        let (kind, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not ATTRIBUTE=VALUE"))?;
        let kind = kind.trim();
        let is_name = kind.starts_with(|c: char| c.is_ascii_alphabetic())
            && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        let is_oid = !kind.is_empty()
            && kind.split('.').count() > 1
            && kind
                .split('.')
                .all(|arc| !arc.is_empty() && arc.chars().all(|c| c.is_ascii_digit()));
        if !is_name && !is_oid {
            return Err(format!(
                "'{kind}' is not an attribute type (CN, O, OU, ... or an OID)"
            ));
        }
        let value = unescape(value)?;
        if value.is_empty() {
            return Err(format!("attribute {kind} has an empty value"));
        }
        let kind = match kind.to_ascii_uppercase().as_str() {
            "E" | "EMAIL" => "EMAILADDRESS".to_string(),
            upper => upper.to_string(),
        };
        attributes.push((kind, value));
    }
    Ok(attributes)
}

/// Splits on `separator` where it is not escaped with `\`; an unescaped `+` is refused.
fn split_unescaped(text: &str, separator: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (index, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '+' {
            return Err("multi-valued RDNs ('+') are not supported; escape it as \\+".into());
        } else if c == separator {
            parts.push(&text[start..index]);
            start = index + 1;
        }
    }
    if escaped {
        return Err("ends with a lone '\\'".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// An RFC 4514 attribute value: `\\` escapes the next character, or gives a byte as two hex
/// digits (`\\2C`); spaces around the value are ignored unless escaped.
fn unescape(value: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(value.len());
    // Trailing-space trimming keeps everything up to the last escaped byte.
    let mut kept = 0;
    let mut chars = value.trim_start_matches(' ').chars().peekable();
    let mut utf8 = [0u8; 4];
    while let Some(c) = chars.next() {
        if c != '\\' {
            bytes.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        let escaped = chars.next().ok_or("ends with a lone '\\'")?;
        match (
            escaped.to_digit(16),
            chars.peek().and_then(|next| next.to_digit(16)),
        ) {
            (Some(high), Some(low)) => {
                chars.next();
                bytes.push((high * 16 + low) as u8);
            }
            _ => bytes.extend_from_slice(escaped.encode_utf8(&mut utf8).as_bytes()),
        }
        kept = bytes.len();
    }
    while bytes.len() > kept && bytes.last() == Some(&b' ') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| "hex escapes that are not UTF-8".to_string())
}

/// Appends `value` escaped as RFC 4514 says, so that [`ClientPattern::parse`] reads it back:
/// `\\` before `, + " \\ < > ;`, a leading `#` or space and a trailing space; control
/// characters as hex bytes (`\\00`). Also how the TLS layer renders certificate subjects.
pub fn escape_value(value: &str, out: &mut impl fmt::Write) -> fmt::Result {
    let last = value.chars().count().saturating_sub(1);
    for (index, c) in value.chars().enumerate() {
        let special = ",+\"\\<>;".contains(c)
            || (index == 0 && (c == '#' || c == ' '))
            || (index == last && c == ' ');
        if c.is_control() {
            let mut utf8 = [0u8; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                write!(out, "\\{byte:02X}")?;
            }
            continue;
        }
        if special {
            out.write_char('\\')?;
        }
        out.write_char(c)?;
    }
    Ok(())
}

impl fmt::Display for ClientPattern {
    /// The canonical text, which configuration output shows and [`ClientPattern::parse`]
    /// reads back as the same pattern.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientPattern::Subject(attributes) => {
                for (index, (kind, value)) in attributes.iter().enumerate() {
                    let comma = if index == 0 { "" } else { "," };
                    write!(f, "{comma}{kind}=")?;
                    escape_value(value, f)?;
                }
                Ok(())
            }
            ClientPattern::Dns(name) => write!(f, "DNS:{name}"),
            ClientPattern::Ip(address) => write!(f, "IP:{address}"),
            ClientPattern::Email(address) => write!(f, "EMAIL:{address}"),
            ClientPattern::Uri(uri) => write!(f, "URI:{uri}"),
            ClientPattern::Psk(identity) => write!(f, "PSK:{identity}"),
        }
    }
}

/// Parses a pattern and returns its canonical text.
#[cfg(test)]
fn canonical_pattern(text: &str) -> Result<String, String> {
    ClientPattern::parse(text).map(|pattern| pattern.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        parse_net(text).unwrap_or_else(|error| panic!("{error}"))
    }

    fn tcp(text: &str) -> Peer {
        Peer::tcp(text.parse().unwrap())
    }

    const UNIX_1000: Peer = Peer::Unix {
        uid: 1000,
        gid: 1000,
        pid: 7,
    };

    /// A TLS identity holding exactly these canonical patterns.
    struct Fake(&'static [&'static str]);

    impl ClientIdentity for Fake {
        fn matches(&self, pattern: &ClientPattern) -> bool {
            self.0.contains(&pattern.to_string().as_str())
        }
    }

    fn patterns(texts: &[&str]) -> Vec<ClientPattern> {
        texts
            .iter()
            .map(|text| ClientPattern::parse(text).unwrap())
            .collect()
    }

    #[test]
    fn networks_parse_with_bare_addresses_as_hosts() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(net("::1").to_string(), "::1/128");
        assert_eq!(net(" fd00::/8 ").to_string(), "fd00::/8");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(net("::ffff:10.1.2.3").to_string(), "10.1.2.3/32");
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "host.example",
            "",
            "::1/129",
            "10.0.0.0/",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        let error = parse_net("10.0.0.1/8").unwrap_err();
        assert!(error.contains("did you mean 10.0.0.0/8"), "{error}");
    }

    #[test]
    fn ipv4_peers_match_ipv4_networks_on_any_listener() {
        let policy = ListenerPolicy {
            allow: vec![net("10.0.0.0/8"), net("192.168.1.7"), net("fd00::/8")],
            allow_uids: vec![],
        };
        assert_eq!(policy.admit(&tcp("10.200.3.4:5")), Ok(()));
        assert_eq!(policy.admit(&tcp("192.168.1.7:5")), Ok(()));
        assert_eq!(
            policy.admit(&tcp("192.168.1.8:5")),
            Err(Denied::Address("192.168.1.8".parse().unwrap()))
        );
        // A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6.
        assert_eq!(policy.admit(&tcp("[::ffff:10.1.1.1]:5")), Ok(()));
        assert_eq!(
            tcp("[::ffff:10.1.1.1]:5"),
            tcp("10.1.1.1:5"),
            "mapped to IPv4"
        );
        assert!(policy.admit(&tcp("[::ffff:11.1.1.1]:5")).is_err());
        // Even a Peer built without the constructor is compared as IPv4.
        let raw = Peer::Tcp("[::ffff:10.1.1.1]:5".parse().unwrap());
        assert_eq!(policy.admit(&raw), Ok(()));
        assert_eq!(policy.admit(&tcp("[fd12::1]:5")), Ok(()));
        assert!(policy.admit(&tcp("[fe80::1]:5")).is_err());
        assert!(policy.admit(&tcp("[::1]:5")).is_err());
        assert_eq!(policy.admit(&UNIX_1000), Ok(()), "no allow_uids: any user");
    }

    #[test]
    fn ipv6_wildcards_do_not_cover_ipv4() {
        let policy = ListenerPolicy {
            allow: vec![net("::/0")],
            allow_uids: vec![],
        };
        assert_eq!(policy.admit(&tcp("[2001:db8::1]:5")), Ok(()));
        assert!(policy.admit(&tcp("127.0.0.1:5")).is_err());
        assert!(policy.admit(&tcp("[::ffff:127.0.0.1]:5")).is_err());
    }

    #[test]
    fn uid_lists_apply_to_unix_peers_only() {
        let policy = ListenerPolicy {
            allow: vec![],
            allow_uids: vec![0, 1000],
        };
        assert_eq!(policy.admit(&UNIX_1000), Ok(()));
        let other = Peer::Unix {
            uid: 1001,
            gid: 1000,
            pid: 1,
        };
        assert_eq!(policy.admit(&other), Err(Denied::Uid(1001)));
        assert_eq!(
            policy.admit(&tcp("8.8.8.8:1")),
            Ok(()),
            "no allow: any address"
        );
        assert!(!policy.is_open());
        assert!(ListenerPolicy::default().is_open());
        assert_eq!(ListenerPolicy::default().admit(&other), Ok(()));
    }

    #[test]
    fn uids_parse_from_numbers_and_names() {
        assert_eq!(parse_uid("1000"), Ok(1000));
        assert_eq!(parse_uid("root"), Ok(0));
        let error = parse_uid("no-such-user-ringbd").unwrap_err();
        assert!(error.contains("does not exist"), "{error}");
        assert!(parse_uid("").is_err());
    }

    #[test]
    fn export_policy_precedence() {
        let policy = ExportPolicy {
            allow: vec![net("10.1.0.0/16")],
            allow_uids: vec![1000],
            allow_clients: patterns(&["CN=hv1.example", "PSK:alice"]),
            tls_only: false,
            max_connections: Some(2),
        };
        let hv1 = Fake(&["CN=hv1.example", "DNS:hv1.example"]);
        let bob = Fake(&["PSK:bob"]);
        let inside = tcp("10.1.2.3:9");
        let outside = tcp("10.2.2.3:9");
        assert!(policy.requires_tls(), "allow_clients implies TLS");
        assert_eq!(policy.admit(&inside, None), Err(Denied::TlsRequired));
        assert_eq!(
            policy.admit(&inside, Some(&Anonymous)),
            Err(Denied::ClientIdentity)
        );
        assert_eq!(
            policy.admit(&inside, Some(&bob)),
            Err(Denied::ClientIdentity)
        );
        assert_eq!(policy.admit(&inside, Some(&hv1)), Ok(()));
        assert_eq!(
            policy.admit(&UNIX_1000, Some(&Fake(&["PSK:alice"]))),
            Ok(())
        );
        // Identity and address must both hold.
        assert_eq!(
            policy.admit(&outside, Some(&hv1)),
            Err(Denied::Address("10.2.2.3".parse().unwrap()))
        );
        assert_eq!(policy.check_connections(1), Ok(()));
        assert_eq!(policy.check_connections(2), Err(Denied::ConnectionLimit(2)));
        assert!(!policy.is_open());
    }

    #[test]
    fn tls_only_refuses_plaintext_whatever_the_address() {
        let policy = ExportPolicy {
            tls_only: true,
            ..ExportPolicy::default()
        };
        assert_eq!(
            policy.admit(&tcp("127.0.0.1:1"), None),
            Err(Denied::TlsRequired)
        );
        assert_eq!(policy.admit(&UNIX_1000, None), Err(Denied::TlsRequired));
        assert_eq!(policy.admit(&tcp("127.0.0.1:1"), Some(&Anonymous)), Ok(()));
        assert_eq!(policy.check_connections(u32::MAX), Ok(()), "unlimited");
        let open = ExportPolicy::default();
        assert!(open.is_open() && !open.requires_tls());
        assert_eq!(open.admit(&tcp("1.2.3.4:1"), None), Ok(()));
        assert_eq!(open.admit(&UNIX_1000, None), Ok(()));
    }

    #[test]
    fn denials_have_reasons_and_labels() {
        let denied = Denied::Address("10.9.9.9".parse().unwrap());
        assert_eq!(
            denied.to_string(),
            "address 10.9.9.9 is not in the allowlist"
        );
        assert_eq!(denied.label(), "address");
        assert_eq!(Denied::ConnectionLimit(4).label(), "limit");
        assert!(Denied::TlsRequired.to_string().contains("TLS"));
    }

    #[test]
    fn peers_display_for_logs() {
        assert_eq!(tcp("10.0.0.1:51234").to_string(), "10.0.0.1:51234");
        assert_eq!(tcp("[fd00::1]:5").to_string(), "[fd00::1]:5");
        assert_eq!(UNIX_1000.to_string(), "unix uid=1000 gid=1000 pid=7");
        assert_eq!(
            tcp("[::ffff:1.2.3.4]:5").ip(),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(UNIX_1000.ip(), None);
    }

    #[test]
    fn peers_come_from_real_sockets() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let peer = Peer::of_socket(ours.as_fd()).unwrap();
        let Peer::Unix { uid, pid, .. } = peer else {
            panic!("{peer:?}")
        };
        assert_eq!(uid, sys::effective_uid());
        assert_eq!(pid, std::process::id() as i32);
        drop(theirs);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, address) = listener.accept().unwrap();
        let peer = Peer::of_socket(accepted.as_fd()).unwrap();
        assert_eq!(peer, Peer::tcp(address));
        assert_eq!(peer, Peer::Tcp(client.local_addr().unwrap()));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(Peer::of_socket(file.as_fd()).is_err(), "not a socket");
    }

    #[test]
    fn client_patterns_are_checked_and_canonical() {
        let canonical = |text: &str| canonical_pattern(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(canonical("CN=alice"), "CN=alice");
        assert_eq!(canonical("cn=alice, o=Example"), "CN=alice,O=Example");
        assert_eq!(canonical("CN=Smith\\, J,O=X"), "CN=Smith\\, J,O=X");
        assert_eq!(canonical("CN=Smith\\2C J, o = X"), "CN=Smith\\, J,O=X");
        assert_eq!(canonical("CN=\\ a\\ "), "CN=\\ a\\ ");
        assert_eq!(canonical("E=a@b,CN=x\\00y"), "EMAILADDRESS=a@b,CN=x\\00y");
        assert_eq!(canonical("2.5.4.3=alice"), "2.5.4.3=alice");
        assert_eq!(canonical("DNS:HV1.Example"), "DNS:hv1.example");
        assert_eq!(canonical("dns:*.example"), "DNS:*.example");
        assert_eq!(canonical("IP:10.0.0.1"), "IP:10.0.0.1");
        assert_eq!(canonical("ip:::1"), "IP:::1");
        assert_eq!(canonical("EMAIL:a@example.org"), "EMAIL:a@example.org");
        assert_eq!(canonical("URI:spiffe://x/y"), "URI:spiffe://x/y");
        assert_eq!(canonical("PSK:alice"), "PSK:alice");
        let subject = ClientPattern::parse("CN=Smith\\, J,O=X").unwrap();
        assert_eq!(
            subject,
            ClientPattern::Subject(vec![
                ("CN".into(), "Smith, J".into()),
                ("O".into(), "X".into())
            ])
        );
        assert!(subject.is_certificate());
        assert!(!ClientPattern::parse("PSK:a").unwrap().is_certificate());
        for bad in [
            "",
            "alice",
            "CN=",
            "=alice",
            "C N=a",
            "CN=a,",
            "CN=a+UID=b",
            "CN=a\\",
            "DNS:",
            "DNS:bad_host!",
            "DNS:a..b",
            "IP:10.0.0.256",
            "EMAIL:nobody",
            "URI:no-scheme",
            "URI:1x:y",
            "PSK:a:b",
            " CN=a",
            "CN=a\n",
            "X509:whatever",
        ] {
            let error = canonical_pattern(bad).unwrap_err();
            assert!(error.starts_with("client pattern"), "{bad}: {error}");
        }
        let long = format!("CN={}", "a".repeat(PATTERN_BYTES_MAX));
        assert!(canonical_pattern(&long).is_err());
    }

    #[test]
    fn canonical_patterns_parse_to_themselves() {
        for text in [
            "CN=a\\,b\\+c,OU=x\\\\y",
            "CN=\\#a\\ ,O=\\C3\\A9t\\01",
            "DNS:*.a.b",
            "IP:fd00::1",
            "PSK:al ice",
        ] {
            let once = canonical_pattern(text).unwrap();
            assert_eq!(canonical_pattern(&once).unwrap(), once, "{text}");
        }
    }

    #[test]
    fn allowlists_are_bounded() {
        assert_eq!(check_entries(ALLOWLIST_ENTRIES_MAX), Ok(()));
        assert!(check_entries(ALLOWLIST_ENTRIES_MAX + 1).is_err());
    }
}
