//! Server configuration and its limits. Everything the data plane allocates is sized from
//! here at startup, with named units.

use std::path::PathBuf;

use crate::access::{ExportPolicy, ListenerPolicy};
use crate::target::backend::{CacheMode, Source};

/// Default in-flight requests per connection.
pub const QUEUE_DEPTH_DEFAULT: u32 = 256;
/// Default registered buffer pool per shard, in MiB.
pub const BUFFER_MIB_DEFAULT: usize = 64;
/// Default TCP port (IANA-assigned to NBD).
pub const NBD_PORT: u16 = 10809;
/// Bytes of each connection's receive buffer (headers, small payloads, handshake options).
pub const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Submission queue entries per shard ring.
pub const RING_ENTRIES: u32 = 1024;
/// Longest a client may take to finish the handshake before it is disconnected.
pub const HANDSHAKE_TIMEOUT_SECONDS: u64 = 30;
/// Longest shutdown waits for in-flight requests before closing connections.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 10;
/// Default limit on open client connections (all listeners, all exports, handshake included).
pub const MAX_CONNECTIONS_DEFAULT: usize = 1024;
/// Largest `max_connections` accepted.
pub const MAX_CONNECTIONS_MAX: usize = 1 << 20;
/// Largest handshake timeout accepted, in seconds.
pub const HANDSHAKE_TIMEOUT_SECONDS_MAX: u64 = 3600;
/// Longest export name or description (the protocol's string limit).
pub const EXPORT_TEXT_BYTES_MAX: usize = crate::target::proto::NAME_BYTES_MAX;

/// One export as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name ("" = default export).
    pub name: String,
    /// Description for NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Where its bytes live.
    pub source: Source,
    /// Refuse writes.
    pub read_only: bool,
    /// Page-cache use.
    pub cache: CacheMode,
    /// Create the file with this many bytes (sparse) if it does not exist (file exports only).
    pub create_bytes: Option<u64>,
    /// Fault injection and power-loss simulation (docs/FAULTS.md).
    pub faults: ExportFaults,
    /// Who may use the export (docs/CONFIGURATION.md "Access control").
    pub policy: ExportPolicy,
}

/// Fault settings of one export, from `[[export]]` keys and the `--fault*` flags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportFaults {
    /// Rules in the grammar of `target::fault` (already checked).
    pub rules: Vec<String>,
    /// Seed of the export's fault generator.
    pub seed: Option<u64>,
    /// Power-loss simulation mode.
    pub power_loss: Option<crate::target::volatile::CutMode>,
    /// Bound of the unflushed-write log, MiB.
    pub power_loss_max_mib: Option<u64>,
}

impl ExportSpec {
    /// Parses `[NAME=]PATH`, where PATH is a file, a block device or `memory:SIZE`.
    pub fn parse(text: &str, read_only: bool, cache: CacheMode) -> Result<ExportSpec, String> {
        let (name, path) = match text.split_once('=') {
            Some((name, path)) => (name, path),
            None => ("", text),
        };
        check_export_name(name).map_err(|error| format!("export '{text}': {error}"))?;
        let source = parse_source(path).map_err(|error| format!("export '{text}': {error}"))?;
        Ok(ExportSpec {
            name: name.to_string(),
            description: String::new(),
            source,
            read_only,
            cache,
            create_bytes: None,
            faults: ExportFaults::default(),
            policy: ExportPolicy::default(),
        })
    }

    /// Whether `other` describes the same export in everything but its access policy: a
    /// reload that changes only the policy can keep the open export (and its data, for
    /// `memory:`) and swap the policy in.
    pub fn same_except_policy(&self, other: &ExportSpec) -> bool {
        let without = |spec: &ExportSpec| ExportSpec {
            policy: ExportPolicy::default(),
            ..spec.clone()
        };
        without(self) == without(other)
    }
}

/// Checks an export name: at most [`EXPORT_TEXT_BYTES_MAX`] bytes, no NUL.
pub fn check_export_name(name: &str) -> Result<(), String> {
    if name.len() > EXPORT_TEXT_BYTES_MAX || name.contains('\0') {
        return Err(format!(
            "export name is longer than {EXPORT_TEXT_BYTES_MAX} bytes or contains NUL"
        ));
    }
    Ok(())
}

/// Parses an export path: `memory:SIZE` or a file or block device path.
pub fn parse_source(path: &str) -> Result<Source, String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    match path.strip_prefix("memory:") {
        Some(size) => Ok(Source::Memory(parse_size(size)?)),
        None => Ok(Source::Path(PathBuf::from(path))),
    }
}

/// Checks a TCP listen address of the form `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`
/// without resolving it (host names are resolved when binding).
pub fn check_address(address: &str) -> Result<(), String> {
    let bad = || format!("'{address}' is not HOST:PORT (IPv6 in brackets: [::1]:10809)");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        inner.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
    } else if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(())
}

/// Parses a unix socket mode given in octal (`0660`, `660`, `0o660`); only permission bits.
pub fn parse_unix_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim().trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("unix mode '{text}' is not an octal number such as 0660"))?;
    check_unix_mode(mode)?;
    Ok(mode)
}

/// Checks that a unix socket mode has only permission bits (`0o777`).
pub fn check_unix_mode(mode: u32) -> Result<(), String> {
    if mode & !0o777 != 0 {
        return Err(format!(
            "unix mode {mode:#o} has bits beyond 0o777 (write it in octal: \"0660\" or 0o660)"
        ));
    }
    Ok(())
}

/// Formats a byte count in the largest binary unit that divides it (`1G`, `1536K`, `100`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Checks that `value` is in `range`; the message names `what` (a key or a flag).
pub fn check_range<T>(
    what: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), String>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(format!(
        "{what} {value} is out of range ({}..={})",
        range.start(),
        range.end()
    ))
}

/// Valid shard counts.
pub const SHARDS_RANGE: std::ops::RangeInclusive<usize> = 1..=1024;
/// Valid per-connection queue depths.
pub const QUEUE_DEPTH_RANGE: std::ops::RangeInclusive<u32> = 1..=4096;
/// Valid buffer pool sizes per shard, in MiB.
pub const BUFFER_MIB_RANGE: std::ops::RangeInclusive<usize> = 32..=65536;
/// Valid connection limits.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 1..=MAX_CONNECTIONS_MAX;
/// Valid per-export connection limits (`export_max_connections`, `max_connections` of an
/// export); 0 means unlimited.
pub const EXPORT_MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 0..=MAX_CONNECTIONS_MAX;
/// Valid handshake timeouts, in seconds.
pub const HANDSHAKE_TIMEOUT_SECONDS_RANGE: std::ops::RangeInclusive<u64> =
    1..=HANDSHAKE_TIMEOUT_SECONDS_MAX;

/// Parses a size such as `512`, `64K`, `100M`, `1G`, `2T` (binary units, optional `iB`/`B`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let stripped = upper.trim_end_matches("IB").trim_end_matches('B');
    let (digits, shift) = match stripped.chars().last() {
        Some('K') => (&stripped[..stripped.len() - 1], 10),
        Some('M') => (&stripped[..stripped.len() - 1], 20),
        Some('G') => (&stripped[..stripped.len() - 1], 30),
        Some('T') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("bad size '{text}'"))?;
    let bytes = value.checked_shl(shift).filter(|b| b >> shift == value);
    match bytes {
        Some(bytes) if bytes > 0 => Ok(bytes),
        Some(_) => Err(format!("size '{text}' must be greater than zero")),
        None => Err(format!("size '{text}' is too large")),
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (`HOST:PORT`).
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

/// `tls` / `--tls`: whether clients may or must use TLS (STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS; STARTTLS is refused.
    #[default]
    Off,
    /// TLS offered; plaintext clients are served (except `tls_only` exports).
    On,
    /// Every client must start TLS before anything else (NBD_REP_ERR_TLS_REQD otherwise).
    Require,
}

impl TlsMode {
    /// The configuration spelling: `off`, `on`, `require`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// `placement` / `--placement`: how the acceptor picks a shard for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// The least-loaded shard; among equals, the one on the CPU that receives the TCP
    /// connection's packets, then one on a CPU that takes the exports' disk interrupts
    /// (lower latency and CPU per request at low queue depth; see `crate::placement`).
    #[default]
    Interrupts,
    /// The least-loaded shard, lowest index among equals (spreads CPU load away from the
    /// interrupt CPU, which can help throughput when the server shares a few CPUs).
    LeastLoaded,
}

/// `tls_kernel` / `--tls-kernel`: kernel TLS offload after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelTls {
    /// Use kTLS when the kernel and the negotiated cipher allow it, else user space.
    #[default]
    Auto,
    /// Always encrypt in user space.
    Off,
}

impl KernelTls {
    /// The configuration spelling: `auto`, `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelTls::Auto => "auto",
            KernelTls::Off => "off",
        }
    }
}

/// TLS settings as configured; the files are read by the TLS layer (at startup and on
/// SIGHUP), not here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Off, on or required.
    pub mode: TlsMode,
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM): when set, clients must present a certificate it signed.
    pub ca: Option<PathBuf>,
    /// Pre-shared keys in the psktool format (`identity:hexkey` per line).
    pub psk: Option<PathBuf>,
    /// Kernel TLS offload.
    pub kernel: KernelTls,
}

/// A broken rule between TLS settings; [`TlsRule::key`] is the key at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRule {
    /// `tls` is on or require, with neither `tls_cert` + `tls_key` nor `tls_psk`.
    NoCredentials,
    /// `tls_cert` without `tls_key`.
    CertificateWithoutKey,
    /// `tls_key` without `tls_cert`.
    KeyWithoutCertificate,
    /// `tls_ca` without `tls_cert` (client certificates need a server certificate).
    CaWithoutCertificate,
}

impl TlsRule {
    /// The `[server]` key at fault.
    pub fn key(self) -> &'static str {
        match self {
            TlsRule::NoCredentials => "tls",
            TlsRule::CertificateWithoutKey => "tls_cert",
            TlsRule::KeyWithoutCertificate => "tls_key",
            TlsRule::CaWithoutCertificate => "tls_ca",
        }
    }

    /// The flag that sets [`TlsRule::key`].
    pub fn flag(self) -> &'static str {
        match self {
            TlsRule::NoCredentials => "--tls",
            TlsRule::CertificateWithoutKey => "--tls-cert",
            TlsRule::KeyWithoutCertificate => "--tls-key",
            TlsRule::CaWithoutCertificate => "--tls-ca",
        }
    }

    /// What is wrong and how to fix it.
    pub fn message(self, mode: TlsMode) -> String {
        match self {
            TlsRule::NoCredentials => format!(
                "TLS mode \"{}\" needs credentials: tls_cert and tls_key (--tls-cert, --tls-key), \
                 or tls_psk (--tls-psk)",
                mode.as_str()
            ),
            TlsRule::CertificateWithoutKey => {
                "tls_cert is set without tls_key (--tls-key): give the certificate's private key"
                    .into()
            }
            TlsRule::KeyWithoutCertificate => {
                "tls_key is set without tls_cert (--tls-cert): give the certificate".into()
            }
            TlsRule::CaWithoutCertificate => "tls_ca (client certificates) needs a server \
                 certificate: set tls_cert and tls_key (--tls-cert, --tls-key)"
                .into(),
        }
    }
}

impl TlsSettings {
    /// Checks the rules between the TLS keys.
    pub fn check(&self) -> Result<(), TlsRule> {
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(TlsRule::CertificateWithoutKey),
            (None, Some(_)) => return Err(TlsRule::KeyWithoutCertificate),
            _ => {}
        }
        if self.ca.is_some() && self.cert.is_none() {
            return Err(TlsRule::CaWithoutCertificate);
        }
        if self.mode != TlsMode::Off && self.cert.is_none() && self.psk.is_none() {
            return Err(TlsRule::NoCredentials);
        }
        Ok(())
    }

    /// Whether any certificate, key, CA or PSK file is given.
    pub fn has_files(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some() || self.psk.is_some()
    }
}

/// A broken rule between an export's access keys and the TLS settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportTlsRule {
    /// `tls_only = true` while `tls` is off.
    TlsOnlyWithoutTls,
    /// `allow_clients` while `tls` is off.
    ClientsWithoutTls,
    /// `allow_clients[N]` is a certificate pattern but `tls_ca` is not set (no client
    /// certificate is requested, so it could never match).
    CertificateWithoutCa(usize),
    /// `allow_clients[N]` is a `PSK:` pattern but `tls_psk` is not set.
    PskWithoutPskFile(usize),
}

impl ExportTlsRule {
    /// The `[[export]]` key at fault (`tls_only`, `allow_clients[N]`).
    pub fn key(self) -> String {
        match self {
            ExportTlsRule::TlsOnlyWithoutTls => "tls_only".into(),
            ExportTlsRule::ClientsWithoutTls => "allow_clients".into(),
            ExportTlsRule::CertificateWithoutCa(index)
            | ExportTlsRule::PskWithoutPskFile(index) => format!("allow_clients[{index}]"),
        }
    }

    /// What is wrong and how to fix it.
    pub fn message(self, policy: &ExportPolicy) -> String {
        let pattern = |index: usize| policy.allow_clients[index].to_string();
        match self {
            ExportTlsRule::TlsOnlyWithoutTls => {
                "tls_only needs TLS, but tls is \"off\" (set tls = \"on\" or \"require\", \
                 or --tls)"
                    .into()
            }
            ExportTlsRule::ClientsWithoutTls => {
                "allow_clients needs TLS, but tls is \"off\" (set tls = \"on\" or \"require\", \
                 or --tls)"
                    .into()
            }
            ExportTlsRule::CertificateWithoutCa(index) => format!(
                "'{}' matches client certificates, but tls_ca (--tls-ca) is not set, so no \
                 client certificate is requested",
                pattern(index)
            ),
            ExportTlsRule::PskWithoutPskFile(index) => format!(
                "'{}' matches a PSK identity, but tls_psk (--tls-psk) is not set",
                pattern(index)
            ),
        }
    }
}

/// Checks an export's access keys against the TLS settings.
pub fn check_export_tls(policy: &ExportPolicy, tls: &TlsSettings) -> Result<(), ExportTlsRule> {
    if tls.mode == TlsMode::Off {
        if policy.tls_only {
            return Err(ExportTlsRule::TlsOnlyWithoutTls);
        }
        if !policy.allow_clients.is_empty() {
            return Err(ExportTlsRule::ClientsWithoutTls);
        }
    }
    for (index, pattern) in policy.allow_clients.iter().enumerate() {
        if pattern.is_certificate() && tls.ca.is_none() {
            return Err(ExportTlsRule::CertificateWithoutCa(index));
        }
        if !pattern.is_certificate() && tls.psk.is_none() {
            return Err(ExportTlsRule::PskWithoutPskFile(index));
        }
    }
    Ok(())
}

/// The whole server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Exports, in order; ids are indexes into this list.
    pub exports: Vec<ExportSpec>,
    /// Listeners to bind (sockets inherited from systemd come on top of these).
    pub listen: Vec<Listen>,
    /// Number of shards (threads with a ring each).
    pub shards: usize,
    /// How new connections are spread over the shards.
    pub placement: Placement,
    /// Maximum in-flight requests per connection.
    pub queue_depth: u32,
    /// Registered buffer pool per shard, MiB.
    pub buffer_mib: usize,
    /// Open client connections allowed at once; the acceptor closes any beyond it.
    pub max_connections: usize,
    /// Longest a client may take to finish the handshake.
    pub handshake_timeout_seconds: u64,
    /// Permission bits of unix sockets this server creates (`None`: as the umask leaves them).
    pub unix_mode: Option<u32>,
    /// TLS (STARTTLS) settings.
    pub tls: TlsSettings,
    /// Who may connect at all, checked when a connection is accepted.
    pub listener_policy: ListenerPolicy,
}

impl Config {
    /// Checks cross-field rules; returns a message naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.exports.is_empty() {
            return Err("no exports: give at least one EXPORT ([NAME=]PATH or memory:SIZE)".into());
        }
        for (index, export) in self.exports.iter().enumerate() {
            if self.exports[..index]
                .iter()
                .any(|other| other.name == export.name)
            {
                return Err(format!("export name '{}' is used twice", export.name));
            }
            check_export_name(&export.name)?;
            if export.description.len() > EXPORT_TEXT_BYTES_MAX {
                return Err(format!(
                    "export '{}': the description is longer than {EXPORT_TEXT_BYTES_MAX} bytes",
                    export.name
                ));
            }
            if export.create_bytes.is_some() && matches!(export.source, Source::Memory(_)) {
                return Err(format!(
                    "export '{}': a size to create applies to files, not memory:SIZE",
                    export.name
                ));
            }
        }
        // An empty list is fine only under socket activation; the caller adds the default
        // listener otherwise (see `config_file::resolve`).
        for listen in &self.listen {
            if let Listen::Tcp(address) = listen {
                check_address(address).map_err(|error| format!("--listen: {error}"))?;
            }
        }
        check_range("--shards", self.shards, SHARDS_RANGE)?;
        check_range("--queue-depth", self.queue_depth, QUEUE_DEPTH_RANGE)?;
        check_range("--buffer-mib", self.buffer_mib, BUFFER_MIB_RANGE)?;
        check_range(
            "--max-connections",
            self.max_connections,
            MAX_CONNECTIONS_RANGE,
        )?;
        check_range(
            "--handshake-timeout-seconds",
            self.handshake_timeout_seconds,
            HANDSHAKE_TIMEOUT_SECONDS_RANGE,
        )?;
        if let Some(mode) = self.unix_mode {
            check_unix_mode(mode)?;
        }
        self.validate_access()
    }

    /// The TLS and access-control part of [`Config::validate`].
    fn validate_access(&self) -> Result<(), String> {
        let tls = &self.tls;
        if let Err(rule) = tls.check() {
            return Err(rule.message(tls.mode));
        }
        let policy = &self.listener_policy;
        crate::access::check_entries(policy.allow.len()).map_err(|e| format!("allow: {e}"))?;
        crate::access::check_entries(policy.allow_uids.len())
            .map_err(|e| format!("allow_uids: {e}"))?;
        for export in &self.exports {
            let policy = &export.policy;
            let name = &export.name;
            for (key, count) in [
                ("allow", policy.allow.len()),
                ("allow_uids", policy.allow_uids.len()),
                ("allow_clients", policy.allow_clients.len()),
            ] {
                crate::access::check_entries(count)
                    .map_err(|error| format!("export '{name}': {key}: {error}"))?;
            }
            if let Some(limit) = policy.max_connections {
                // 0 (unlimited) is stored as `None`.
                check_range("max_connections", limit as usize, MAX_CONNECTIONS_RANGE)
                    .map_err(|error| format!("export '{name}': {error}"))?;
            }
            check_export_tls(policy, tls).map_err(|rule| {
                format!("export '{name}': {}: {}", rule.key(), rule.message(policy))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn exports_parse_names_and_memory() {
        let spec = ExportSpec::parse("vm1=memory:1G", false, CacheMode::Direct).unwrap();
        assert_eq!(spec.name, "vm1");
        assert_eq!(spec.source, Source::Memory(1 << 30));
        let spec = ExportSpec::parse("/srv/disk.img", true, CacheMode::Writeback).unwrap();
        assert_eq!(spec.name, "");
        assert_eq!(spec.source, Source::Path("/srv/disk.img".into()));
        assert!(spec.read_only);
        assert!(ExportSpec::parse("a=", false, CacheMode::Direct).is_err());
    }

    #[test]
    fn addresses_are_checked_without_resolving() {
        for good in [
            "127.0.0.1:10809",
            "[::]:10809",
            "[::1]:1",
            "localhost:10809",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
        for bad in [
            "not-an-address",
            ":10809",
            "[::1:10809",
            "::1:10809",
            "a:99999",
            "a:",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_modes_are_octal_permission_bits() {
        assert_eq!(parse_unix_mode("0660"), Ok(0o660));
        assert_eq!(parse_unix_mode("600"), Ok(0o600));
        assert_eq!(parse_unix_mode("0o777"), Ok(0o777));
        assert!(parse_unix_mode("4755").is_err());
        assert!(parse_unix_mode("0668").is_err());
        assert!(check_unix_mode(660).is_err(), "decimal 660 is 0o1224");
    }

    #[test]
    fn sizes_format_in_the_largest_exact_unit() {
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(100), "100");
        for bytes in [1u64 << 30, 1536 << 10, 100, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn tls_rules_name_the_key_at_fault() {
        let cert = Some(PathBuf::from("/c"));
        let base = TlsSettings::default();
        assert_eq!(base.check(), Ok(()));
        let require = TlsSettings {
            mode: TlsMode::Require,
            ..base.clone()
        };
        assert_eq!(require.check(), Err(TlsRule::NoCredentials));
        let psk = TlsSettings {
            psk: cert.clone(),
            ..require.clone()
        };
        assert_eq!(psk.check(), Ok(()));
        let half = TlsSettings {
            cert: cert.clone(),
            ..require.clone()
        };
        assert_eq!(half.check(), Err(TlsRule::CertificateWithoutKey));
        let key_only = TlsSettings {
            key: cert.clone(),
            ..base.clone()
        };
        assert_eq!(key_only.check(), Err(TlsRule::KeyWithoutCertificate));
        let ca_with_psk = TlsSettings {
            ca: cert.clone(),
            ..psk.clone()
        };
        assert_eq!(ca_with_psk.check(), Err(TlsRule::CaWithoutCertificate));
        assert_eq!(TlsRule::CaWithoutCertificate.key(), "tls_ca");
        assert_eq!(TlsRule::NoCredentials.flag(), "--tls");
        let full = TlsSettings {
            key: cert.clone(),
            ca: cert.clone(),
            ..half
        };
        assert_eq!(full.check(), Ok(()));
        assert!(
            TlsRule::NoCredentials
                .message(TlsMode::On)
                .contains("\"on\"")
        );
    }

    #[test]
    fn export_tls_rules_follow_the_server_settings() {
        let patterns = |list: &[&str]| {
            let parse = |text: &&str| crate::access::ClientPattern::parse(text).unwrap();
            list.iter().map(parse).collect()
        };
        let mut policy = ExportPolicy {
            tls_only: true,
            ..ExportPolicy::default()
        };
        let off = TlsSettings::default();
        assert_eq!(
            check_export_tls(&policy, &off),
            Err(ExportTlsRule::TlsOnlyWithoutTls)
        );
        let psk_only = TlsSettings {
            mode: TlsMode::On,
            psk: Some("/p".into()),
            ..off.clone()
        };
        assert_eq!(check_export_tls(&policy, &psk_only), Ok(()));
        policy.tls_only = false;
        policy.allow_clients = patterns(&["PSK:a", "CN=x"]);
        assert_eq!(
            check_export_tls(&policy, &off),
            Err(ExportTlsRule::ClientsWithoutTls)
        );
        let rule = check_export_tls(&policy, &psk_only).unwrap_err();
        assert_eq!(rule, ExportTlsRule::CertificateWithoutCa(1));
        assert_eq!(rule.key(), "allow_clients[1]");
        assert!(rule.message(&policy).contains("'CN=x'"));
        let certificates = TlsSettings {
            mode: TlsMode::Require,
            cert: Some("/c".into()),
            key: Some("/k".into()),
            ca: Some("/ca".into()),
            ..off.clone()
        };
        assert_eq!(
            check_export_tls(&policy, &certificates),
            Err(ExportTlsRule::PskWithoutPskFile(0))
        );
        let both = TlsSettings {
            psk: Some("/p".into()),
            ..certificates
        };
        assert_eq!(check_export_tls(&policy, &both), Ok(()));
    }

    #[test]
    fn a_policy_change_makes_specs_unequal_but_the_same_export() {
        let spec = ExportSpec::parse("vm1=memory:1G", false, CacheMode::Direct).unwrap();
        let mut changed = spec.clone();
        changed.policy.allow_uids = vec![1000];
        assert_ne!(spec, changed, "a reload must see the new policy");
        assert!(spec.same_except_policy(&changed));
        let mut other = changed.clone();
        other.read_only = true;
        assert!(!spec.same_except_policy(&other));
    }
}
