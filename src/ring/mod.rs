//! The unsafe boundary: io_uring, the registered buffer pool and the few raw syscalls ringbd
//! makes outside the ring. Nothing here knows about NBD; the ring is generic over the context
//! `T` its caller attaches to each operation.
//!
//! # Ownership contract (why the safe API is sound)
//!
//! Every operation is pushed together with the resources the kernel may touch: a pool
//! [`Buf`] moved in by value, a boxed [`SendBatch`], or a boxed word for eventfd reads. They
//! are stored in the in-flight slot keyed by the SQE's `user_data`, and handed back only in
//! that operation's [`Completion`], after its CQE was reaped. The pool's mapping lives inside
//! the [`Ring`], and `Ring::drop` cancels and reaps every in-flight operation before the pool
//! is unmapped. So no safe code can reach memory the kernel is using, and the kernel never
//! uses freed memory. Raw file descriptors are plain integers: a stale one yields `EBADF`,
//! never memory unsafety.
//!
//! # Short transfers
//!
//! Short sends are resubmitted here until the whole batch is sent or an error occurs.
//! Short file reads/writes are reported to the caller, who resubmits the remainder.

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod buf;
pub mod ktls;
pub mod sys;
pub mod token;

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

pub use buf::{BUF_ALIGN_BYTES, BUF_BYTES_MAX, Buf, BufPool};

/// Errors setting up a ring. Each message names the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// io_uring_setup failed (disabled by sysctl, seccomp, or an old kernel).
    #[error(
        "io_uring is not available ({0}); check `sysctl kernel.io_uring_disabled` (must be 0, \
         or 2 = root only), seccomp profiles of the container, and a kernel ≥ 6.1"
    )]
    Setup(io::Error),
    /// The kernel lacks an opcode ringbd needs.
    #[error("the kernel's io_uring lacks opcode {0}; ringbd needs Linux 6.1 or newer")]
    MissingOpcode(&'static str),
    /// Mapping the buffer pool failed.
    #[error("cannot map the {bytes}-byte buffer pool: {source}; lower --buffer-mib")]
    Pool {
        /// Requested pool size.
        bytes: usize,
        /// The mmap error.
        source: io::Error,
    },
    /// Submitting to the ring failed.
    #[error("io_uring_enter failed: {0}")]
    Enter(io::Error),
}

/// Ring sizing.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue gets twice as many).
    pub entries: u32,
    /// Bytes of registered buffer pool.
    pub pool_bytes: usize,
    /// In-flight slots to preallocate (the table grows beyond it only under overload).
    pub in_flight_max: usize,
}

/// `RWF_DSYNC` for [`Ring::write_at`]: the write is durable when it completes (FUA).
const RWF_DSYNC: i32 = 0x2;

/// A completed operation: the caller's context, the kernel's result and the resources that
/// were lent to the kernel.
#[derive(Debug)]
pub struct Completion<T> {
    /// What the caller attached when pushing.
    pub ctx: T,
    /// The CQE result: bytes transferred or `-errno`.
    pub result: i32,
    /// The resources handed in with the operation.
    pub resources: Resources,
}

/// Resources lent to the kernel for one operation.
#[derive(Debug)]
#[non_exhaustive]
pub enum Resources {
    /// Nothing.
    None,
    /// A pool buffer.
    Buf(Buf),
    /// A send batch (with the pool buffers it references).
    Batch(Box<SendBatch>),
    /// The 8-byte word an eventfd read fills.
    Word(Box<u64>),
    /// The timespec of a timeout.
    Timer(Box<types::Timespec>),
}

impl Resources {
    /// The pool buffer; panics if the operation had none (a programmer error).
    pub fn into_buf(self) -> Buf {
        match self {
            Resources::Buf(buf) => buf,
            other => panic!("expected a buffer, got {other:?}"),
        }
    }

    /// The send batch; panics if the operation had none (a programmer error).
    pub fn into_batch(self) -> Box<SendBatch> {
        match self {
            Resources::Batch(batch) => batch,
            other => panic!("expected a send batch, got {other:?}"),
        }
    }

    /// The eventfd word; panics if the operation had none (a programmer error).
    pub fn into_word(self) -> Box<u64> {
        match self {
            Resources::Word(word) => word,
            other => panic!("expected a word, got {other:?}"),
        }
    }
}

#[derive(Debug)]
struct Slot<T> {
    ctx: T,
    resources: Resources,
    fd: RawFd,
}

impl<T> Slot<T> {
    fn new(ctx: T, resources: Resources, fd: RawFd) -> Slot<T> {
        Slot { ctx, resources, fd }
    }
}

/// One io_uring with its registered buffer pool and in-flight table.
pub struct Ring<T> {
    uring: IoUring,
    pool: BufPool,
    slots: Slab<Slot<T>>,
    backlog: VecDeque<squeue::Entry>,
    registered: bool,
    cqes: Vec<cqueue::Entry>,
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.slots.len())
            .field("registered", &self.registered)
            .field("pool", &self.pool)
            .finish()
    }
}

/// Opcodes ringbd relies on, checked once at startup.
const REQUIRED_OPCODES: [(u8, &str); 10] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

impl<T> Ring<T> {
    /// Sets up the ring (single issuer, deferred task running where supported), maps the
    /// buffer pool and registers it. Call from the thread that will drive the ring.
    ///
    /// Registration failing (typically `RLIMIT_MEMLOCK` for non-root users) is not fatal: the
    /// ring then uses plain READ/WRITE on the same buffers, and [`Ring::registered`] says so.
    pub fn new(config: RingConfig) -> Result<Ring<T>, RingError> {
        assert!(config.entries.is_power_of_two() && config.entries >= 8);
        let uring = IoUring::builder()
            .setup_cqsize(config.entries * 2)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(config.entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(config.entries * 2)
                    .build(config.entries)
            })
            .map_err(RingError::Setup)?;
        let mut probe = io_uring::Probe::new();
        uring
            .submitter()
            .register_probe(&mut probe)
            .map_err(RingError::Setup)?;
        for (code, name) in REQUIRED_OPCODES {
            if !probe.is_supported(code) {
                return Err(RingError::MissingOpcode(name));
            }
        }
        let mut pool = BufPool::new(config.pool_bytes).map_err(|source| RingError::Pool {
            bytes: config.pool_bytes,
            source,
        })?;
        let (base, len) = pool.region();
        let iovec = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the region is the pool's mapping, which lives as long as `self.pool`; the
        // ring is dropped (and buffers unregistered with it) before the pool, because `Drop`
        // drains the ring first and fields drop in declaration order (`uring` before `pool`).
        let registered = unsafe { uring.submitter().register_buffers(&[iovec]) }.is_ok();
        Ok(Ring {
            uring,
            pool,
            slots: Slab::with_capacity(config.in_flight_max),
            backlog: VecDeque::with_capacity(config.entries as usize),
            registered,
            cqes: Vec::with_capacity(config.entries as usize * 2),
        })
    }

    /// Whether the pool is registered (READ_FIXED/WRITE_FIXED in use).
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// The buffer pool.
    pub fn pool(&self) -> &BufPool {
        &self.pool
    }

    /// The buffer pool, for check-out, check-in and filling buffers the caller holds.
    pub fn pool_mut(&mut self) -> &mut BufPool {
        &mut self.pool
    }

    /// Operations pushed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Reads `len` bytes at file `offset` into `buf[at..at + len]`.
    pub fn read_at(&mut self, fd: RawFd, offset: u64, buf: Buf, at: usize, len: usize, ctx: T) {
        let address = self.pool.address(&buf, at, len);
        let len = u32::try_from(len).expect("read larger than 4 GiB");
        let entry = if self.registered {
            opcode::ReadFixed::new(types::Fd(fd), address, len, 0)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), address, len)
                .offset(offset)
                .build()
        };
        self.push(entry, Slot::new(ctx, Resources::Buf(buf), fd));
    }

    /// Writes `buf[at..at + len]` at file `offset`; `dsync` makes it durable on completion.
    #[allow(clippy::too_many_arguments)]
    pub fn write_at(
        &mut self,
        fd: RawFd,
        offset: u64,
        buf: Buf,
        at: usize,
        len: usize,
        dsync: bool,
        ctx: T,
    ) {
        let address = self.pool.address(&buf, at, len);
        let len = u32::try_from(len).expect("write larger than 4 GiB");
        let flags = if dsync { RWF_DSYNC } else { 0 };
        let entry = if self.registered {
            opcode::WriteFixed::new(types::Fd(fd), address, len, 0)
                .offset(offset)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Write::new(types::Fd(fd), address, len)
                .offset(offset)
                .rw_flags(flags)
                .build()
        };
        self.push(entry, Slot::new(ctx, Resources::Buf(buf), fd));
    }

    /// `fsync`/`fdatasync` of the whole file.
    pub fn fsync(&mut self, fd: RawFd, datasync: bool, ctx: T) {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(flags).build();
        self.push(entry, Slot::new(ctx, Resources::None, fd));
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(&mut self, fd: RawFd, mode: i32, offset: u64, len: u64, ctx: T) {
        let entry = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.push(entry, Slot::new(ctx, Resources::None, fd));
    }

    /// `posix_fadvise(fd, offset, len, advice)`.
    pub fn fadvise(&mut self, fd: RawFd, offset: u64, len: u64, advice: i32, ctx: T) {
        let len = libc::off_t::try_from(len).unwrap_or(0);
        let entry = opcode::Fadvise::new(types::Fd(fd), len, advice)
            .offset(offset)
            .build();
        self.push(entry, Slot::new(ctx, Resources::None, fd));
    }

    /// Receives up to `len` bytes from a socket into `buf[at..at + len]`. With `wait_all`
    /// the kernel keeps receiving until `len` bytes arrived (or EOF/error).
    pub fn recv(&mut self, fd: RawFd, buf: Buf, at: usize, len: usize, wait_all: bool, ctx: T) {
        let address = self.pool.address(&buf, at, len);
        let len = u32::try_from(len).expect("recv larger than 4 GiB");
        let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
        let entry = opcode::Recv::new(types::Fd(fd), address, len)
            .flags(flags)
            .build();
        self.push(entry, Slot::new(ctx, Resources::Buf(buf), fd));
    }

    /// Sends every byte of `batch` on a stream socket (short sends are resubmitted here).
    pub fn send_batch(&mut self, fd: RawFd, mut batch: Box<SendBatch>, ctx: T) {
        assert!(!batch.is_empty(), "empty send batch");
        batch.prepare(&mut self.pool);
        let entry =
            opcode::SendMsg::new(types::Fd(fd), &batch.msg).flags(libc::MSG_NOSIGNAL as u32);
        self.push(entry.build(), Slot::new(ctx, Resources::Batch(batch), fd));
    }

    /// Reads the 8-byte counter of an eventfd into `word`.
    pub fn read_word(&mut self, fd: RawFd, mut word: Box<u64>, ctx: T) {
        let address: *mut u64 = &mut *word;
        let entry = opcode::Read::new(types::Fd(fd), address.cast(), 8).build();
        self.push(entry, Slot::new(ctx, Resources::Word(word), fd));
    }

    /// Completes with `-ETIME` after `duration`.
    pub fn timeout(&mut self, duration: Duration, ctx: T) {
        let timespec = Box::new(
            types::Timespec::new()
                .sec(duration.as_secs())
                .nsec(duration.subsec_nanos()),
        );
        let entry = opcode::Timeout::new(&*timespec).build();
        self.push(entry, Slot::new(ctx, Resources::Timer(timespec), -1));
    }

    /// Cancels every in-flight operation on `fd` (best effort; each still completes).
    pub fn cancel_fd(&mut self, fd: RawFd) {
        let keys: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.fd == fd)
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            let entry = opcode::AsyncCancel::new(token::encode(key)).build();
            self.push_raw(entry.user_data(token::CANCEL));
        }
    }

    fn push(&mut self, entry: squeue::Entry, slot: Slot<T>) {
        let key = self.slots.insert(slot);
        self.push_raw(entry.user_data(token::encode(key)));
    }

    fn push_raw(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(entry);
            return;
        }
        // SAFETY: every pointer in `entry` refers to memory owned by the in-flight slot keyed
        // by its user_data (a pool `Buf`, a boxed batch/word/timespec) or to the pool mapping;
        // all of it stays alive and untouched until that slot's CQE is reaped (module docs).
        let pushed = unsafe { self.uring.submission().push(&entry) };
        if pushed.is_err() {
            self.backlog.push_back(entry);
        }
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(entry) = self.backlog.pop_front() {
            // SAFETY: as in `push_raw`: the entry's resources are owned by its in-flight slot.
            if unsafe { self.uring.submission().push(&entry) }.is_err() {
                self.backlog.push_front(entry);
                match self.uring.submit() {
                    Ok(_) => {}
                    Err(error) if error.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                    Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// Submits everything queued and waits until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<(), RingError> {
        self.flush_backlog().map_err(RingError::Enter)?;
        let want = if self.backlog.is_empty() { want } else { 0 };
        match self.uring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(RingError::Enter(error)),
        }
    }

    /// Moves up to `max` completions into `out` (reap first, run later: the caller dispatches
    /// them after this returns, so handlers never recurse into the completion queue).
    pub fn reap(&mut self, out: &mut Vec<Completion<T>>, max: usize) {
        self.cqes.clear();
        self.cqes.extend(self.uring.completion().take(max));
        for index in 0..self.cqes.len() {
            let cqe = &self.cqes[index];
            let (user_data, result) = (cqe.user_data(), cqe.result());
            let Some(key) = token::decode(user_data) else {
                continue;
            };
            let slot = self.slots.get_mut(key).expect("CQE for an empty slot");
            let resubmit = match &mut slot.resources {
                Resources::Batch(batch) if result > 0 => {
                    batch.advance(result as usize).then(|| {
                        opcode::SendMsg::new(types::Fd(slot.fd), &batch.msg)
                            .flags(libc::MSG_NOSIGNAL as u32)
                            .build()
                    })
                }
                _ => None,
            };
            if let Some(entry) = resubmit {
                self.push_raw(entry.user_data(user_data));
                continue;
            }
            let slot = self.slots.remove(key);
            out.push(Completion {
                ctx: slot.ctx,
                result,
                resources: slot.resources,
            });
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let keys: Vec<usize> = self.slots.iter().map(|(key, _)| key).collect();
        for key in keys {
            let entry = opcode::AsyncCancel::new(token::encode(key)).build();
            self.push_raw(entry.user_data(token::CANCEL));
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.slots.is_empty() && std::time::Instant::now() < deadline {
            if self.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut out, usize::MAX);
            out.clear();
        }
        if !self.slots.is_empty() {
            // The kernel still owns buffers in the pool: leak the mapping rather than free
            // memory it may write to.
            let pool = std::mem::replace(&mut self.pool, BufPool::new(0).expect("tiny pool"));
            std::mem::forget(pool);
        }
    }
}

/// Largest number of iovecs in one send batch.
pub const SEND_IOVECS_MAX: usize = 128;

/// A list of byte runs sent with one `sendmsg`: small owned bytes (reply headers) and ranges
/// of pool buffers (read data), which the batch owns until the send completes.
pub struct SendBatch {
    bytes: Vec<u8>,
    parts: Vec<Part>,
    bufs: Vec<Buf>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    first_iov: usize,
    sent_bytes: usize,
    total_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Bytes { start: usize, len: usize },
    Buf { index: usize, at: usize, len: usize },
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("parts", &self.parts.len())
            .field("total_bytes", &self.total_bytes)
            .field("sent_bytes", &self.sent_bytes)
            .finish()
    }
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            bytes: Vec::with_capacity(16 * 1024),
            parts: Vec::with_capacity(SEND_IOVECS_MAX),
            bufs: Vec::with_capacity(SEND_IOVECS_MAX),
            iov: Vec::with_capacity(SEND_IOVECS_MAX),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            first_iov: 0,
            sent_bytes: 0,
            total_bytes: 0,
        }
    }
}

impl SendBatch {
    /// Whether another run fits (the iovec array is bounded).
    pub fn has_room(&self, runs: usize) -> bool {
        self.parts.len() + runs <= SEND_IOVECS_MAX
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Whether every queued byte was sent (checked on completion).
    pub fn is_complete(&self) -> bool {
        self.sent_bytes == self.total_bytes
    }

    /// Bytes queued in the batch.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Appends a copy of `bytes` (reply headers, handshake replies).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        assert!(self.has_room(1));
        if bytes.is_empty() {
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        self.parts.push(Part::Bytes {
            start,
            len: bytes.len(),
        });
        self.total_bytes += bytes.len();
    }

    /// Appends `buf[at..at + len]`; the batch owns `buf` until [`SendBatch::take_bufs`].
    pub fn push_buf(&mut self, buf: Buf, at: usize, len: usize) {
        assert!(self.has_room(1));
        assert!(at + len <= buf.capacity());
        let index = self.bufs.len();
        self.bufs.push(buf);
        if len > 0 {
            self.parts.push(Part::Buf { index, at, len });
            self.total_bytes += len;
        }
    }

    /// Appends another range of the buffer pushed last (chunked READ replies send several
    /// ranges of one buffer); the batch already owns that buffer.
    pub fn push_buf_range(&mut self, at: usize, len: usize) {
        assert!(self.has_room(1));
        let index = self.bufs.len().checked_sub(1).expect("a buffer was pushed");
        assert!(at + len <= self.bufs[index].capacity());
        if len > 0 {
            self.parts.push(Part::Buf { index, at, len });
            self.total_bytes += len;
        }
    }

    /// Hands the unconsumed bytes, in order, to `sink` (which returns how many of the offered
    /// bytes it took) instead of sending them: the user-space TLS path encrypts a batch
    /// rather than submitting it. Stops when `sink` takes less than offered; returns whether
    /// every byte was consumed, or the sink's error.
    pub fn drain_into<E>(
        &mut self,
        pool: &BufPool,
        mut sink: impl FnMut(&[u8]) -> Result<usize, E>,
    ) -> Result<bool, E> {
        let mut skip = self.sent_bytes;
        for part in &self.parts {
            let run = match *part {
                Part::Bytes { start, len } => &self.bytes[start..start + len],
                Part::Buf { index, at, len } => &pool.bytes(&self.bufs[index])[at..at + len],
            };
            if skip >= run.len() {
                skip -= run.len();
                continue;
            }
            let offered = &run[skip..];
            skip = 0;
            let taken = sink(offered)?;
            assert!(taken <= offered.len(), "sink took more than offered");
            self.sent_bytes += taken;
            if taken < offered.len() {
                return Ok(false);
            }
        }
        Ok(self.sent_bytes == self.total_bytes)
    }

    /// After the send completed: empties the batch, handing back the buffers it owned.
    pub fn take_bufs(&mut self) -> std::vec::Drain<'_, Buf> {
        self.bytes.clear();
        self.parts.clear();
        self.iov.clear();
        self.first_iov = 0;
        self.sent_bytes = 0;
        self.total_bytes = 0;
        self.bufs.drain(..)
    }

    /// Builds the iovec array and msghdr; the batch is boxed, so their addresses are stable.
    fn prepare(&mut self, pool: &mut BufPool) {
        self.iov.clear();
        for part in &self.parts {
            let (base, len) = match *part {
                Part::Bytes { start, len } => (self.bytes[start..].as_mut_ptr(), len),
                Part::Buf { index, at, len } => (pool.address(&self.bufs[index], at, len), len),
            };
            self.iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
        }
        self.first_iov = 0;
        self.sent_bytes = 0;
        self.point_msg();
    }

    fn point_msg(&mut self) {
        self.msg.msg_iov = self.iov[self.first_iov..].as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() - self.first_iov;
    }

    /// Accounts `sent` bytes; returns true if bytes remain (the caller resubmits).
    fn advance(&mut self, mut sent: usize) -> bool {
        self.sent_bytes += sent;
        assert!(
            self.sent_bytes <= self.total_bytes,
            "kernel sent more than queued"
        );
        if self.sent_bytes == self.total_bytes {
            return false;
        }
        while sent > 0 {
            let iov = &mut self.iov[self.first_iov];
            if sent >= iov.iov_len {
                sent -= iov.iov_len;
                self.first_iov += 1;
            } else {
                // Pointer arithmetic on a plain address: the iovec stays inside its run.
                iov.iov_base = (iov.iov_base as usize + sent) as *mut libc::c_void;
                iov.iov_len -= sent;
                sent = 0;
            }
        }
        self.point_msg();
        true
    }
}
