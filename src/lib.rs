//! ringbd: a Network Block Device (NBD) server built on io_uring.
//!
//! # Architecture
//!
//! ```text
//!  listeners ──accept──▶ acceptor thread ──crossbeam + eventfd──▶ shard 0 … shard N-1
//!                                                                  │ one thread, pinned
//!                                                                  │ one io_uring
//!                                                                  │ one registered BufPool
//!                                                                  ▼
//!                    socket recv ─▶ target::codec ─▶ target::validate ─▶ backend op (ring)
//!                    socket send ◀─ reply queue (out of order, batched sendmsg) ◀─ CQE
//! ```
//!
//! * [`target`] is the NBD protocol: pure functions and state machines over bytes (sans-I/O),
//!   plus the export and backend descriptions. It never touches io_uring.
//! * [`ring`] is the only module allowed raw syscalls and pointers (a crate-wide lint in
//!   Cargo.toml denies them; only `ring` lifts it): the io_uring wrapper, the registered
//!   buffer pool and the typed `user_data` keyspace. It knows nothing about NBD.
//! * [`shard`] drives a ring with the protocol engine; [`server`] owns listeners, the
//!   acceptor and the shard threads.
//! * [`config`] holds the limits; [`config_file`] the TOML file and how flags override it;
//!   [`access`] decides which peers (addresses, unix uids, TLS identities) may connect;
//!   [`metrics`] renders the statistics for Prometheus; [`systemd`] takes socket-activated
//!   listeners and reports readiness; [`process`] writes the PID file and drops privileges.
//!
//! See `docs/ARCHITECTURE.md` for the request flow and `docs/INVARIANTS.md` for the
//! invariant behind every raw-pointer block.
#![warn(missing_docs, missing_debug_implementations)]

pub mod access;
pub mod config;
pub mod config_file;
pub mod control;
pub mod exports;
pub mod faults;
pub mod metrics;
pub mod placement;
pub mod process;
pub mod ring;
pub mod security;
pub mod server;
pub mod shard;
pub mod stats;
pub mod systemd;
pub mod target;
pub mod tls;
