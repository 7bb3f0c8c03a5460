//! The TOML configuration file (`ringbd serve --config FILE`, `ringbd check-config FILE`): its
//! schema, loading with errors that name the key and the line, and merging with the command
//! line into the effective [`Settings`].
//!
//! # Schema
//!
//! One `[server]` table and any number of `[[export]]` tables; `docs/CONFIGURATION.md`
//! documents every key. Unknown keys are errors (`deny_unknown_fields`), and every value is
//! checked while it is deserialized, so an error carries the span of the offending value.
//!
//! # Precedence
//!
//! Built-in defaults < the file < command-line flags, key by key. Two exceptions are
//! additive: `EXPORT` arguments are appended to the file's exports, and `--read-only`
//! makes every export read-only. `--cache` overrides every export's cache mode; `--create`
//! is the creation size of every file export that has no `size` of its own.
//!
//! # Error contract
//!
//! [`load`] and [`parse`] return a [`ConfigError`] with the file name, 1-based line and
//! column, the key path (`server.shards`, `export[1].path`) when known, the message, and the
//! offending source line. [`resolve`] returns plain messages naming the flag or key.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use crate::access::{self, ClientPattern, ExportPolicy, ListenerPolicy};
use crate::config::{self, Config, ExportSpec, KernelTls, Listen, Placement, TlsMode, TlsSettings};
use crate::target::backend::{CacheMode, Source};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The `[server]` table.
    #[serde(default)]
    pub server: ServerTable,
    /// The `[[export]]` tables, in order.
    #[serde(default, rename = "export", skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportTable>,
    /// The text it was parsed from, so that rules checked after merging with the command
    /// line ([`resolve`]) can still name the line (`None` when built in code).
    #[serde(skip)]
    pub source: Option<Arc<SourceText>>,
}

/// A configuration file's name and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceText {
    /// The file as named by the user.
    pub file: String,
    /// Its contents.
    pub text: String,
}

/// The `[server]` table. Every key is optional; absent keys take the default or the flag.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTable {
    /// TCP listeners, `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<Address>>,
    /// A unix socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
    /// Permission bits of the unix socket (`"0660"` or `0o660`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_mode: Option<Mode>,
    /// Shards (threads with an io_uring each).
    #[serde(
        default,
        deserialize_with = "shards",
        skip_serializing_if = "Option::is_none"
    )]
    pub shards: Option<usize>,
    /// Shard choice for new connections: `interrupts` or `least-loaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSetting>,
    /// Prometheus endpoint, `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Address>,
    /// In-flight requests per connection.
    #[serde(
        default,
        deserialize_with = "queue_depth",
        skip_serializing_if = "Option::is_none"
    )]
    pub queue_depth: Option<u32>,
    /// Registered buffer pool per shard, MiB.
    #[serde(
        default,
        deserialize_with = "buffer_mib",
        skip_serializing_if = "Option::is_none"
    )]
    pub buffer_mib: Option<usize>,
    /// Default cache mode of exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSetting>,
    /// Default read-only flag of exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Log filter (`info`, `ringbd=debug`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// Log format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Where to write the process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// User to switch to after binding and opening exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Group to switch to (default: the user's primary group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Open client connections allowed at once.
    #[serde(
        default,
        deserialize_with = "max_connections",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to finish the handshake.
    #[serde(
        default,
        deserialize_with = "handshake_timeout_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub handshake_timeout_seconds: Option<u64>,
    /// `off`, `on` or `require`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Spanned<TlsSetting>>,
    /// Server certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<Spanned<FilePath>>,
    /// Private key of `tls_cert` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<Spanned<FilePath>>,
    /// CA certificates: require and verify client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<Spanned<FilePath>>,
    /// Pre-shared keys, psktool format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_psk: Option<Spanned<FilePath>>,
    /// Kernel TLS offload: `auto` or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_kernel: Option<KernelTlsSetting>,
    /// Listener-wide allowlist of TCP client networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<CidrList>,
    /// Listener-wide allowlist of unix-socket client users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_uids: Option<UidList>,
    /// Default connection limit of every export (0: unlimited).
    #[serde(
        default,
        deserialize_with = "export_max_connections",
        skip_serializing_if = "Option::is_none"
    )]
    pub export_max_connections: Option<u32>,
}

/// One `[[export]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTable {
    /// Export name (`""` is the default export).
    pub name: Spanned<ExportName>,
    /// A file, a block device or `memory:SIZE`.
    pub path: ExportPath,
    /// NBD_INFO_DESCRIPTION.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Description>,
    /// Refuse writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Page-cache mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSetting>,
    /// Size of the sparse file to create when `path` does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Spanned<Size>>,
    /// Fault rules (docs/FAULTS.md), e.g. `["error:write:errno=EIO,p=0.01"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Vec<FaultRule>>,
    /// Seed of the export's fault generator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_seed: Option<u64>,
    /// Power-loss simulation: `"drop"` or `"torn"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_loss: Option<PowerLossSetting>,
    /// Bound of the unflushed-write log, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_loss_max_mib: Option<u64>,
    /// Refuse plaintext clients (and hide the export from their LIST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_only: Option<Spanned<bool>>,
    /// TCP client networks that may use the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<CidrList>,
    /// Unix-socket client users that may use the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_uids: Option<UidList>,
    /// TLS client identities that may use the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_clients: Option<Spanned<PatternList>>,
    /// Clients using the export at once (0: unlimited); overrides `export_max_connections`.
    #[serde(
        default,
        deserialize_with = "export_max_connections",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_connections: Option<u32>,
}

/// `tls = "off" | "on" | "require"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    /// No TLS.
    Off,
    /// TLS offered.
    On,
    /// TLS required.
    Require,
}

impl From<TlsSetting> for TlsMode {
    fn from(setting: TlsSetting) -> TlsMode {
        match setting {
            TlsSetting::Off => TlsMode::Off,
            TlsSetting::On => TlsMode::On,
            TlsSetting::Require => TlsMode::Require,
        }
    }
}

impl From<TlsMode> for TlsSetting {
    fn from(mode: TlsMode) -> TlsSetting {
        match mode {
            TlsMode::Off => TlsSetting::Off,
            TlsMode::On => TlsSetting::On,
            TlsMode::Require => TlsSetting::Require,
        }
    }
}

/// `placement = "interrupts" | "least-loaded"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementSetting {
    /// Least-loaded, then a shard on a disk-interrupt CPU.
    Interrupts,
    /// Least-loaded only.
    LeastLoaded,
}

impl From<PlacementSetting> for Placement {
    fn from(setting: PlacementSetting) -> Placement {
        match setting {
            PlacementSetting::Interrupts => Placement::Interrupts,
            PlacementSetting::LeastLoaded => Placement::LeastLoaded,
        }
    }
}

impl From<Placement> for PlacementSetting {
    fn from(placement: Placement) -> PlacementSetting {
        match placement {
            Placement::Interrupts => PlacementSetting::Interrupts,
            Placement::LeastLoaded => PlacementSetting::LeastLoaded,
        }
    }
}

/// `tls_kernel = "auto" | "off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelTlsSetting {
    /// kTLS when available.
    Auto,
    /// User-space encryption only.
    Off,
}

impl From<KernelTlsSetting> for KernelTls {
    fn from(setting: KernelTlsSetting) -> KernelTls {
        match setting {
            KernelTlsSetting::Auto => KernelTls::Auto,
            KernelTlsSetting::Off => KernelTls::Off,
        }
    }
}

impl From<KernelTls> for KernelTlsSetting {
    fn from(kernel: KernelTls) -> KernelTlsSetting {
        match kernel {
            KernelTls::Auto => KernelTlsSetting::Auto,
            KernelTls::Off => KernelTlsSetting::Off,
        }
    }
}

/// A non-empty file path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FilePath(pub PathBuf);

impl<'de> Deserialize<'de> for FilePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let check = |text: &str| match text.trim().is_empty() {
            true => Err("the path is empty".to_string()),
            false => Ok(()),
        };
        checked_string(deserializer, check, |text| FilePath(PathBuf::from(text)))
    }
}

/// One checked `allow` entry: a CIDR network or a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        access::parse_net(&text)
            .map(Cidr)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// One checked `allow_uids` entry: a uid, or a user name resolved when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uid(pub u32);

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uid = match TextOrInteger::deserialize(deserializer)? {
            TextOrInteger::Text(text) => access::parse_uid(&text),
            TextOrInteger::Integer(value) => {
                u32::try_from(value).map_err(|_| format!("uid {value} is out of range"))
            }
        };
        uid.map(Uid).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Uid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.0)
    }
}

/// One `allow_clients` pattern, parsed; written back in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(pub ClientPattern);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ClientPattern::parse(&text)
            .map(Pattern)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Declares a bounded list type (at most [`access::ALLOWLIST_ENTRIES_MAX`] entries).
macro_rules! bounded_list {
    ($(#[$doc:meta])* $name:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub Vec<$item>);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let items = Vec::<$item>::deserialize(deserializer)?;
                access::check_entries(items.len()).map_err(serde::de::Error::custom)?;
                Ok($name(items))
            }
        }
    };
}

bounded_list!(
    /// An `allow` list.
    CidrList,
    Cidr
);
bounded_list!(
    /// An `allow_uids` list.
    UidList,
    Uid
);
bounded_list!(
    /// An `allow_clients` list (each entry spanned, for errors found after merging).
    PatternList,
    Spanned<Pattern>
);

/// A checked fault rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FaultRule(pub String);

impl<'de> Deserialize<'de> for FaultRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let check = |text: &str| crate::target::fault::Rule::parse(text).map(drop);
        checked_string(deserializer, check, FaultRule)
    }
}

/// `power_loss = "drop" | "torn"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerLossSetting {
    /// Every unflushed write is lost.
    Drop,
    /// A seeded subset of unflushed sectors survives.
    Torn,
}

impl From<PowerLossSetting> for crate::target::volatile::CutMode {
    fn from(setting: PowerLossSetting) -> Self {
        match setting {
            PowerLossSetting::Drop => crate::target::volatile::CutMode::Drop,
            PowerLossSetting::Torn => crate::target::volatile::CutMode::Torn,
        }
    }
}

impl From<crate::target::volatile::CutMode> for PowerLossSetting {
    fn from(mode: crate::target::volatile::CutMode) -> Self {
        match mode {
            crate::target::volatile::CutMode::Drop => PowerLossSetting::Drop,
            crate::target::volatile::CutMode::Torn => PowerLossSetting::Torn,
        }
    }
}

/// A checked `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Address(pub String);

/// A checked export name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ExportName(pub String);

/// A checked export path, kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ExportPath(pub String);

/// A checked export description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Description(pub String);

/// A checked log filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LogLevel(pub String);

/// A size in bytes, written `"10G"` or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// Unix socket permission bits, written `"0660"` or `0o660`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

/// `cache = "direct" | "writeback"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSetting {
    /// O_DIRECT.
    Direct,
    /// Through the page cache.
    Writeback,
}

impl From<CacheSetting> for CacheMode {
    fn from(setting: CacheSetting) -> CacheMode {
        match setting {
            CacheSetting::Direct => CacheMode::Direct,
            CacheSetting::Writeback => CacheMode::Writeback,
        }
    }
}

impl From<CacheMode> for CacheSetting {
    fn from(mode: CacheMode) -> CacheSetting {
        match mode {
            CacheMode::Direct => CacheSetting::Direct,
            CacheMode::Writeback => CacheSetting::Writeback,
        }
    }
}

/// `log_format = "text" | "json"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Deserializes a string and checks it with `check`.
fn checked_string<'de, D, T>(
    deserializer: D,
    check: impl FnOnce(&str) -> Result<(), String>,
    wrap: impl FnOnce(String) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    check(&text).map_err(serde::de::Error::custom)?;
    Ok(wrap(text))
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_string(deserializer, config::check_address, Address)
    }
}

impl<'de> Deserialize<'de> for ExportName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_string(deserializer, config::check_export_name, ExportName)
    }
}

impl<'de> Deserialize<'de> for ExportPath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let check = |text: &str| config::parse_source(text).map(drop);
        checked_string(deserializer, check, ExportPath)
    }
}

impl<'de> Deserialize<'de> for Description {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let check = |text: &str| {
            if text.len() > config::EXPORT_TEXT_BYTES_MAX {
                return Err(format!(
                    "the description is longer than {} bytes",
                    config::EXPORT_TEXT_BYTES_MAX
                ));
            }
            Ok(())
        };
        checked_string(deserializer, check, Description)
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_string(deserializer, check_log_level, LogLevel)
    }
}

/// Checks a log filter (`info`, `warn,ringbd=debug`, ...) the way the logger will parse it.
pub fn check_log_level(text: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(drop)
        .map_err(|error| format!("log level '{text}' is not a valid filter: {error}"))
}

/// A string or an integer, for keys that accept both.
#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrInteger {
    Text(String),
    Integer(i64),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = match TextOrInteger::deserialize(deserializer)? {
            TextOrInteger::Text(text) => config::parse_size(&text),
            TextOrInteger::Integer(value) => u64::try_from(value)
                .ok()
                .filter(|bytes| *bytes > 0)
                .ok_or_else(|| format!("size {value} must be greater than zero")),
        };
        bytes.map(Size).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&config::format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mode = match TextOrInteger::deserialize(deserializer)? {
            TextOrInteger::Text(text) => config::parse_unix_mode(&text),
            TextOrInteger::Integer(value) => u32::try_from(value)
                .map_err(|_| format!("unix mode {value} is out of range"))
                .and_then(|mode| config::check_unix_mode(mode).map(|()| mode)),
        };
        mode.map(Mode).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:04o}", self.0))
    }
}

/// Deserializes a number and checks it against `range`.
fn number_in<'de, D, T>(deserializer: D, range: RangeInclusive<T>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + fmt::Display + Copy,
{
    let value = T::deserialize(deserializer)?;
    config::check_range("value", value, range).map_err(serde::de::Error::custom)?;
    Ok(Some(value))
}

fn shards<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    number_in(deserializer, config::SHARDS_RANGE)
}

fn queue_depth<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    number_in(deserializer, config::QUEUE_DEPTH_RANGE)
}

fn buffer_mib<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    number_in(deserializer, config::BUFFER_MIB_RANGE)
}

fn max_connections<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    number_in(deserializer, config::MAX_CONNECTIONS_RANGE)
}

fn export_max_connections<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    let limit = number_in(deserializer, config::EXPORT_MAX_CONNECTIONS_RANGE)?;
    Ok(limit.map(|limit| u32::try_from(limit).expect("the range fits in u32")))
}

fn handshake_timeout_seconds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    number_in(deserializer, config::HANDSHAKE_TIMEOUT_SECONDS_RANGE)
}

/// An error in a configuration file, located to the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as named by the user.
    pub file: String,
    /// 1-based line and column of the offending text, when known.
    pub position: Option<(usize, usize)>,
    /// Key path such as `server.shards` or `export[1].path`, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The offending line of the file, for display.
    pub source_line: Option<String>,
    /// Characters of the offending text on that line (at least 1).
    pub width: usize,
}

impl ConfigError {
    fn at(text: &str, file: &str, span: Option<Range<usize>>, key: Option<String>) -> Self {
        let position = span.clone().map(|span| line_column(text, span.start));
        let source_line = position.and_then(|(line, _)| text.lines().nth(line - 1));
        let width = match (span, position, source_line) {
            (Some(span), Some((_, column)), Some(source)) => {
                let on_line = source.chars().count().saturating_sub(column - 1);
                let spanned = text.get(span).map_or(1, |spanned| spanned.chars().count());
                spanned.min(on_line).max(1)
            }
            _ => 1,
        };
        ConfigError {
            file: file.to_string(),
            position,
            key,
            message: String::new(),
            source_line: source_line.map(str::to_string),
            width,
        }
    }

    fn with_message(mut self, message: impl Into<String>) -> Box<Self> {
        self.message = message.into();
        Box::new(self)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ", line {line}, column {column}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)?;
        if let (Some((line, column)), Some(source)) = (self.position, &self.source_line) {
            let gutter = line.to_string().len();
            write!(f, "\n {line} | {source}")?;
            let pad = column - 1;
            let carets = "^".repeat(self.width);
            write!(f, "\n {:gutter$} | {:pad$}{carets}", "", "")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, Box<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        Box::new(ConfigError {
            file: file.clone(),
            position: None,
            key: None,
            message: format!("cannot read the configuration file: {error}"),
            source_line: None,
            width: 1,
        })
    })?;
    parse(&text, &file)
}

/// Parses configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<FileConfig, Box<ConfigError>> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| {
        ConfigError::at(text, file, error.span(), None).with_message(error.message())
    })?;
    let mut parsed: FileConfig =
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            // `Spanned` values deserialize through a private field; it is not a key.
            let key = error
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let key = (key != ".").then_some(key);
            let inner = error.into_inner();
            ConfigError::at(text, file, inner.span(), key).with_message(inner.message())
        })?;
    check_exports(&parsed, text, file)?;
    parsed.source = Some(Arc::new(SourceText {
        file: file.to_string(),
        text: text.to_string(),
    }));
    Ok(parsed)
}

/// Rules across keys: unique names, `size` only for files.
fn check_exports(parsed: &FileConfig, text: &str, file: &str) -> Result<(), Box<ConfigError>> {
    for (index, export) in parsed.exports.iter().enumerate() {
        let name = &export.name.get_ref().0;
        let earlier = parsed.exports[..index]
            .iter()
            .find(|other| other.name.get_ref().0 == *name);
        if let Some(earlier) = earlier {
            let (line, _) = line_column(text, earlier.name.span().start);
            let key = Some(format!("export[{index}].name"));
            return Err(
                ConfigError::at(text, file, Some(export.name.span()), key).with_message(format!(
                    "export name '{name}' is already used on line {line}"
                )),
            );
        }
        if let Some(size) = &export.size
            && export.path.0.starts_with("memory:")
        {
            let key = Some(format!("export[{index}].size"));
            return Err(
                ConfigError::at(text, file, Some(size.span()), key).with_message(
                    "size creates missing files; a memory export takes its size in path = \
                 \"memory:SIZE\"",
                ),
            );
        }
    }
    Ok(())
}

/// Command-line values that override the file (`None`/empty: not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `EXPORT` arguments (`[NAME=]PATH`), appended to the file's exports.
    pub exports: Vec<String>,
    /// `--listen` (replaces `server.listen`).
    pub listen: Vec<String>,
    /// `--unix`.
    pub unix: Option<PathBuf>,
    /// `--unix-mode`.
    pub unix_mode: Option<u32>,
    /// `--read-only`: every export read-only.
    pub read_only: bool,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--placement`.
    pub placement: Option<Placement>,
    /// `--cache`: every export.
    pub cache: Option<CacheMode>,
    /// `--queue-depth`.
    pub queue_depth: Option<u32>,
    /// `--buffer-mib`.
    pub buffer_mib: Option<usize>,
    /// `--create SIZE`: creation size of file exports without their own `size`.
    pub create_bytes: Option<u64>,
    /// `--metrics`.
    pub metrics: Option<String>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--user`.
    pub user: Option<String>,
    /// `--group`.
    pub group: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--max-connections`.
    pub max_connections: Option<usize>,
    /// `--handshake-timeout-seconds`.
    pub handshake_timeout_seconds: Option<u64>,
    /// `--tls`.
    pub tls: Option<TlsMode>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--tls-psk`.
    pub tls_psk: Option<PathBuf>,
    /// `--tls-kernel`.
    pub tls_kernel: Option<KernelTls>,
    /// `--allow` (replaces `server.allow`).
    pub allow: Vec<IpNet>,
    /// `--allow-uid` (replaces `server.allow_uids`).
    pub allow_uids: Vec<u32>,
    /// `--export-max-connections` (0: unlimited): replaces `server.export_max_connections`,
    /// the default of exports without their own `max_connections`.
    pub export_max_connections: Option<u32>,
}

/// Why [`resolve`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// A rule broken by values from the file, located there.
    File(Box<ConfigError>),
    /// Anything else; the message names the flag or key.
    Message(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::File(error) => error.fmt(f),
            ResolveError::Message(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ResolveError {}

impl From<String> for ResolveError {
    fn from(message: String) -> ResolveError {
        ResolveError::Message(message)
    }
}

/// Facts about the host that defaults depend on.
#[derive(Debug, Clone, Copy)]
pub struct Environment {
    /// Online cores: the default shard count.
    pub cores: usize,
    /// Listening sockets were inherited from systemd (then no default listener is added).
    pub socket_activated: bool,
}

/// The effective configuration: the data plane's [`Config`] plus process settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What the server runs with.
    pub config: Config,
    /// Prometheus endpoint.
    pub metrics: Option<String>,
    /// PID file.
    pub pid_file: Option<PathBuf>,
    /// User to switch to.
    pub user: Option<String>,
    /// Group to switch to.
    pub group: Option<String>,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}

/// The default log filter.
pub const LOG_LEVEL_DEFAULT: &str = "info";

/// Merges the file (if any) and the command line into checked settings.
pub fn resolve(
    file: Option<&FileConfig>,
    overrides: &Overrides,
    environment: Environment,
) -> Result<Settings, ResolveError> {
    let empty = FileConfig::default();
    let file = file.unwrap_or(&empty);
    let server = &file.server;
    let config = data_plane_config(file, overrides, environment)?;
    check_access(file, overrides, &config)?;
    config.validate()?;
    let metrics = overrides
        .metrics
        .clone()
        .or(server.metrics.as_ref().map(|address| address.0.clone()));
    if let Some(address) = &metrics {
        config::check_address(address).map_err(|error| format!("--metrics: {error}"))?;
    }
    let log_level = overrides
        .log_level
        .clone()
        .or(server.log_level.as_ref().map(|level| level.0.clone()))
        .unwrap_or_else(|| LOG_LEVEL_DEFAULT.to_string());
    check_log_level(&log_level).map_err(|error| format!("--log-level: {error}"))?;
    Ok(Settings {
        config,
        metrics,
        pid_file: overrides.pid_file.clone().or(server.pid_file.clone()),
        user: overrides.user.clone().or(server.user.clone()),
        group: overrides.group.clone().or(server.group.clone()),
        log_level,
        log_format: overrides
            .log_format
            .or(server.log_format)
            .unwrap_or_default(),
    })
}

/// The [`Config`] part of [`resolve`]: exports (the file's, then the flags'), listeners and
/// limits.
fn data_plane_config(
    file: &FileConfig,
    overrides: &Overrides,
    environment: Environment,
) -> Result<Config, String> {
    let server = &file.server;
    let mut exports = Vec::new();
    for table in &file.exports {
        exports.push(export_from_table(table, server, overrides)?);
    }
    for text in &overrides.exports {
        let cache = overrides
            .cache
            .or(server.cache.map(CacheMode::from))
            .unwrap_or_default();
        let read_only = overrides.read_only || server.read_only.unwrap_or(false);
        let mut spec = ExportSpec::parse(text, read_only, cache)?;
        if matches!(spec.source, Source::Path(_)) {
            spec.create_bytes = overrides.create_bytes;
        }
        spec.policy.max_connections = export_limit(None, server, overrides);
        exports.push(spec);
    }
    Ok(Config {
        exports,
        listen: listeners(server, overrides, environment),
        shards: overrides
            .shards
            .or(server.shards)
            .unwrap_or(environment.cores),
        placement: overrides
            .placement
            .or(server.placement.map(Into::into))
            .unwrap_or_default(),
        queue_depth: overrides
            .queue_depth
            .or(server.queue_depth)
            .unwrap_or(config::QUEUE_DEPTH_DEFAULT),
        buffer_mib: overrides
            .buffer_mib
            .or(server.buffer_mib)
            .unwrap_or(config::BUFFER_MIB_DEFAULT),
        max_connections: overrides
            .max_connections
            .or(server.max_connections)
            .unwrap_or(config::MAX_CONNECTIONS_DEFAULT),
        handshake_timeout_seconds: overrides
            .handshake_timeout_seconds
            .or(server.handshake_timeout_seconds)
            .unwrap_or(config::HANDSHAKE_TIMEOUT_SECONDS),
        unix_mode: overrides.unix_mode.or(server.unix_mode.map(|mode| mode.0)),
        tls: tls_settings(server, overrides),
        listener_policy: ListenerPolicy {
            allow: if overrides.allow.is_empty() {
                nets(server.allow.as_ref())
            } else {
                overrides.allow.clone()
            },
            allow_uids: if overrides.allow_uids.is_empty() {
                uids(server.allow_uids.as_ref())
            } else {
                overrides.allow_uids.clone()
            },
        },
    })
}

fn tls_settings(server: &ServerTable, overrides: &Overrides) -> TlsSettings {
    let path = |flag: &Option<PathBuf>, key: &Option<Spanned<FilePath>>| {
        flag.clone()
            .or_else(|| key.as_ref().map(|path| path.get_ref().0.clone()))
    };
    TlsSettings {
        mode: overrides
            .tls
            .or(server.tls.as_ref().map(|mode| (*mode.get_ref()).into()))
            .unwrap_or_default(),
        cert: path(&overrides.tls_cert, &server.tls_cert),
        key: path(&overrides.tls_key, &server.tls_key),
        ca: path(&overrides.tls_ca, &server.tls_ca),
        psk: path(&overrides.tls_psk, &server.tls_psk),
        kernel: overrides
            .tls_kernel
            .or(server.tls_kernel.map(Into::into))
            .unwrap_or_default(),
    }
}

fn nets(list: Option<&CidrList>) -> Vec<IpNet> {
    list.map(|list| list.0.iter().map(|cidr| cidr.0).collect())
        .unwrap_or_default()
}

fn uids(list: Option<&UidList>) -> Vec<u32> {
    list.map(|list| list.0.iter().map(|uid| uid.0).collect())
        .unwrap_or_default()
}

/// The connection limit of an export: its own, else the default (flag, then file); 0 is
/// unlimited.
fn export_limit(own: Option<u32>, server: &ServerTable, overrides: &Overrides) -> Option<u32> {
    own.or(overrides.export_max_connections)
        .or(server.export_max_connections)
        .filter(|limit| *limit > 0)
}

/// The TLS and access rules across keys, checked on the merged values; a rule broken by a
/// value from the file names its line, one broken by a flag names the flag.
fn check_access(
    file: &FileConfig,
    overrides: &Overrides,
    config: &Config,
) -> Result<(), ResolveError> {
    let server = &file.server;
    let tls = &config.tls;
    if let Err(rule) = tls.check() {
        let span = |flag_given: bool, key: &Option<Spanned<FilePath>>| {
            key.as_ref().filter(|_| !flag_given).map(Spanned::span)
        };
        let span = match rule {
            config::TlsRule::NoCredentials => server
                .tls
                .as_ref()
                .filter(|_| overrides.tls.is_none())
                .map(Spanned::span),
            config::TlsRule::CertificateWithoutKey => {
                span(overrides.tls_cert.is_some(), &server.tls_cert)
            }
            config::TlsRule::KeyWithoutCertificate => {
                span(overrides.tls_key.is_some(), &server.tls_key)
            }
            config::TlsRule::CaWithoutCertificate => {
                span(overrides.tls_ca.is_some(), &server.tls_ca)
            }
        };
        let key = format!("server.{}", rule.key());
        return Err(blame(file, span, key, rule.flag(), rule.message(tls.mode)));
    }
    // The file's exports come first in `config.exports`, in order.
    for (index, (table, spec)) in file.exports.iter().zip(&config.exports).enumerate() {
        let Err(rule) = config::check_export_tls(&spec.policy, tls) else {
            continue;
        };
        let patterns = table.allow_clients.as_ref();
        let span = match rule {
            config::ExportTlsRule::TlsOnlyWithoutTls => table.tls_only.as_ref().map(Spanned::span),
            config::ExportTlsRule::ClientsWithoutTls => patterns.map(Spanned::span),
            config::ExportTlsRule::CertificateWithoutCa(item)
            | config::ExportTlsRule::PskWithoutPskFile(item) => {
                patterns.map(|list| list.get_ref().0[item].span())
            }
        };
        let key = format!("export[{index}].{}", rule.key());
        let message = format!("export '{}': {}", spec.name, rule.message(&spec.policy));
        return Err(blame(file, span, key.clone(), &key, message));
    }
    Ok(())
}

/// A located error when `span` is a value of the parsed file, else a message led by `flag`.
fn blame(
    file: &FileConfig,
    span: Option<Range<usize>>,
    key: String,
    flag: &str,
    message: String,
) -> ResolveError {
    match (span, &file.source) {
        (Some(span), Some(source)) => ResolveError::File(
            ConfigError::at(&source.text, &source.file, Some(span), Some(key))
                .with_message(message),
        ),
        (Some(_), None) => ResolveError::Message(format!("{key}: {message}")),
        (None, _) => ResolveError::Message(format!("{flag}: {message}")),
    }
}

fn export_from_table(
    table: &ExportTable,
    server: &ServerTable,
    overrides: &Overrides,
) -> Result<ExportSpec, String> {
    let source = config::parse_source(&table.path.0)?;
    let read_only = overrides.read_only || table.read_only.or(server.read_only).unwrap_or(false);
    let cache = overrides
        .cache
        .or(table.cache.or(server.cache).map(CacheMode::from))
        .unwrap_or_default();
    let create_bytes = match source {
        Source::Path(_) => table
            .size
            .as_ref()
            .map(|size| size.get_ref().0)
            .or(overrides.create_bytes),
        Source::Memory(_) => None,
    };
    Ok(ExportSpec {
        name: table.name.get_ref().0.clone(),
        description: table
            .description
            .as_ref()
            .map(|text| text.0.clone())
            .unwrap_or_default(),
        source,
        read_only,
        cache,
        create_bytes,
        faults: config::ExportFaults {
            rules: table
                .faults
                .iter()
                .flatten()
                .map(|rule| rule.0.clone())
                .collect(),
            seed: table.fault_seed,
            power_loss: table.power_loss.map(Into::into),
            power_loss_max_mib: table.power_loss_max_mib,
        },
        policy: ExportPolicy {
            allow: nets(table.allow.as_ref()),
            allow_uids: uids(table.allow_uids.as_ref()),
            allow_clients: table
                .allow_clients
                .iter()
                .flat_map(|list| &list.get_ref().0)
                .map(|pattern| pattern.get_ref().0.clone())
                .collect(),
            tls_only: table
                .tls_only
                .as_ref()
                .is_some_and(|tls_only| *tls_only.get_ref()),
            max_connections: export_limit(table.max_connections, server, overrides),
        },
    })
}

fn listeners(server: &ServerTable, overrides: &Overrides, environment: Environment) -> Vec<Listen> {
    let mut listen: Vec<Listen> = if overrides.listen.is_empty() {
        server
            .listen
            .iter()
            .flatten()
            .map(|address| Listen::Tcp(address.0.clone()))
            .collect()
    } else {
        overrides.listen.iter().cloned().map(Listen::Tcp).collect()
    };
    if let Some(path) = overrides.unix.clone().or(server.unix.clone()) {
        listen.push(Listen::Unix(path));
    }
    if listen.is_empty() && !environment.socket_activated {
        listen.push(Listen::Tcp(format!("[::]:{}", config::NBD_PORT)));
    }
    listen
}

impl Settings {
    /// The effective configuration as a file with every key spelled out: what
    /// `ringbd check-config` prints. Parsing it back gives the same settings.
    pub fn to_file_config(&self) -> FileConfig {
        let config = &self.config;
        let mut tcp = Vec::new();
        let mut unix = None;
        for listen in &config.listen {
            match listen {
                Listen::Tcp(address) => tcp.push(Address(address.clone())),
                Listen::Unix(path) => unix = Some(path.clone()),
            }
        }
        let server = ServerTable {
            listen: Some(tcp),
            unix,
            unix_mode: config.unix_mode.map(Mode),
            shards: Some(config.shards),
            placement: Some(config.placement.into()),
            metrics: self.metrics.clone().map(Address),
            queue_depth: Some(config.queue_depth),
            buffer_mib: Some(config.buffer_mib),
            cache: None,
            read_only: None,
            log_level: Some(LogLevel(self.log_level.clone())),
            log_format: Some(self.log_format),
            pid_file: self.pid_file.clone(),
            user: self.user.clone(),
            group: self.group.clone(),
            max_connections: Some(config.max_connections),
            handshake_timeout_seconds: Some(config.handshake_timeout_seconds),
            tls: Some(unspanned(config.tls.mode.into())),
            tls_cert: file_path(&config.tls.cert),
            tls_key: file_path(&config.tls.key),
            tls_ca: file_path(&config.tls.ca),
            tls_psk: file_path(&config.tls.psk),
            tls_kernel: Some(config.tls.kernel.into()),
            allow: Some(cidr_list(&config.listener_policy.allow)),
            allow_uids: Some(uid_list(&config.listener_policy.allow_uids)),
            // Resolved into every export's `max_connections`, like `cache` and `read_only`.
            export_max_connections: None,
        };
        let exports = config.exports.iter().map(export_table).collect();
        FileConfig {
            server,
            exports,
            source: None,
        }
    }

    /// [`Settings::to_file_config`] as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_file_config()).expect("the effective configuration serializes")
    }
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

fn file_path(path: &Option<PathBuf>) -> Option<Spanned<FilePath>> {
    path.clone().map(|path| unspanned(FilePath(path)))
}

fn cidr_list(nets: &[IpNet]) -> CidrList {
    CidrList(nets.iter().copied().map(Cidr).collect())
}

fn uid_list(uids: &[u32]) -> UidList {
    UidList(uids.iter().copied().map(Uid).collect())
}

fn export_table(spec: &ExportSpec) -> ExportTable {
    let path = match &spec.source {
        Source::Path(path) => path.display().to_string(),
        Source::Memory(bytes) => format!("memory:{}", config::format_size(*bytes)),
    };
    ExportTable {
        name: Spanned::new(0..0, ExportName(spec.name.clone())),
        path: ExportPath(path),
        description: Some(Description(spec.description.clone())),
        read_only: Some(spec.read_only),
        cache: Some(spec.cache.into()),
        size: spec
            .create_bytes
            .map(|bytes| Spanned::new(0..0, Size(bytes))),
        faults: (!spec.faults.rules.is_empty())
            .then(|| spec.faults.rules.iter().cloned().map(FaultRule).collect()),
        fault_seed: spec.faults.seed,
        power_loss: spec.faults.power_loss.map(Into::into),
        power_loss_max_mib: spec.faults.power_loss_max_mib,
        tls_only: Some(unspanned(spec.policy.tls_only)),
        allow: Some(cidr_list(&spec.policy.allow)),
        allow_uids: Some(uid_list(&spec.policy.allow_uids)),
        allow_clients: Some(unspanned(PatternList(
            spec.policy
                .allow_clients
                .iter()
                .map(|pattern| unspanned(Pattern(pattern.clone())))
                .collect(),
        ))),
        max_connections: Some(spec.policy.max_connections.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[server]
listen = ["[::]:10809", "127.0.0.1:10810"]
unix = "/run/ringbd/ringbd.sock"
unix_mode = "0660"
shards = 2
placement = "least-loaded"
metrics = "127.0.0.1:9810"
max_connections = 64
handshake_timeout_seconds = 5

[[export]]
name = "vm1"
path = "/srv/nbd/vm1.img"
description = "web server disk"
read_only = false
size = "10G"

[[export]]
name = "scratch"
path = "memory:1G"
cache = "writeback"
read_only = true
"#;

    const ENVIRONMENT: Environment = Environment {
        cores: 8,
        socket_activated: false,
    };

    fn error_of(text: &str) -> ConfigError {
        *parse(text, "ringbd.toml").expect_err("the text is invalid")
    }

    #[test]
    fn the_documented_example_parses_and_resolves() {
        let file = parse(EXAMPLE, "ringbd.toml").unwrap();
        let settings = resolve(Some(&file), &Overrides::default(), ENVIRONMENT).unwrap();
        let config = &settings.config;
        assert_eq!(config.shards, 2);
        assert_eq!(config.placement, Placement::LeastLoaded);
        assert_eq!(config.max_connections, 64);
        assert_eq!(config.handshake_timeout_seconds, 5);
        assert_eq!(config.unix_mode, Some(0o660));
        assert_eq!(config.listen.len(), 3);
        assert_eq!(settings.metrics.as_deref(), Some("127.0.0.1:9810"));
        let vm1 = &config.exports[0];
        assert_eq!(vm1.description, "web server disk");
        assert_eq!(vm1.create_bytes, Some(10 << 30));
        assert!(!vm1.read_only);
        let scratch = &config.exports[1];
        assert_eq!(scratch.source, Source::Memory(1 << 30));
        assert_eq!(scratch.cache, CacheMode::Writeback);
        assert!(scratch.read_only);
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_line() {
        let error = error_of("[server]\nshards = 2\nbogus = 1\n");
        assert_eq!(error.position, Some((3, 1)));
        assert_eq!(error.key.as_deref(), Some("server.bogus"));
        assert!(error.message.contains("unknown field `bogus`"), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("line 3") && text.contains("bogus = 1"),
            "{text}"
        );
        let error = error_of("[[export]]\nname = \"a\"\npath = \"/x\"\nreadonly = true\n");
        assert_eq!(error.key.as_deref(), Some("export[0].readonly"));
        assert_eq!(error.position, Some((4, 1)));
        let error = error_of("[sever]\n");
        assert_eq!(error.key.as_deref(), Some("sever"));
    }

    #[test]
    fn bad_values_name_the_key_and_the_line() {
        let cases = [
            ("[server]\nshards = 0\n", "server.shards", 2, "out of range"),
            (
                "[server]\n\nshards = \"two\"\n",
                "server.shards",
                3,
                "invalid type",
            ),
            (
                "[server]\nlisten = [\"nowhere\"]\n",
                "server.listen[0]",
                2,
                "HOST:PORT",
            ),
            (
                "[server]\nunix_mode = \"999\"\n",
                "server.unix_mode",
                2,
                "octal",
            ),
            (
                "[server]\nbuffer_mib = 1\n",
                "server.buffer_mib",
                2,
                "out of range",
            ),
            (
                "[server]\nlog_format = \"xml\"\n",
                "server.log_format",
                2,
                "unknown variant",
            ),
            (
                "[server]\nmetrics = \"9810\"\n",
                "server.metrics",
                2,
                "HOST:PORT",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"memory:lots\"\n",
                "export[0].path",
                3,
                "bad size",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\ncache = \"none\"\n",
                "export[0].cache",
                4,
                "unknown variant",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nsize = 0\n",
                "export[0].size",
                4,
                "zero",
            ),
        ];
        for (text, key, line, message) in cases {
            let error = error_of(text);
            assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
            assert_eq!(
                error.position.map(|(l, _)| l),
                Some(line),
                "{text}: {error}"
            );
            assert!(error.message.contains(message), "{text}: {error}");
        }
    }

    #[test]
    fn cross_key_rules_point_at_the_second_occurrence() {
        let text =
            "[[export]]\nname = \"a\"\npath = \"/a\"\n\n[[export]]\nname = \"a\"\npath = \"/b\"\n";
        let error = error_of(text);
        assert_eq!(error.position, Some((6, 8)));
        assert_eq!(error.key.as_deref(), Some("export[1].name"));
        assert!(error.message.contains("line 2"), "{error}");
        let text = "[[export]]\nname = \"a\"\npath = \"memory:1G\"\nsize = \"1G\"\n";
        assert_eq!(error_of(text).key.as_deref(), Some("export[0].size"));
        let error = error_of("[server\n");
        assert_eq!(error.position.map(|(line, _)| line), Some(1), "{error}");
    }

    #[test]
    fn the_command_line_overrides_the_file_and_adds_exports() {
        let file = parse(EXAMPLE, "ringbd.toml").unwrap();
        let overrides = Overrides {
            exports: vec!["extra=/srv/extra.img".into()],
            listen: vec!["127.0.0.1:1".into()],
            read_only: true,
            shards: Some(3),
            cache: Some(CacheMode::Direct),
            create_bytes: Some(1 << 20),
            max_connections: Some(7),
            ..Overrides::default()
        };
        let settings = resolve(Some(&file), &overrides, ENVIRONMENT).unwrap();
        let config = &settings.config;
        assert_eq!(config.shards, 3);
        assert_eq!(config.max_connections, 7);
        assert_eq!(
            config.listen,
            vec![
                Listen::Tcp("127.0.0.1:1".into()),
                Listen::Unix("/run/ringbd/ringbd.sock".into())
            ]
        );
        let names: Vec<&str> = config.exports.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["vm1", "scratch", "extra"]);
        assert!(config.exports.iter().all(|export| export.read_only));
        assert!(config.exports.iter().all(|e| e.cache == CacheMode::Direct));
        assert_eq!(
            config.exports[0].create_bytes,
            Some(10 << 30),
            "own size wins"
        );
        assert_eq!(config.exports[1].create_bytes, None, "memory");
        assert_eq!(config.exports[2].create_bytes, Some(1 << 20));
        let clash = Overrides {
            exports: vec!["vm1=/x".into()],
            ..Overrides::default()
        };
        let error = resolve(Some(&file), &clash, ENVIRONMENT)
            .unwrap_err()
            .to_string();
        assert!(error.contains("'vm1' is used twice"), "{error}");
    }

    #[test]
    fn defaults_apply_without_a_file() {
        let overrides = Overrides {
            exports: vec!["memory:1M".into()],
            ..Overrides::default()
        };
        let settings = resolve(None, &overrides, ENVIRONMENT).unwrap();
        assert_eq!(settings.config.shards, 8);
        assert_eq!(
            settings.config.listen,
            vec![Listen::Tcp("[::]:10809".into())]
        );
        assert_eq!(settings.log_level, "info");
        let activated = Environment {
            socket_activated: true,
            ..ENVIRONMENT
        };
        let settings = resolve(None, &overrides, activated).unwrap();
        assert!(settings.config.listen.is_empty(), "inherited sockets only");
        let none = resolve(None, &Overrides::default(), ENVIRONMENT)
            .unwrap_err()
            .to_string();
        assert!(none.contains("no exports"), "{none}");
    }

    #[test]
    fn the_effective_configuration_round_trips() {
        let file = parse(EXAMPLE, "ringbd.toml").unwrap();
        let settings = resolve(Some(&file), &Overrides::default(), ENVIRONMENT).unwrap();
        let text = settings.to_toml();
        let again = parse(&text, "effective").unwrap_or_else(|error| panic!("{error}\n{text}"));
        let again = resolve(Some(&again), &Overrides::default(), ENVIRONMENT).unwrap();
        assert_eq!(again.config.exports, settings.config.exports, "{text}");
        assert_eq!(again.config.listen, settings.config.listen);
        assert_eq!(again.config.unix_mode, settings.config.unix_mode);
        assert_eq!(again.to_toml(), text);
        assert!(text.contains("unix_mode = \"0660\""), "{text}");
        assert!(text.contains("size = \"10G\""), "{text}");
    }

    const ACCESS: &str = r#"
[server]
tls = "require"
tls_cert = "/etc/ringbd/server-cert.pem"
tls_key = "/etc/ringbd/server-key.pem"
tls_ca = "/etc/ringbd/ca-cert.pem"
tls_psk = "/etc/ringbd/keys.psk"
tls_kernel = "off"
allow = ["10.0.0.0/8", "::1", "::ffff:192.168.0.0/112"]
allow_uids = [0, "root", 1000]
export_max_connections = 8

[[export]]
name = "vm1"
path = "memory:1M"
tls_only = true
allow = ["10.1.0.0/16"]
allow_uids = [1000]
allow_clients = ["cn=hv1.example", "PSK:alice", "dns:HV2.Example"]
max_connections = 4

[[export]]
name = "open"
path = "memory:1M"
max_connections = 0
"#;

    fn settings_of(text: &str, overrides: &Overrides) -> Result<Settings, ResolveError> {
        let file = parse(text, "ringbd.toml").unwrap_or_else(|error| panic!("{error}"));
        resolve(Some(&file), overrides, ENVIRONMENT)
    }

    fn net(text: &str) -> IpNet {
        access::parse_net(text).unwrap()
    }

    #[test]
    fn tls_and_access_keys_resolve() {
        let settings = settings_of(ACCESS, &Overrides::default()).unwrap();
        let config = &settings.config;
        assert_eq!(config.tls.mode, TlsMode::Require);
        assert_eq!(config.tls.kernel, KernelTls::Off);
        assert_eq!(config.tls.ca, Some("/etc/ringbd/ca-cert.pem".into()));
        assert_eq!(
            config.listener_policy.allow,
            [net("10.0.0.0/8"), net("::1/128"), net("192.168.0.0/16")]
        );
        assert_eq!(config.listener_policy.allow_uids, [0, 0, 1000]);
        let vm1 = &config.exports[0].policy;
        assert!(vm1.tls_only);
        assert_eq!(vm1.allow, [net("10.1.0.0/16")]);
        assert_eq!(vm1.allow_uids, [1000]);
        let clients: Vec<String> = vm1.allow_clients.iter().map(ToString::to_string).collect();
        assert_eq!(clients, ["CN=hv1.example", "PSK:alice", "DNS:hv2.example"]);
        assert_eq!(vm1.max_connections, Some(4), "own limit wins");
        assert_eq!(
            config.exports[1].policy.max_connections, None,
            "0: unlimited"
        );
        assert!(config.exports[1].policy.allow.is_empty());
    }

    #[test]
    fn access_flags_override_the_file() {
        let overrides = Overrides {
            exports: vec!["extra=memory:1M".into()],
            tls: Some(TlsMode::On),
            tls_cert: Some("/flag/cert.pem".into()),
            tls_kernel: Some(KernelTls::Auto),
            allow: vec![net("127.0.0.1")],
            allow_uids: vec![7],
            export_max_connections: Some(3),
            ..Overrides::default()
        };
        let settings = settings_of(ACCESS, &overrides).unwrap();
        let config = &settings.config;
        assert_eq!(config.tls.mode, TlsMode::On);
        assert_eq!(config.tls.cert, Some("/flag/cert.pem".into()));
        assert_eq!(config.tls.key, Some("/etc/ringbd/server-key.pem".into()));
        assert_eq!(config.tls.kernel, KernelTls::Auto);
        assert_eq!(config.listener_policy.allow, [net("127.0.0.1/32")]);
        assert_eq!(config.listener_policy.allow_uids, [7]);
        let limits: Vec<_> = config
            .exports
            .iter()
            .map(|export| export.policy.max_connections)
            .collect();
        assert_eq!(
            limits,
            [Some(4), None, Some(3)],
            "own keys win over the default"
        );
        assert!(config.exports[2].policy.allow_clients.is_empty());
    }

    #[test]
    fn access_values_name_the_key_and_the_line() {
        let cases = [
            (
                "[server]\ntls = \"maybe\"\n",
                "server.tls",
                2,
                "unknown variant",
            ),
            (
                "[server]\ntls_kernel = \"on\"\n",
                "server.tls_kernel",
                2,
                "unknown variant",
            ),
            (
                "[server]\n\ntls_cert = \"\"\n",
                "server.tls_cert",
                3,
                "empty",
            ),
            (
                "[server]\nallow = [\"10.0.0.0/8\",\n  \"10.0.0.1/8\"]\n",
                "server.allow[1]",
                2,
                "did you mean 10.0.0.0/8",
            ),
            (
                "[server]\nallow = [\"10.0.0\"]\n",
                "server.allow[0]",
                2,
                "CIDR",
            ),
            (
                "[server]\nallow = \"10.0.0.0/8\"\n",
                "server.allow",
                2,
                "invalid type",
            ),
            (
                "[server]\nallow_uids = [1, \"no-such-user-ringbd\"]\n",
                "server.allow_uids[1]",
                2,
                "does not exist",
            ),
            (
                "[server]\nallow_uids = [-1]\n",
                "server.allow_uids[0]",
                2,
                "out of range",
            ),
            (
                "[server]\nexport_max_connections = 2000000\n",
                "server.export_max_connections",
                2,
                "out of range",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\ntls_only = \"yes\"\n",
                "export[0].tls_only",
                4,
                "invalid type",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nallow = [\"::1/129\"]\n",
                "export[0].allow[0]",
                4,
                "CIDR",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nallow_uids = [\"\"]\n",
                "export[0].allow_uids[0]",
                4,
                "empty",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nallow_clients = [\"CN=x\", \"alice\"]\n",
                "export[0].allow_clients[1]",
                4,
                "client pattern 'alice'",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nallow_clients = [\"DNS:a..b\"]\n",
                "export[0].allow_clients[0]",
                4,
                "not a DNS name",
            ),
            (
                "[[export]]\nname = \"a\"\npath = \"/a\"\nmax_connections = -1\n",
                "export[0].max_connections",
                4,
                "invalid value",
            ),
        ];
        for (text, key, line, message) in cases {
            let error = error_of(text);
            assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
            let found = error.position.map(|(line, _)| line);
            assert_eq!(found, Some(line), "{text}: {error}");
            assert!(error.message.contains(message), "{text}: {error}");
        }
        let many = (0..=access::ALLOWLIST_ENTRIES_MAX)
            .map(|i| format!("\"10.0.{}.{}\"", i / 256, i % 256));
        let text = format!(
            "[server]\nallow = [{}]\n",
            many.collect::<Vec<_>>().join(",")
        );
        let error = error_of(&text);
        assert_eq!(error.key.as_deref(), Some("server.allow"), "{error}");
        assert!(error.message.contains("more than"), "{error}");
    }

    /// A rule checked after merging, broken by the file alone.
    fn located(text: &str) -> ConfigError {
        match settings_of(text, &Overrides::default()) {
            Err(ResolveError::File(error)) => *error,
            other => panic!("{text}: expected a located error, got {other:?}"),
        }
    }

    #[test]
    fn tls_rules_name_the_key_and_the_line() {
        let export = "[[export]]\nname = \"a\"\npath = \"memory:1M\"\n";
        let psk_server = "[server]\ntls = \"on\"\ntls_psk = \"/p\"\n";
        let cert_server = "[server]\ntls = \"on\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";
        let cases = [
            (
                format!("[server]\n\ntls = \"require\"\n{export}"),
                "server.tls",
                3,
                "needs credentials",
            ),
            (
                format!("[server]\ntls = \"on\"\ntls_cert = \"/c\"\n{export}"),
                "server.tls_cert",
                3,
                "without tls_key",
            ),
            (
                format!("[server]\ntls_key = \"/k\"\n{export}"),
                "server.tls_key",
                2,
                "without tls_cert",
            ),
            (
                format!("{psk_server}tls_ca = \"/ca\"\n{export}"),
                "server.tls_ca",
                4,
                "needs a server certificate",
            ),
            (
                format!("{export}tls_only = true\n"),
                "export[0].tls_only",
                4,
                "tls is \"off\"",
            ),
            (
                format!("{export}\nallow_clients = [\"CN=x\"]\n"),
                "export[0].allow_clients",
                5,
                "tls is \"off\"",
            ),
            (
                format!("{psk_server}{export}allow_clients = [\"PSK:a\",\n  \"CN=x\"]\n"),
                "export[0].allow_clients[1]",
                8,
                "tls_ca (--tls-ca) is not set",
            ),
            (
                format!("{cert_server}tls_ca = \"/ca\"\n{export}allow_clients = [\"PSK:a\"]\n"),
                "export[0].allow_clients[0]",
                9,
                "tls_psk (--tls-psk) is not set",
            ),
        ];
        for (text, key, line, message) in cases {
            let error = located(&text);
            assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
            let found = error.position.map(|(line, _)| line);
            assert_eq!(found, Some(line), "{text}: {error}");
            assert!(error.message.contains(message), "{text}: {error}");
            assert!(
                error.to_string().contains(&format!("line {line}")),
                "{error}"
            );
        }
        // Without TLS problems the same exports are fine.
        let good = format!("{psk_server}{export}tls_only = true\nallow_clients = [\"PSK:a\"]\n");
        let settings = settings_of(&good, &Overrides::default()).unwrap();
        assert!(settings.config.exports[0].policy.requires_tls());
    }

    #[test]
    fn tls_rules_broken_by_flags_name_the_flag() {
        let export = "[[export]]\nname = \"a\"\npath = \"memory:1M\"\n";
        let require = Overrides {
            tls: Some(TlsMode::Require),
            ..Overrides::default()
        };
        let error = settings_of(export, &require).unwrap_err();
        let ResolveError::Message(message) = error else {
            panic!("{error:?}")
        };
        assert!(message.starts_with("--tls: "), "{message}");
        assert!(message.contains("needs credentials"), "{message}");
        let no_file = Overrides {
            exports: vec!["memory:1M".into()],
            tls: Some(TlsMode::Require),
            ..Overrides::default()
        };
        let error = resolve(None, &no_file, ENVIRONMENT)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("--tls: "), "{error}");
        let ca = Overrides {
            tls_ca: Some("/ca".into()),
            ..Overrides::default()
        };
        let error = settings_of(export, &ca).unwrap_err().to_string();
        assert!(error.starts_with("--tls-ca: "), "{error}");
        // The file asks for TLS, a flag supplies the credentials: valid together.
        let file = format!("[server]\ntls = \"require\"\n{export}");
        let psk = Overrides {
            tls_psk: Some("/p".into()),
            ..Overrides::default()
        };
        assert_eq!(
            settings_of(&file, &psk).unwrap().config.tls.psk,
            Some("/p".into())
        );
        // A flag turning TLS off breaks a file's tls_only export: the export's line is named.
        let file = format!("[server]\ntls = \"on\"\ntls_psk = \"/p\"\n{export}tls_only = true\n");
        let off = Overrides {
            tls: Some(TlsMode::Off),
            ..Overrides::default()
        };
        let Err(ResolveError::File(error)) = settings_of(&file, &off) else {
            panic!("expected a located error")
        };
        assert_eq!(error.key.as_deref(), Some("export[0].tls_only"));
        assert_eq!(error.position.map(|(line, _)| line), Some(7));
    }

    #[test]
    fn configs_built_in_code_are_checked_too() {
        let mut file = parse(ACCESS, "ringbd.toml").unwrap();
        file.source = None;
        file.server.tls_psk = None;
        file.server.tls_ca = None;
        let error = resolve(Some(&file), &Overrides::default(), ENVIRONMENT)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("export[0].allow_clients[0]: "), "{error}");
        let mut settings = settings_of(ACCESS, &Overrides::default()).unwrap();
        assert_eq!(settings.config.validate(), Ok(()));
        settings.config.tls.key = None;
        assert!(settings.config.validate().unwrap_err().contains("tls_cert"));
        settings.config.tls = TlsSettings::default();
        let error = settings.config.validate().unwrap_err();
        assert!(error.contains("export 'vm1': tls_only"), "{error}");
        settings.config.exports[0].policy.tls_only = false;
        // A pattern is parsed where it is read, so a bad one never reaches validate().
        let error = ClientPattern::parse("nonsense").unwrap_err();
        assert!(error.contains("client pattern 'nonsense'"), "{error}");
        settings.config.exports[0].policy.allow_clients.clear();
        settings.config.exports[0].policy.max_connections = Some(0);
        assert!(settings.config.validate().is_err(), "0 is stored as None");
    }

    #[test]
    fn the_effective_access_configuration_round_trips() {
        let settings = settings_of(ACCESS, &Overrides::default()).unwrap();
        let text = settings.to_toml();
        for expected in [
            "tls = \"require\"",
            "tls_kernel = \"off\"",
            "allow = [\"10.0.0.0/8\", \"::1/128\", \"192.168.0.0/16\"]",
            "allow_clients = [\"CN=hv1.example\", \"PSK:alice\", \"DNS:hv2.example\"]",
            "max_connections = 4",
            "max_connections = 0",
            "tls_only = true",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
        let again = settings_of(&text, &Overrides::default()).unwrap();
        assert_eq!(again.config.exports, settings.config.exports, "{text}");
        assert_eq!(again.config.tls, settings.config.tls);
        assert_eq!(
            again.config.listener_policy,
            settings.config.listener_policy
        );
        assert_eq!(again.to_toml(), text);
    }
}
