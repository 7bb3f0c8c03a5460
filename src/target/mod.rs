//! The NBD protocol layer: wire constants, codec, handshake, validation, exports, backends.
//!
//! # Contract
//!
//! `proto`, `codec`, `handshake` and `validate` are sans-I/O: they map bytes to values and
//! values to bytes in caller-provided buffers. They own no sockets, no rings and do not
//! allocate on the per-request path, so they can be unit-, property- and fuzz-tested without
//! a kernel. The data plane (`crate::shard`) drives them.

pub mod backend;
pub mod codec;
pub mod export;
pub mod fault;
pub mod handshake;
pub mod proto;
pub mod sparse;
pub mod validate;
pub mod volatile;
