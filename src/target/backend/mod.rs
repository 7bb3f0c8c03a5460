//! Backends: what stores an export's bytes, and what it really supports.
//!
//! Every export is a file descriptor served through io_uring: a regular file, a block
//! device, or (for `memory:SIZE`) an anonymous memfd living in RAM. The backend decides, per
//! request, which descriptor serves it and how a range maps onto the direct-I/O alignment;
//! the data plane (`crate::shard`) turns that into ring operations.
//!
//! # Alignment contract
//!
//! With O_DIRECT, file offsets and lengths must be multiples of [`FileBackend::alignment`].
//! Clients that negotiated `NBD_INFO_BLOCK_SIZE` obey it. For clients that do not, reads are
//! widened to the aligned span (the reply sends the requested sub-range of the same buffer,
//! no copy), and writes go through a second, buffered descriptor of the same file, where the
//! kernel performs the read-modify-write under its own page locks; Linux keeps the page cache
//! and direct I/O coherent (direct reads write back dirty pages first).

mod file;

pub use file::{CacheMode, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, FileBackend, OpenOptions, Source};
