//! Server configuration and its limits. Everything the data plane allocates is sized from
//! here at startup, with named units.

use std::path::PathBuf;

use crate::target::backend::{CacheMode, Source};

/// Default in-flight requests per connection.
pub const QUEUE_DEPTH_DEFAULT: u32 = 256;
/// Default registered buffer pool per shard, in MiB.
pub const BUFFER_MIB_DEFAULT: usize = 128;
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
}

impl ExportSpec {
    /// Parses `[NAME=]PATH`, where PATH is a file, a block device or `memory:SIZE`.
    pub fn parse(text: &str, read_only: bool, cache: CacheMode) -> Result<ExportSpec, String> {
        let (name, path) = match text.split_once('=') {
            Some((name, path)) => (name, path),
            None => ("", text),
        };
        if name.len() > 4096 || name.contains('\0') {
            return Err(format!(
                "export name in '{text}' is too long or contains NUL"
            ));
        }
        if path.is_empty() {
            return Err(format!("export '{text}' has no path"));
        }
        let source = match path.strip_prefix("memory:") {
            Some(size) => Source::Memory(parse_size(size)?),
            None => Source::Path(PathBuf::from(path)),
        };
        Ok(ExportSpec {
            name: name.to_string(),
            description: String::new(),
            source,
            read_only,
            cache,
        })
    }
}

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

/// The whole server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Exports, in order; ids are indexes into this list.
    pub exports: Vec<ExportSpec>,
    /// Listeners.
    pub listen: Vec<Listen>,
    /// Number of shards (threads with a ring each).
    pub shards: usize,
    /// Maximum in-flight requests per connection.
    pub queue_depth: u32,
    /// Registered buffer pool per shard, MiB.
    pub buffer_mib: usize,
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
        }
        if self.listen.is_empty() {
            return Err("no listeners".into());
        }
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!(
                "--shards {} is out of range (1..=1024)",
                self.shards
            ));
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(format!(
                "--queue-depth {} is out of range (1..=4096)",
                self.queue_depth
            ));
        }
        if !(32..=65536).contains(&self.buffer_mib) {
            return Err(format!(
                "--buffer-mib {} is out of range (32..=65536)",
                self.buffer_mib
            ));
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
}
