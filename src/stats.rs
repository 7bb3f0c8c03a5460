//! Per-shard statistics: counters and latency histograms per export and command.
//!
//! # Contract
//!
//! A shard owns its [`ShardStats`] and records into it on the request path with no locks and
//! no allocation (HdrHistogram buckets are allocated at startup). About once a second the
//! shard copies its stats into its slot of the shared [`StatsHub`] (one short mutex hold per
//! shard per second). A metrics scrape only reads the hub and merges the per-shard copies,
//! so it never touches the data plane.

use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Commands with their own counters, in the order of [`Op::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
}

impl Op {
    /// Every op, in index order.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
    ];

    /// Label used in metrics (`op="read"`).
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Largest latency a histogram records exactly (longer ones are clamped to it).
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 2;

/// Counters and latency of one command on one export.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Requests completed (replied to), including errors.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Payload bytes read or written (0 for commands without data).
    pub bytes: u64,
    /// Latency from request parsed to reply queued, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl OpStats {
    fn new() -> OpStats {
        OpStats {
            requests: 0,
            errors: 0,
            bytes: 0,
            latency_ns: Histogram::new_with_bounds(1_000, LATENCY_NS_MAX, SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        }
    }

    fn add(&mut self, other: &OpStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.bytes += other.bytes;
        self.latency_ns
            .add(&other.latency_ns)
            .expect("same histogram bounds");
    }
}

/// Statistics of one export.
#[derive(Debug, Clone)]
pub struct ExportStats {
    /// Per command, indexed like [`Op::ALL`].
    pub ops: Vec<OpStats>,
    /// Connections that completed the handshake for this export.
    pub connections_total: u64,
}

impl ExportStats {
    fn new() -> ExportStats {
        ExportStats {
            ops: Op::ALL.iter().map(|_| OpStats::new()).collect(),
            connections_total: 0,
        }
    }

    /// The stats of one command.
    pub fn op(&self, op: Op) -> &OpStats {
        &self.ops[op.index()]
    }
}

/// Everything one shard counts.
#[derive(Debug, Clone)]
pub struct ShardStats {
    /// Per export, indexed by export id.
    pub exports: Vec<ExportStats>,
    /// Connections accepted by this shard.
    pub accepted_total: u64,
    /// Connections open now.
    pub connections: u64,
    /// Requests in flight now (parsed, not yet replied).
    pub in_flight: u64,
    /// Protocol errors that closed a connection.
    pub protocol_errors_total: u64,
}

impl ShardStats {
    /// Zeroed stats for `exports` exports.
    pub fn new(exports: usize) -> ShardStats {
        ShardStats {
            exports: (0..exports).map(|_| ExportStats::new()).collect(),
            accepted_total: 0,
            connections: 0,
            in_flight: 0,
            protocol_errors_total: 0,
        }
    }

    /// The stats of export `id`, growing the table when a reload added exports (allocation
    /// happens once per new export, when its first client connects).
    pub fn export_mut(&mut self, id: usize) -> &mut ExportStats {
        self.ensure(id + 1);
        &mut self.exports[id]
    }

    /// Makes room for `exports` exports.
    pub fn ensure(&mut self, exports: usize) {
        while self.exports.len() < exports {
            self.exports.push(ExportStats::new());
        }
    }

    /// Records one completed request. No allocation, no lock (the export's entry exists
    /// since its connection's handshake).
    pub fn record(&mut self, export: usize, op: Op, bytes: u64, latency_ns: u64, error: bool) {
        let stats = &mut self.exports[export].ops[op.index()];
        stats.requests += 1;
        stats.errors += u64::from(error);
        stats.bytes += bytes;
        stats
            .latency_ns
            .saturating_record(latency_ns.clamp(1_000, LATENCY_NS_MAX));
    }

    /// Adds `other` into `self` (same export count).
    pub fn merge(&mut self, other: &ShardStats) {
        self.ensure(other.exports.len());
        for (mine, theirs) in self.exports.iter_mut().zip(&other.exports) {
            for (a, b) in mine.ops.iter_mut().zip(&theirs.ops) {
                a.add(b);
            }
            mine.connections_total += theirs.connections_total;
        }
        self.accepted_total += other.accepted_total;
        self.connections += other.connections;
        self.in_flight += other.in_flight;
        self.protocol_errors_total += other.protocol_errors_total;
    }

    fn copy_from(&mut self, other: &ShardStats) {
        self.ensure(other.exports.len());
        for (mine, theirs) in self.exports.iter_mut().zip(&other.exports) {
            for (a, b) in mine.ops.iter_mut().zip(&theirs.ops) {
                a.requests = b.requests;
                a.errors = b.errors;
                a.bytes = b.bytes;
                a.latency_ns.reset();
                a.latency_ns
                    .add(&b.latency_ns)
                    .expect("same histogram bounds");
            }
            mine.connections_total = theirs.connections_total;
        }
        self.accepted_total = other.accepted_total;
        self.connections = other.connections;
        self.in_flight = other.in_flight;
        self.protocol_errors_total = other.protocol_errors_total;
    }
}

/// The published copies of every shard's stats.
#[derive(Debug)]
pub struct StatsHub {
    exports: usize,
    shards: Vec<Mutex<ShardStats>>,
}

impl StatsHub {
    /// A hub for `shards` shards and `exports` exports.
    pub fn new(shards: usize, exports: usize) -> StatsHub {
        StatsHub {
            exports,
            shards: (0..shards)
                .map(|_| Mutex::new(ShardStats::new(exports)))
                .collect(),
        }
    }

    /// Called by shard `index` about once a second (off the request path).
    pub fn publish(&self, index: usize, stats: &ShardStats) {
        let mut slot = self.shards[index]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        slot.copy_from(stats);
    }

    /// The sum over all shards, as last published (at least as many exports as at startup;
    /// pad with [`ShardStats::ensure`] to the registry's size).
    pub fn snapshot(&self) -> ShardStats {
        let mut total = ShardStats::new(self.exports);
        for shard in &self.shards {
            let slot = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            total.merge(&slot);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_stats_merge_across_shards() {
        let hub = StatsHub::new(2, 1);
        let mut a = ShardStats::new(1);
        let mut b = ShardStats::new(1);
        a.record(0, Op::Read, 4096, 50_000, false);
        a.record(0, Op::Read, 4096, 70_000, true);
        b.record(0, Op::Write, 512, 1_000_000, false);
        hub.publish(0, &a);
        hub.publish(1, &b);
        hub.publish(1, &b);
        let total = hub.snapshot();
        let read = total.exports[0].op(Op::Read);
        assert_eq!((read.requests, read.errors, read.bytes), (2, 1, 8192));
        assert_eq!(read.latency_ns.len(), 2);
        assert!(read.latency_ns.value_at_quantile(1.0) >= 69_000);
        assert_eq!(
            total.exports[0].op(Op::Write).requests,
            1,
            "republishing replaces"
        );
    }
}
