//! One shard: a thread pinned to a core, owning one [`Ring`], its registered buffer pool, a
//! slab of connections and a slab of in-flight requests.
//!
//! # Tick
//!
//! `submit_and_wait(1)`, reap a bounded batch of completions, then dispatch each: reap first,
//! run later. New connections arrive over a crossbeam channel with an eventfd wake-up that
//! has a read posted on the ring.
//!
//! # Connection contract
//!
//! * At most one receive and one send are in flight per connection; replies queue in `out`
//!   and leave in batches (one `sendmsg` carries up to [`SEND_IOVECS_MAX`] runs), in
//!   completion order: replies are out of order with respect to requests.
//! * A small WRITE (up to [`WHOLE_WRITE_BYTES_MAX`] with its header) starts once it is
//!   wholly in the receive buffer, and its payload is copied from there (one copy is cheaper
//!   than a ring receive per payload). A larger one copies what arrived with the header and
//!   receives the rest straight into the request's pool buffer.
//! * FLUSH is an `fdatasync` of the export's file. A reply is queued only after its
//!   operation completed, so every write already replied to is on the file when the flush is
//!   issued; fdatasync covers all descriptors of the file, hence CAN_MULTI_CONN.
//! * Backpressure: when the pool has no buffer for a request, or the connection has
//!   `queue_depth` requests alive, the connection stops parsing (and so stops receiving) until
//!   a reply is sent. Memory is bounded by the pool, never by client behaviour.
//! * A connection is freed only when no receive, send or request of it is in flight.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use slab::Slab;

use crate::access::{Anonymous, ClientIdentity, Denied, Peer};
use crate::config::{RECV_BUFFER_BYTES, RING_ENTRIES, SHUTDOWN_GRACE_SECONDS};
pub use crate::exports::Export;
use crate::exports::Exports;
use crate::faults::Durable;
use crate::ring::{Buf, Completion, Ring, RingConfig, RingError, SendBatch};
use crate::security::{Security, SecurityCell};
use crate::stats::{self, ShardStats, StatsHub};
use crate::target::codec::{self, Extent, ReplyHead, ReplyStyle};
use crate::target::export::ExportInfo;
use crate::target::fault::FaultOp;
use crate::target::handshake::{Access, Event, Gate, Handshake, HandshakeConfig, Session};
use crate::target::proto::{self, NbdErrno};
use crate::target::sparse::{self, ReadChunks};
use crate::target::validate::{self, Command, Verdict};
use crate::tls::Identity;

// Every handshake option the protocol engine buffers must fit a connection's receive buffer.
const _: () = assert!(RECV_BUFFER_BYTES >= crate::target::handshake::HANDSHAKE_INPUT_BYTES_MAX);

/// READs and WRITEs of memory exports up to this size are copied in the shard (`pread`/
/// `pwrite` on the memfd) instead of going through the ring: tmpfs does not serve io_uring
/// reads inline, so each one would wake one of io_uring's worker threads, a thread hand-off
/// that costs more than copying 64 KiB. Larger ones still go through the ring (and its
/// workers), so a big copy does not hold up the shard's other connections.
const MEMORY_INLINE_BYTES_MAX: usize = 64 << 10;
/// Completions handled per tick.
const COMPLETIONS_PER_TICK_MAX: usize = 512;
/// How often a shard copies its statistics to the shared hub.
const STATS_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// Largest chunk of the zero-writing fallback for WRITE_ZEROES.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// WRITEs up to this size (header and payload) start only once wholly buffered: the rest
/// comes with the next ordinary receive instead of a receive of just the payload's tail.
const WHOLE_WRITE_BYTES_MAX: usize = RECV_BUFFER_BYTES / 2;
/// Unparsed input up to this size is moved to the front of the receive buffer before the
/// next receive, so that receive has the whole buffer (a partial message is this small).
const COMPACT_BYTES_MAX: usize = 8 * 1024;

/// State shared by the server and every shard.
#[derive(Debug)]
pub struct Shared {
    /// Every export by id, and the list new clients may choose from.
    pub exports: Exports,
    /// TLS and listener-wide access rules for new connections.
    pub security: SecurityCell,
    /// Set once on SIGTERM/SIGINT.
    pub stopping: AtomicBool,
    /// In-flight requests allowed per connection.
    pub queue_depth: u32,
    /// Registered pool bytes per shard.
    pub pool_bytes: usize,
    /// Where shards publish their statistics.
    pub stats: StatsHub,
    /// Longest a client may take to finish the handshake.
    pub handshake_timeout: Duration,
}

/// A connected client socket.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(stream) => stream.as_raw_fd(),
            Socket::Unix(stream) => stream.as_raw_fd(),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(stream) => stream.shutdown(Shutdown::Both),
            Socket::Unix(stream) => stream.shutdown(Shutdown::Both),
        };
    }
}

mod tls;

/// A connection handed from the acceptor to a shard.
#[derive(Debug)]
pub struct NewConn {
    /// The accepted socket.
    pub socket: Socket,
    /// Who connected (access checks, logs).
    pub peer: Peer,
    /// The CPU that receives the connection's packets (TCP's `SO_INCOMING_CPU`), if known.
    pub receive_cpu: Option<usize>,
}

/// What a shard exposes to the acceptor.
#[derive(Debug, Default)]
pub struct ShardLoad {
    /// Live connections (for least-loaded placement).
    pub connections: AtomicUsize,
    /// Runs on a CPU that takes the exports' disk interrupts (see [`crate::placement`]).
    pub preferred: AtomicBool,
    /// The CPU whose connections this shard takes, plus one; 0 for none.
    receive_cpu: AtomicUsize,
}

impl ShardLoad {
    /// The CPU whose connections this shard takes (see [`crate::placement::choose`]).
    pub fn receive_cpu(&self) -> Option<usize> {
        self.receive_cpu.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Sets (or, with `None`, clears) the CPU whose connections this shard takes.
    pub fn set_receive_cpu(&self, cpu: Option<usize>) {
        self.receive_cpu
            .store(cpu.map_or(0, |cpu| cpu + 1), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Ctx {
    Wake,
    Recv(usize),
    Payload(usize),
    Send(usize),
    TlsRecv(usize),
    TlsSend(usize),
    Io(usize),
    HandshakeTimer(usize, u64),
    StopTimer,
    StatsTimer,
    Delayed(usize),
}

#[derive(Debug)]
enum Phase {
    Handshake(Box<Handshake>),
    Transmission(Session),
}

#[derive(Debug)]
enum Out {
    Head(ReplyHead),
    Data(ReplyHead, Buf, usize, usize),
    Bytes(Vec<u8>, bool),
    Sparse(SparseRead),
    /// Everything before this left in plaintext (the STARTTLS ACK); encrypt what follows.
    StartTls,
}

/// A READ reply of several data and hole chunks; data chunks are ranges of `buf`.
#[derive(Debug)]
struct SparseRead {
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    chunks: ReadChunks,
    buf: Buf,
    skip: usize,
}

// A sparse reply always fits an empty send batch (a header and a data run per chunk).
const _: () = assert!(2 * sparse::READ_CHUNKS_MAX <= crate::ring::SEND_IOVECS_MAX);

#[derive(Debug)]
struct Payload {
    request: usize,
    filled: usize,
    total: usize,
}

#[derive(Debug)]
struct Conn {
    socket: Socket,
    fd: RawFd,
    generation: u64,
    /// Who connected (access checks, logs).
    peer: Peer,
    /// TLS and access settings in force when it was accepted.
    security: Arc<Security>,
    /// User-space TLS, from STARTTLS until the connection closes or moves to kernel TLS.
    tls: Option<Box<tls::TlsLink>>,
    /// The client's TLS identity, once TLS is up.
    identity: Option<Identity>,
    /// TLS is up (in user space or in the kernel).
    encrypted: bool,
    /// Export whose connection slot this client holds (released when it closes).
    claimed: Option<usize>,
    phase: Phase,
    rbuf: Option<Buf>,
    rstart: usize,
    rend: usize,
    recv_busy: bool,
    payload: Option<Payload>,
    drain: u64,
    out: VecDeque<Out>,
    batch: Option<Box<SendBatch>>,
    batch_replies: usize,
    /// Requests with an operation or payload receive in flight.
    ops: usize,
    /// Replies queued or being sent.
    unsent: usize,
    closing: bool,
    close_when_idle: bool,
    stop_reading: bool,
    wait_buffers: bool,
    export: usize,
    /// Power epoch of the export when the handshake finished (power-loss simulation).
    epoch: u64,
    /// The exports offered when this connection was accepted.
    offered: Arc<Vec<ExportInfo>>,
}

impl Conn {
    /// A plaintext batch or a TLS ciphertext send is in flight.
    fn send_in_flight(&self) -> bool {
        self.batch.is_none() || self.tls.as_ref().is_some_and(|link| link.is_sending())
    }
}

/// What fault injection does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Run it, after this delay if any.
    Proceed(Option<Duration>),
    /// Answer this error instead.
    Fail(NbdErrno),
    /// The export lost power since the connection started: close it.
    PowerLost,
}

/// Why parsing of a connection's input stopped (or that it can go on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Progress,
    NeedInput,
    Blocked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    ZeroWrite,
    Cache,
    SyncAfter,
}

#[derive(Debug)]
struct Request {
    started: Instant,
    stat: stats::Op,
    conn: usize,
    cookie: u64,
    offset: u64,
    length: u64,
    op: Op,
    fd: RawFd,
    file_offset: u64,
    span: usize,
    done: u64,
    skip: usize,
    buf: Option<Buf>,
    fua: bool,
    fast: bool,
    /// READ with `NBD_CMD_FLAG_DF`: one content chunk.
    df: bool,
    mode: i32,
    /// Injected delay still to wait before the operation is submitted.
    delay: Option<Duration>,
    /// Counted in the export's power-loss in-flight count.
    power_counted: bool,
}

/// Runs one shard until the server stops. Call on the shard's own thread.
pub fn run(
    index: usize,
    shared: Arc<Shared>,
    incoming: Receiver<NewConn>,
    wake_fd: RawFd,
    load: Arc<ShardLoad>,
    ready: crossbeam_channel::Sender<Result<(), String>>,
) -> Result<(), RingError> {
    let ring = Ring::new(RingConfig {
        entries: RING_ENTRIES,
        pool_bytes: shared.pool_bytes,
        in_flight_max: RING_ENTRIES as usize * 2,
    });
    let ring = match ring {
        Ok(ring) => {
            let _ = ready.send(Ok(()));
            ring
        }
        Err(error) => {
            let _ = ready.send(Err(format!("shard {index}: {error}")));
            return Err(error);
        }
    };
    if !ring.registered() {
        tracing::warn!(
            shard = index,
            "could not register the buffer pool (RLIMIT_MEMLOCK too low?); using unregistered \
             buffers. Raise the limit (LimitMEMLOCK=infinity, ulimit -l) for zero-copy I/O"
        );
    }
    let exports = shared.exports.len();
    let mut shard = Shard {
        index,
        ring,
        shared,
        incoming,
        wake_fd,
        load,
        conns: Slab::with_capacity(64),
        requests: Slab::with_capacity(1024),
        completions: Vec::with_capacity(COMPLETIONS_PER_TICK_MAX),
        waiting: VecDeque::new(),
        extents: Vec::with_capacity(proto::BLOCK_STATUS_EXTENTS_MAX),
        generation: 0,
        stop_deadline: None,
        stats: ShardStats::new(exports),
    };
    shard.ring.read_word(wake_fd, Box::new(0), Ctx::Wake);
    shard.ring.timeout(STATS_PUBLISH_INTERVAL, Ctx::StatsTimer);
    shard.run_loop()
}

struct Shard {
    index: usize,
    ring: Ring<Ctx>,
    shared: Arc<Shared>,
    incoming: Receiver<NewConn>,
    wake_fd: RawFd,
    load: Arc<ShardLoad>,
    conns: Slab<Conn>,
    requests: Slab<Request>,
    completions: Vec<Completion<Ctx>>,
    waiting: VecDeque<usize>,
    extents: Vec<Extent>,
    generation: u64,
    stop_deadline: Option<Instant>,
    stats: ShardStats,
}

impl Shard {
    fn run_loop(&mut self) -> Result<(), RingError> {
        loop {
            if self.stop_deadline.is_some() && self.conns.is_empty() {
                return Ok(());
            }
            self.ring.submit_and_wait(1)?;
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.reap(&mut completions, COMPLETIONS_PER_TICK_MAX);
            for completion in completions.drain(..) {
                self.dispatch(completion);
            }
            self.completions = completions;
            self.retry_waiting();
        }
    }

    fn dispatch(&mut self, completion: Completion<Ctx>) {
        let Completion {
            ctx,
            result,
            resources,
        } = completion;
        match ctx {
            Ctx::Wake => {
                self.ring
                    .read_word(self.wake_fd, resources.into_word(), Ctx::Wake);
                self.accept_new();
                self.check_stopping();
            }
            Ctx::Recv(key) => self.recv_done(key, result, resources.into_buf()),
            Ctx::Payload(key) => self.payload_done(key, result, resources.into_buf()),
            Ctx::Send(key) => self.send_done(key, result, resources.into_batch()),
            Ctx::TlsRecv(key) => self.tls_recv_done(key, result, resources.into_buf()),
            Ctx::TlsSend(key) => self.tls_send_done(key, result, resources.into_batch()),
            Ctx::Io(key) => self.io_done(key, result, resources),
            Ctx::HandshakeTimer(key, generation) => {
                let expired = self.conns.get(key).is_some_and(|conn| {
                    conn.generation == generation && matches!(conn.phase, Phase::Handshake(_))
                });
                if expired {
                    self.close(key, "handshake timed out");
                }
            }
            Ctx::Delayed(request_key) => {
                let conn_key = self.requests[request_key].conn;
                if self.conns[conn_key].closing {
                    self.drop_request(request_key);
                    self.conns[conn_key].ops -= 1;
                    self.maybe_free(conn_key);
                } else {
                    self.begin_io(request_key);
                }
            }
            Ctx::StatsTimer => {
                self.publish_stats();
                self.ring.timeout(STATS_PUBLISH_INTERVAL, Ctx::StatsTimer);
            }
            Ctx::StopTimer => {
                if self
                    .stop_deadline
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
                    for key in keys {
                        self.close(key, "shutdown grace period over");
                    }
                } else {
                    self.ring
                        .timeout(Duration::from_millis(200), Ctx::StopTimer);
                }
            }
        }
    }

    fn publish_stats(&mut self) {
        self.stats.in_flight = self.requests.len() as u64;
        self.shared.stats.publish(self.index, &self.stats);
    }

    fn accept_new(&mut self) {
        while let Ok(new) = self.incoming.try_recv() {
            if self.stop_deadline.is_some() {
                continue;
            }
            let Some(rbuf) = self.ring.pool_mut().check_out(RECV_BUFFER_BYTES) else {
                tracing::warn!(shard = self.index, peer = %new.peer, "buffer pool exhausted; refusing connection");
                continue;
            };
            self.generation += 1;
            let security = self.shared.security.current();
            let config = HandshakeConfig { tls: security.mode };
            let handshake = Box::new(Handshake::new(config));
            let mut greeting = Vec::with_capacity(32);
            handshake.greeting(&mut greeting);
            let fd = new.socket.fd();
            let key = self.conns.insert(Conn {
                socket: new.socket,
                fd,
                generation: self.generation,
                peer: new.peer,
                security,
                tls: None,
                identity: None,
                encrypted: false,
                claimed: None,
                phase: Phase::Handshake(handshake),
                rbuf: Some(rbuf),
                rstart: 0,
                rend: 0,
                recv_busy: false,
                payload: None,
                drain: 0,
                out: VecDeque::with_capacity(64),
                batch: Some(Box::default()),
                batch_replies: 0,
                ops: 0,
                unsent: 0,
                closing: false,
                close_when_idle: false,
                stop_reading: false,
                wait_buffers: false,
                export: 0,
                epoch: 0,
                offered: self.shared.exports.visible(),
            });
            self.load.connections.fetch_add(1, Ordering::Relaxed);
            self.stats.accepted_total += 1;
            self.stats.connections += 1;
            tracing::debug!(shard = self.index, peer = %self.conns[key].peer, "connection accepted");
            let timer = Ctx::HandshakeTimer(key, self.generation);
            self.ring.timeout(self.shared.handshake_timeout, timer);
            self.conns[key].out.push_back(Out::Bytes(greeting, false));
            self.kick_send(key);
            self.post_recv(key);
        }
    }

    fn check_stopping(&mut self) {
        if self.stop_deadline.is_some() || !self.shared.stopping.load(Ordering::Acquire) {
            return;
        }
        self.stop_deadline = Some(Instant::now() + Duration::from_secs(SHUTDOWN_GRACE_SECONDS));
        self.ring
            .timeout(Duration::from_millis(200), Ctx::StopTimer);
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            if matches!(conn.phase, Phase::Handshake(_)) {
                self.close(key, "server shutting down");
            } else {
                conn.close_when_idle = true;
                self.maybe_finish(key);
            }
        }
    }

    // ------------------------------------------------------------------ receive side

    fn post_recv(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.recv_busy || conn.closing || conn.stop_reading {
            return;
        }
        if conn.tls.is_some() {
            self.tls_post_recv(key);
            return;
        }
        if let Some(payload) = &conn.payload {
            let request = &mut self.requests[payload.request];
            let buf = request.buf.take().expect("payload buffer present");
            let (at, len) = (payload.filled, payload.total - payload.filled);
            conn.recv_busy = true;
            self.ring
                .recv(conn.fd, buf, at, len, true, Ctx::Payload(key));
            return;
        }
        if conn.wait_buffers {
            return;
        }
        if conn.rend == RECV_BUFFER_BYTES {
            // Parsing needs more bytes than the buffer holds: no valid message does that.
            self.close(key, "message larger than the receive buffer");
            return;
        }
        let buf = conn.rbuf.take().expect("receive buffer present");
        conn.recv_busy = true;
        let (at, len) = (conn.rend, RECV_BUFFER_BYTES - conn.rend);
        self.ring.recv(conn.fd, buf, at, len, false, Ctx::Recv(key));
    }

    fn recv_done(&mut self, key: usize, result: i32, buf: Buf) {
        let conn = &mut self.conns[key];
        conn.recv_busy = false;
        conn.rbuf = Some(buf);
        if self.recv_ended(key, result) {
            return;
        }
        self.conns[key].rend += result as usize;
        self.process_input(key);
    }

    /// After a receive completed (its buffer returned): true when the connection is closing
    /// or the receive ended it (EOF, error), which this handles.
    fn recv_ended(&mut self, key: usize, result: i32) -> bool {
        if self.conns[key].closing {
            self.maybe_free(key);
            return true;
        }
        if result <= 0 {
            let conn = &self.conns[key];
            let kernel_tls = conn.encrypted && conn.tls.is_none();
            let reason = match result {
                0 => "client closed the connection",
                // Kernel TLS: a non-data record (the client's close_notify) fails a plain recv.
                _ if kernel_tls && result == -libc::EIO => "client ended the TLS session",
                _ => "receive failed",
            };
            self.close(key, reason);
            return true;
        }
        false
    }

    fn payload_done(&mut self, key: usize, result: i32, buf: Buf) {
        let conn = &mut self.conns[key];
        conn.recv_busy = false;
        let payload = conn.payload.as_mut().expect("payload in progress");
        let request_key = payload.request;
        self.requests[request_key].buf = Some(buf);
        if conn.closing || result <= 0 {
            let already_closing = conn.closing;
            conn.payload = None;
            conn.ops -= 1;
            self.drop_request(request_key);
            // close() frees the connection when it is idle; never touch it after that.
            if already_closing {
                self.maybe_free(key);
            } else {
                self.close(key, "connection lost during a write payload");
            }
            return;
        }
        payload.filled += result as usize;
        if payload.filled < payload.total {
            self.post_recv(key);
            return;
        }
        conn.payload = None;
        self.begin_io(request_key);
        self.process_input(key);
    }

    /// Parses everything buffered, starting what can be started; receives again only when
    /// parsing stopped for want of bytes. A throttled connection (queue depth, no buffers)
    /// is resumed by `send_done` or `retry_waiting`, never by a receive: a client may be
    /// waiting for replies before it sends more.
    fn process_input(&mut self, key: usize) {
        loop {
            if !self.parse_input(key) || !self.conns.contains(key) {
                return;
            }
            if self.conns[key].tls.is_some() {
                match self.tls_pump(key) {
                    tls::Pump::Plaintext => continue,
                    tls::Pump::Idle => {}
                    tls::Pump::Closed => return,
                }
            }
            self.post_recv(key);
            return;
        }
    }

    /// One parsing pass over the buffered input; true when it stopped for want of bytes.
    fn parse_input(&mut self, key: usize) -> bool {
        let mut need_input = false;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return false;
            };
            if conn.recv_busy || conn.closing || conn.stop_reading {
                return false;
            }
            if conn.payload.is_some() {
                // Over TLS the payload arrives decrypted in the receive buffer (plaintext
                // connections receive it straight into the request's buffer instead).
                if conn.tls.is_some() && self.payload_from_input(key) {
                    continue;
                }
                need_input = true;
                break;
            }
            let available = conn.rend - conn.rstart;
            if conn.drain > 0 {
                let skipped = conn.drain.min(available as u64);
                conn.rstart += skipped as usize;
                conn.drain -= skipped;
                if conn.drain > 0 {
                    need_input = true;
                    break;
                }
                continue;
            }
            let step = match conn.phase {
                Phase::Handshake(_) => self.handshake_step(key),
                Phase::Transmission(_) => self.transmission_step(key),
            };
            match step {
                Step::Progress => {}
                Step::NeedInput => {
                    need_input = true;
                    break;
                }
                Step::Blocked => break,
            }
        }
        if self.conns.contains(key) {
            self.compact(key);
        }
        need_input
    }

    fn compact(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(rbuf) = &conn.rbuf else { return };
        if conn.rstart == conn.rend {
            conn.rstart = 0;
            conn.rend = 0;
        } else if conn.rstart > 0
            && (conn.rend == RECV_BUFFER_BYTES
                || conn.rstart >= RECV_BUFFER_BYTES / 2
                || conn.rend - conn.rstart <= COMPACT_BYTES_MAX)
        {
            let bytes = self.ring.pool_mut().bytes_mut(rbuf);
            bytes.copy_within(conn.rstart..conn.rend, 0);
            conn.rend -= conn.rstart;
            conn.rstart = 0;
        }
    }

    fn handshake_step(&mut self, key: usize) -> Step {
        let conn = &mut self.conns[key];
        let Phase::Handshake(handshake) = &mut conn.phase else {
            unreachable!()
        };
        let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
        let input = &self.ring.pool().bytes(rbuf)[conn.rstart..conn.rend];
        let mut reply = Vec::new();
        let mut gate = ConnGate {
            shard: self.index,
            exports: &self.shared.exports,
            peer: &conn.peer,
            identity: conn
                .identity
                .as_ref()
                .map(|identity| identity as &dyn ClientIdentity),
            claimed: &mut conn.claimed,
        };
        let (consumed, event) =
            handshake.advance_gated(input, &conn.offered, &mut gate, &mut reply);
        assert!(consumed <= input.len());
        conn.rstart += consumed;
        if !reply.is_empty() {
            conn.out.push_back(Out::Bytes(reply, false));
        }
        let mut start_tls = false;
        let step = match event {
            Event::NeedMore if consumed > 0 => Step::Progress,
            Event::NeedMore => Step::NeedInput,
            Event::Done(session) => {
                tracing::info!(
                    shard = self.index, peer = %conn.peer,
                    export = %self.shared.exports[session.export_id].info.name,
                    style = ?session.reply_style, tls = conn.encrypted,
                    identity = conn.identity.as_ref().map(Identity::describe),
                    "client connected"
                );
                conn.export = session.export_id;
                conn.epoch = self.shared.exports[session.export_id].faults.epoch();
                self.stats.export_mut(session.export_id).connections_total += 1;
                conn.phase = Phase::Transmission(session);
                set_nodelay(&conn.socket);
                Step::Progress
            }
            Event::StartTls => {
                start_tls = true;
                Step::NeedInput
            }
            Event::Close(reason) => {
                tracing::debug!(shard = self.index, peer = %conn.peer, reason, "handshake ended");
                conn.stop_reading = true;
                conn.close_when_idle = true;
                Step::Blocked
            }
        };
        if conn.rend == RECV_BUFFER_BYTES && conn.rstart == 0 && step == Step::NeedInput {
            // An option larger than the receive buffer that the handshake did not skip.
            conn.stop_reading = true;
            conn.close_when_idle = true;
        }
        let step = if start_tls { self.start_tls(key) } else { step };
        self.kick_send(key);
        self.maybe_finish(key);
        if self.conns.contains(key) {
            step
        } else {
            Step::Blocked
        }
    }

    fn transmission_step(&mut self, key: usize) -> Step {
        let queue_depth = self.shared.queue_depth as usize;
        let conn = &mut self.conns[key];
        let Phase::Transmission(session) = &conn.phase else {
            unreachable!()
        };
        if conn.ops + conn.unsent >= queue_depth {
            return Step::Blocked;
        }
        let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
        let input = &self.ring.pool().bytes(rbuf)[conn.rstart..conn.rend];
        let extended = session.reply_style == ReplyStyle::Extended;
        let (request, header_bytes) = match codec::decode_request(input, extended) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Step::NeedInput,
            Err(error) => {
                tracing::info!(shard = self.index, peer = %conn.peer, %error, "protocol error");
                self.stats.protocol_errors_total += 1;
                self.close(key, "bad request magic");
                return Step::Blocked;
            }
        };
        let export = &self.shared.exports[conn.export];
        let verdict = validate::validate(&request, &export.lenient, session);
        let style = session.reply_style;
        let buffered = conn.rend - conn.rstart;
        match verdict {
            Verdict::Serve(Command::Disconnect) => {
                conn.rstart += header_bytes;
                conn.stop_reading = true;
                conn.close_when_idle = true;
                self.maybe_finish(key);
                Step::Blocked
            }
            Verdict::Serve(command) if self.stop_deadline.is_some() => {
                let payload = match command {
                    Command::Write { length, .. } => length,
                    _ => 0,
                };
                conn.rstart += header_bytes;
                conn.drain = payload;
                let head =
                    codec::reply_error(style, request.cookie, request.offset, NbdErrno::Shutdown);
                self.queue_reply(key, Out::Head(head));
                Step::Progress
            }
            Verdict::Serve(Command::Write { length, .. })
                if small_write_split(header_bytes, length, buffered) =>
            {
                Step::NeedInput
            }
            Verdict::Serve(command) => match self.fault_check(key, command) {
                Fault::Proceed(delay) => {
                    if self.start(key, &request, command, header_bytes, delay) {
                        Step::Progress
                    } else {
                        Step::Blocked
                    }
                }
                Fault::Fail(errno) => {
                    let conn = &mut self.conns[key];
                    conn.rstart += header_bytes;
                    conn.drain = match command {
                        Command::Write { length, .. } => length,
                        _ => 0,
                    };
                    let head = codec::reply_error(style, request.cookie, request.offset, errno);
                    self.queue_reply(key, Out::Head(head));
                    Step::Progress
                }
                Fault::PowerLost => {
                    self.close(key, "export lost power (simulated power cut)");
                    Step::Blocked
                }
            },
            Verdict::Reject {
                errno,
                payload_bytes,
            } => {
                conn.rstart += header_bytes;
                conn.drain = payload_bytes;
                let head = codec::reply_error(style, request.cookie, request.offset, errno);
                self.queue_reply(key, Out::Head(head));
                Step::Progress
            }
            Verdict::Disconnect(reason) => {
                tracing::info!(shard = self.index, peer = %conn.peer, reason, "protocol violation");
                self.stats.protocol_errors_total += 1;
                self.close(key, reason);
                Step::Blocked
            }
        }
    }

    /// Starts a valid command; false (nothing consumed) when the pool has no buffer for it.
    fn start(
        &mut self,
        key: usize,
        request: &codec::Request,
        command: Command,
        header: usize,
        delay: Option<Duration>,
    ) -> bool {
        let export_id = self.conns[key].export;
        let backend = &self.shared.exports[export_id].backend;
        let stat = match command {
            Command::Read { .. } => stats::Op::Read,
            Command::Write { .. } => stats::Op::Write,
            Command::Trim { .. } => stats::Op::Trim,
            Command::WriteZeroes { .. } => stats::Op::WriteZeroes,
            Command::Cache { .. } => stats::Op::Cache,
            Command::BlockStatus { .. } => stats::Op::BlockStatus,
            Command::Flush | Command::Disconnect => stats::Op::Flush,
        };
        let mut new = Request {
            started: Instant::now(),
            stat,
            conn: key,
            cookie: request.cookie,
            offset: request.offset,
            length: 0,
            op: Op::Flush,
            fd: backend.control_fd(),
            file_offset: 0,
            span: 0,
            done: 0,
            skip: 0,
            buf: None,
            fua: false,
            fast: false,
            df: false,
            mode: 0,
            delay,
            power_counted: false,
        };
        match command {
            Command::Read { offset, length, df } => {
                let (fd, file_offset, span, skip) = backend.read_plan(offset, length);
                let Some(buf) = self.check_out(key, span as usize) else {
                    return false;
                };
                new = Request {
                    op: Op::Read,
                    fd,
                    file_offset,
                    length,
                    buf: Some(buf),
                    df,
                    ..new
                };
                new.span = span as usize;
                new.skip = skip as usize;
            }
            Command::Write {
                offset,
                length,
                fua,
            } => {
                let fd = backend.write_fd(offset, length);
                let Some(buf) = self.check_out(key, length as usize) else {
                    return false;
                };
                new = Request {
                    op: Op::Write,
                    fd,
                    file_offset: offset,
                    length,
                    fua,
                    ..new
                };
                new.span = length as usize;
                new.buf = Some(buf);
            }
            Command::Flush => {}
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                let align = u64::from(backend.alignment());
                let start = offset.div_ceil(align) * align;
                let end = (offset + length) / align * align;
                new = Request {
                    op: Op::Trim,
                    file_offset: start,
                    fua,
                    ..new
                };
                new.length = end.saturating_sub(start);
                new.mode = crate::target::backend::FALLOC_PUNCH_HOLE;
            }
            Command::WriteZeroes {
                offset,
                length,
                no_hole,
                fast,
                fua,
            } => {
                new = Request {
                    op: Op::Zero,
                    file_offset: offset,
                    length,
                    fua,
                    fast,
                    ..new
                };
                match backend.zero_mode(no_hole) {
                    Some(mode) => new.mode = mode,
                    None if fast => {
                        return self.reply_now(key, request, header, NbdErrno::NotSup);
                    }
                    None => new.op = Op::ZeroWrite,
                }
            }
            Command::Cache { offset, length } => {
                new = Request {
                    op: Op::Cache,
                    file_offset: offset,
                    length,
                    ..new
                };
            }
            Command::BlockStatus {
                offset,
                length,
                req_one,
            } => {
                self.conns[key].rstart += header;
                self.block_status(key, request, offset, length, req_one);
                return true;
            }
            Command::Disconnect => unreachable!("handled by the caller"),
        }
        if new.op == Op::ZeroWrite {
            let chunk = (new.length as usize).min(ZERO_CHUNK_BYTES);
            let Some(buf) = self.check_out(key, chunk.max(1)) else {
                return false;
            };
            self.ring.pool_mut().bytes_mut(&buf).fill(0);
            new.buf = Some(buf);
        }
        let conn = &mut self.conns[key];
        conn.rstart += header;
        conn.ops += 1;
        let write_payload = (new.op == Op::Write).then_some(new.span);
        let request_key = self.requests.insert(new);
        if let Some(total) = write_payload {
            self.conns[key].payload = Some(Payload {
                request: request_key,
                filled: 0,
                total,
            });
            self.payload_from_input(key);
            return true;
        }
        self.begin_io(request_key);
        true
    }

    /// Copies the buffered input that belongs to the pending WRITE payload into the
    /// request's buffer (plaintext: what arrived with the header; TLS: every decrypted
    /// byte). True when the payload is complete and the write has started.
    fn payload_from_input(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        let payload = conn.payload.as_mut().expect("payload in progress");
        let request_key = payload.request;
        let take = (conn.rend - conn.rstart).min(payload.total - payload.filled);
        let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
        let target = self.requests[request_key]
            .buf
            .as_ref()
            .expect("write buffer");
        self.ring
            .pool_mut()
            .copy_between(rbuf, conn.rstart, target, payload.filled, take);
        conn.rstart += take;
        payload.filled += take;
        if payload.filled < payload.total {
            return false;
        }
        conn.payload = None;
        self.begin_io(request_key);
        true
    }

    fn check_out(&mut self, key: usize, bytes: usize) -> Option<Buf> {
        let buf = self.ring.pool_mut().check_out(bytes.max(1));
        if buf.is_none() {
            let conn = &mut self.conns[key];
            if !conn.wait_buffers {
                conn.wait_buffers = true;
                self.waiting.push_back(key);
            }
        }
        buf
    }

    fn retry_waiting(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some(key) = self.waiting.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.wait_buffers = false;
            self.process_input(key);
        }
    }

    fn reply_now(
        &mut self,
        key: usize,
        request: &codec::Request,
        header: usize,
        errno: NbdErrno,
    ) -> bool {
        let conn = &mut self.conns[key];
        conn.rstart += header;
        let Phase::Transmission(session) = &conn.phase else {
            unreachable!()
        };
        let head = codec::reply_error(session.reply_style, request.cookie, request.offset, errno);
        self.queue_reply(key, Out::Head(head));
        true
    }

    fn block_status(
        &mut self,
        key: usize,
        request: &codec::Request,
        offset: u64,
        length: u64,
        one: bool,
    ) {
        let conn = &self.conns[key];
        let Phase::Transmission(session) = &conn.phase else {
            unreachable!()
        };
        let style = session.reply_style;
        let context = session
            .base_allocation
            .expect("validated: a context is negotiated");
        let backend = &self.shared.exports[conn.export].backend;
        let (export, started) = (conn.export, Instant::now());
        let extents_max = if one {
            1
        } else {
            proto::BLOCK_STATUS_EXTENTS_MAX
        };
        let mut extents = std::mem::take(&mut self.extents);
        let out = match backend.block_status(offset, length, extents_max, &mut extents) {
            Ok(()) => {
                let mut bytes = vec![0; codec::block_status_reply_bytes(style, extents.len())];
                let len = codec::reply_block_status(
                    style,
                    request.cookie,
                    request.offset,
                    context,
                    &extents,
                    &mut bytes,
                );
                bytes.truncate(len);
                Out::Bytes(bytes, true)
            }
            Err(error) => {
                tracing::warn!(%error, "block status failed");
                Out::Head(codec::reply_error(
                    style,
                    request.cookie,
                    request.offset,
                    NbdErrno::Io,
                ))
            }
        };
        self.extents = extents;
        let latency_ns = started.elapsed().as_nanos() as u64;
        let error = matches!(out, Out::Head(_));
        self.stats
            .record(export, stats::Op::BlockStatus, 0, latency_ns, error);
        self.queue_reply(key, out);
    }

    // ------------------------------------------------------------------ backend side

    /// Injected faults for a request about to start (one relaxed load when none are set).
    fn fault_check(&mut self, key: usize, command: Command) -> Fault {
        let conn = &self.conns[key];
        let export = &self.shared.exports[conn.export];
        if !export.faults.powered(conn.epoch) {
            return Fault::PowerLost;
        }
        let (op, offset, length) = match command {
            Command::Read { offset, length, .. } => (FaultOp::Read, offset, length),
            Command::Write { offset, length, .. } => (FaultOp::Write, offset, length),
            Command::Flush => (FaultOp::Flush, 0, 0),
            Command::Trim { offset, length, .. } => (FaultOp::Trim, offset, length),
            Command::WriteZeroes { offset, length, .. } => (FaultOp::Zero, offset, length),
            Command::Cache { offset, length } => (FaultOp::Cache, offset, length),
            Command::BlockStatus { offset, length, .. } => (FaultOp::BlockStatus, offset, length),
            Command::Disconnect => return Fault::Proceed(None),
        };
        let Some(decision) = export.faults.decide(op, offset, length) else {
            return Fault::Proceed(None);
        };
        tracing::warn!(
            export = %export.info.name, ?op, offset, length, sequence = decision.sequence,
            seed = export.faults.seed(), error = ?decision.error, delay = ?decision.delay,
            "injected fault"
        );
        match decision.error {
            Some(errno) => Fault::Fail(errno),
            None => Fault::Proceed(decision.delay),
        }
    }

    /// Submits a started request: after its injected delay (a ring timeout), and with the
    /// power-loss bookkeeping of its export (in-flight count, pre-images).
    fn begin_io(&mut self, request_key: usize) {
        let request = &mut self.requests[request_key];
        if let Some(delay) = request.delay.take() {
            self.ring.timeout(delay, Ctx::Delayed(request_key));
            return;
        }
        let conn_key = request.conn;
        let conn = &self.conns[conn_key];
        let export = &self.shared.exports[conn.export];
        if export.faults.power_loss() {
            if !export.faults.begin(conn.epoch) {
                self.drop_request(request_key);
                self.conns[conn_key].ops -= 1;
                self.close(conn_key, "export lost power (simulated power cut)");
                return;
            }
            request.power_counted = true;
            let modifies = matches!(request.op, Op::Write | Op::Trim | Op::Zero | Op::ZeroWrite);
            let (offset, length) = (request.file_offset, request.length);
            if modifies
                && !request.fua
                && !export
                    .faults
                    .save_pre_image(export.backend.medium(), offset, length)
            {
                self.finish(request_key, Err(NbdErrno::Io));
                return;
            }
        }
        self.submit_io(request_key);
    }

    fn submit_io(&mut self, request_key: usize) {
        if self.copy_inline(request_key) {
            return;
        }
        let request = &mut self.requests[request_key];
        let ctx = Ctx::Io(request_key);
        let (fd, done) = (request.fd, request.done);
        match request.op {
            Op::Read | Op::Write if request.span == 0 => self.finish(request_key, Ok(())),
            Op::Read => {
                let buf = request.buf.take().expect("read buffer");
                let (at, len) = (done as usize, request.span - done as usize);
                self.ring
                    .read_at(fd, request.file_offset + done, buf, at, len, ctx);
            }
            Op::Write => {
                let buf = request.buf.take().expect("write buffer");
                let (at, len) = (done as usize, request.span - done as usize);
                let offset = request.file_offset + done;
                self.ring
                    .write_at(fd, offset, buf, at, len, request.fua, ctx);
            }
            Op::ZeroWrite => {
                let buf = request.buf.take().expect("zero buffer");
                let len = ((request.length - done) as usize).min(buf.capacity());
                let offset = request.file_offset + done;
                self.ring.write_at(fd, offset, buf, 0, len, false, ctx);
            }
            Op::Flush | Op::SyncAfter => self.ring.fsync(fd, true, ctx),
            Op::Trim if request.length == 0 => self.finish(request_key, Ok(())),
            Op::Trim | Op::Zero => {
                let (mode, offset, length) = (request.mode, request.file_offset, request.length);
                self.ring.fallocate(fd, mode, offset, length, ctx);
            }
            Op::Cache => {
                let (offset, length) = (request.file_offset, request.length);
                self.ring
                    .fadvise(fd, offset, length, libc::POSIX_FADV_WILLNEED, ctx);
            }
        }
    }

    /// Serves a non-empty READ or WRITE of a memory export up to [`MEMORY_INLINE_BYTES_MAX`]
    /// with `pread`/`pwrite` on the memfd, completing it as a ring completion would; false
    /// (nothing done) for any other request.
    fn copy_inline(&mut self, request_key: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let request = &mut self.requests[request_key];
        let export = &self.shared.exports[self.conns[request.conn].export];
        let read_or_write = matches!(request.op, Op::Read | Op::Write);
        let small = (1..=MEMORY_INLINE_BYTES_MAX).contains(&request.span);
        if !(read_or_write && small && export.backend.is_memory()) {
            return false;
        }
        let buf = request.buf.take().expect("I/O buffer");
        let (at, end) = (request.done as usize, request.span);
        let offset = request.file_offset + request.done;
        let write = request.op == Op::Write;
        let medium = export.backend.medium();
        let bytes = &mut self.ring.pool_mut().bytes_mut(&buf)[at..end];
        let copied = if write {
            medium.write_at(bytes, offset)
        } else {
            medium.read_at(bytes, offset)
        };
        let result = match copied {
            Ok(count) => i32::try_from(count).expect("at most MEMORY_INLINE_BYTES_MAX"),
            Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
        };
        self.io_done(request_key, result, crate::ring::Resources::Buf(buf));
        true
    }

    fn io_done(&mut self, request_key: usize, result: i32, resources: crate::ring::Resources) {
        let request = &mut self.requests[request_key];
        if matches!(request.op, Op::Read | Op::Write | Op::ZeroWrite) {
            request.buf = Some(resources.into_buf());
        }
        let conn_key = request.conn;
        if self.conns[conn_key].closing {
            self.drop_request(request_key);
            self.conns[conn_key].ops -= 1;
            self.maybe_free(conn_key);
            return;
        }
        let outcome = match (request.op, result) {
            (Op::Read | Op::Write, bytes) if bytes > 0 => {
                request.done += bytes as u64;
                let size = self.shared.exports[self.conns[conn_key].export].info.size;
                if request.op == Op::Read && request.file_offset + request.done >= size {
                    // A span widened for O_DIRECT past the end of an odd-sized file.
                    let (done, span) = (request.done as usize, request.span);
                    let buf = request.buf.as_ref().expect("read buffer");
                    self.ring.pool_mut().bytes_mut(buf)[done..span].fill(0);
                    request.done = span as u64;
                }
                if request.done < request.span as u64 {
                    self.submit_io(request_key);
                    return;
                }
                Ok(())
            }
            (Op::Read | Op::Write, 0) => Err(NbdErrno::Io),
            (Op::ZeroWrite, bytes) if bytes > 0 => {
                request.done += bytes as u64;
                if request.done < request.length {
                    self.submit_io(request_key);
                    return;
                }
                Ok(())
            }
            (Op::Zero, errno) if errno == -libc::EOPNOTSUPP => {
                let backend = &self.shared.exports[self.conns[conn_key].export].backend;
                backend.mode_unsupported(request.mode);
                if request.fast {
                    Err(NbdErrno::NotSup)
                } else {
                    request.op = Op::Zero;
                    match backend.zero_mode(true) {
                        Some(mode) => request.mode = mode,
                        None => return self.start_zero_write(request_key),
                    }
                    self.submit_io(request_key);
                    return;
                }
            }
            (Op::Trim | Op::Cache, _) => Ok(()),
            (_, errno) if errno < 0 => Err(NbdErrno::from_errno(-errno)),
            _ => Ok(()),
        };
        let request = &mut self.requests[request_key];
        if outcome.is_ok()
            && request.fua
            && matches!(request.op, Op::Trim | Op::Zero | Op::ZeroWrite)
        {
            request.op = Op::SyncAfter;
            self.submit_io(request_key);
            return;
        }
        self.finish(request_key, outcome);
    }

    fn start_zero_write(&mut self, request_key: usize) {
        let request = &mut self.requests[request_key];
        let chunk = (request.length as usize).clamp(1, ZERO_CHUNK_BYTES);
        let Some(buf) = self.ring.pool_mut().check_out(chunk) else {
            self.finish(request_key, Err(NbdErrno::Io));
            return;
        };
        self.ring.pool_mut().bytes_mut(&buf).fill(0);
        let request = &mut self.requests[request_key];
        request.op = Op::ZeroWrite;
        request.buf = Some(buf);
        self.submit_io(request_key);
    }

    fn finish(&mut self, request_key: usize, outcome: Result<(), NbdErrno>) {
        let mut request = self.requests.remove(request_key);
        let conn = &mut self.conns[request.conn];
        conn.ops -= 1;
        if request.power_counted {
            let durable = match (request.op, outcome) {
                (Op::Flush, Ok(())) => Durable::Everything,
                (Op::Write | Op::SyncAfter, Ok(())) if request.fua => {
                    Durable::Range(request.file_offset, request.length)
                }
                _ => Durable::Nothing,
            };
            self.shared.exports[conn.export].faults.end(durable);
        }
        let bytes = if matches!(request.op, Op::Read | Op::Write) {
            request.length
        } else {
            0
        };
        let latency_ns = request.started.elapsed().as_nanos() as u64;
        self.stats.record(
            conn.export,
            request.stat,
            bytes,
            latency_ns,
            outcome.is_err(),
        );
        let Phase::Transmission(session) = &conn.phase else {
            unreachable!()
        };
        let style = session.reply_style;
        let (cookie, offset) = (request.cookie, request.offset);
        let out = match outcome {
            Ok(()) if request.op == Op::Read => {
                let buf = request.buf.take().expect("read buffer");
                self.read_reply(style, &request, buf)
            }
            Ok(()) => Out::Head(codec::reply_ok(style, cookie, offset)),
            Err(errno) => Out::Head(codec::reply_error(style, cookie, offset, errno)),
        };
        if let Some(buf) = request.buf.take() {
            self.ring.pool_mut().check_in(buf);
        }
        self.queue_reply(request.conn, out);
    }

    /// The reply to a successful READ. With structured replies, runs of zero blocks go out
    /// as `OFFSET_HOLE` chunks (`target::sparse`); data chunks stay ranges of `buf`.
    fn read_reply(&mut self, style: ReplyStyle, request: &Request, buf: Buf) -> Out {
        let (cookie, offset, skip) = (request.cookie, request.offset, request.skip);
        let length = request.length as usize;
        let chunks = match style {
            ReplyStyle::Simple => None,
            _ => {
                let chunks_max = if request.df {
                    1
                } else {
                    sparse::READ_CHUNKS_MAX
                };
                let data = &self.ring.pool().bytes(&buf)[skip..skip + length];
                Some(sparse::plan_read(data, offset, chunks_max))
            }
        };
        match chunks {
            Some(chunks) if chunks.is_all_hole() => {
                self.ring.pool_mut().check_in(buf);
                let length = length as u64;
                Out::Head(codec::reply_read_hole(
                    style, cookie, offset, offset, length, true,
                ))
            }
            Some(chunks) if !chunks.is_all_data() => Out::Sparse(SparseRead {
                style,
                cookie,
                offset,
                chunks,
                buf,
                skip,
            }),
            _ => {
                let head =
                    codec::reply_read_data(style, cookie, offset, offset, length as u64, true);
                Out::Data(head, buf, skip, length)
            }
        }
    }

    fn drop_request(&mut self, request_key: usize) {
        let mut request = self.requests.remove(request_key);
        if request.power_counted {
            let export = self.conns[request.conn].export;
            self.shared.exports[export].faults.end(Durable::Nothing);
        }
        if let Some(buf) = request.buf.take() {
            self.ring.pool_mut().check_in(buf);
        }
    }

    // ------------------------------------------------------------------ send side

    fn queue_reply(&mut self, key: usize, out: Out) {
        let conn = &mut self.conns[key];
        conn.unsent += 1;
        conn.out.push_back(out);
        self.kick_send(key);
    }

    fn kick_send(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.tls.as_ref().is_some_and(|link| link.active) {
            self.tls_send(key);
            return;
        }
        if conn.closing || conn.out.is_empty() {
            return;
        }
        let Some(mut batch) = conn.batch.take() else {
            return;
        };
        let filled = fill_batch(&mut conn.out, &mut batch);
        conn.batch_replies = filled.replies;
        if filled.start_tls {
            conn.tls
                .as_mut()
                .expect("STARTTLS set up a TLS link")
                .active = true;
        }
        if batch.is_empty() {
            conn.batch = Some(batch);
            if filled.start_tls {
                self.tls_send(key);
            }
            return;
        }
        self.ring.send_batch(conn.fd, batch, Ctx::Send(key));
    }

    fn send_done(&mut self, key: usize, result: i32, mut batch: Box<SendBatch>) {
        let complete = result >= 0 && batch.is_complete();
        for buf in batch.take_bufs() {
            self.ring.pool_mut().check_in(buf);
        }
        let conn = &mut self.conns[key];
        conn.batch = Some(batch);
        conn.unsent -= conn.batch_replies;
        conn.batch_replies = 0;
        self.after_send(key, complete, false);
    }

    /// What follows every completed send (plaintext batch or TLS ciphertext) once its buffers
    /// are back: free a closing connection, close on a failed send, else send what queued
    /// meanwhile, move a TLS session into the kernel if that waited for this send, end a
    /// connection that asked to, and resume parsing input held back by backpressure.
    fn after_send(&mut self, key: usize, complete: bool, to_kernel: bool) {
        if self.conns[key].closing {
            self.maybe_free(key);
            return;
        }
        if !complete {
            self.close(key, "send failed");
            return;
        }
        self.kick_send(key);
        if to_kernel && self.is_open(key) {
            self.tls_to_kernel(key);
        }
        // Sending (TLS errors) or the kernel switch may have closed the connection.
        if !self.is_open(key) {
            return;
        }
        self.maybe_finish(key);
        if self.conns.contains(key) {
            self.process_input(key);
        }
    }

    /// The connection exists and is not closing.
    fn is_open(&self, key: usize) -> bool {
        self.conns.get(key).is_some_and(|conn| !conn.closing)
    }

    // ------------------------------------------------------------------ teardown

    /// Closes a connection that asked to end (DISC, ABORT, shutdown) once it is idle.
    fn maybe_finish(&mut self, key: usize) {
        let conn = &self.conns[key];
        let tls_idle = conn.tls.as_ref().is_none_or(|link| link.is_idle());
        let idle = conn.ops == 0 && conn.out.is_empty() && conn.batch.is_some() && tls_idle;
        if conn.close_when_idle && idle && conn.payload.is_none() {
            if self.tls_close_notify(key) {
                return;
            }
            self.close(key, "client disconnected");
        }
    }

    fn close(&mut self, key: usize, reason: &str) {
        let conn = &mut self.conns[key];
        if conn.closing {
            return;
        }
        conn.closing = true;
        tracing::info!(shard = self.index, peer = %conn.peer, reason, "connection closed");
        conn.socket.shutdown();
        if conn.recv_busy || conn.send_in_flight() {
            self.ring.cancel_fd(conn.fd);
        }
        self.maybe_free(key);
    }

    fn maybe_free(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.closing || conn.recv_busy || conn.send_in_flight() {
            return;
        }
        if let Some(payload) = conn.payload.take() {
            conn.ops -= 1;
            self.drop_request(payload.request);
        }
        if self.conns[key].ops > 0 {
            return;
        }
        let mut conn = self.conns.remove(key);
        if let Some(export) = conn.claimed.take() {
            self.shared.exports[export].release();
        }
        let pool = self.ring.pool_mut();
        if let Some(buf) = conn.rbuf.take() {
            pool.check_in(buf);
        }
        if let Some(link) = conn.tls.take() {
            link.release(pool);
        }
        for out in conn.out.drain(..) {
            match out {
                Out::Data(_, buf, _, _) | Out::Sparse(SparseRead { buf, .. }) => {
                    pool.check_in(buf);
                }
                Out::Head(_) | Out::Bytes(..) | Out::StartTls => {}
            }
        }
        self.load.connections.fetch_sub(1, Ordering::Relaxed);
        self.stats.connections -= 1;
    }
}

/// A connection's admission decisions during the handshake: the export's access policy for
/// this peer (and TLS identity), and its connection limit.
struct ConnGate<'a> {
    shard: usize,
    exports: &'a Exports,
    peer: &'a Peer,
    /// The client's TLS identity once TLS is up (`None`: none presented).
    identity: Option<&'a dyn ClientIdentity>,
    claimed: &'a mut Option<usize>,
}

impl ConnGate<'_> {
    fn check(&self, export: &ExportInfo, tls: bool) -> Result<(), Denied> {
        let identity = tls.then(|| self.identity.unwrap_or(&Anonymous));
        self.exports[export.id].policy().admit(self.peer, identity)
    }
}

impl Gate for ConnGate<'_> {
    fn access(&self, export: &ExportInfo, tls: bool) -> Access {
        match self.check(export, tls) {
            Ok(()) => Access::Allowed,
            Err(Denied::TlsRequired) => Access::TlsRequired,
            Err(Denied::Address(_)) => Access::Forbidden("client address not allowed"),
            Err(Denied::Uid(_)) => Access::Forbidden("client uid not allowed"),
            Err(Denied::ClientIdentity) => Access::Forbidden("client TLS identity not allowed"),
            Err(_) => Access::Forbidden("access denied"),
        }
    }

    fn claim(&mut self, export: &ExportInfo) -> Result<(), &'static str> {
        assert!(self.claimed.is_none(), "one export per connection");
        if let Err(denied) = self.exports[export.id].claim() {
            tracing::warn!(shard = self.shard, peer = %self.peer, export = %export.name,
                reason = %denied, "export refused");
            return Err("export connection limit reached");
        }
        *self.claimed = Some(export.id);
        Ok(())
    }

    fn refused(&mut self, export: &ExportInfo, tls: bool) {
        if let Err(reason) = self.check(export, tls) {
            tracing::warn!(shard = self.shard, peer = %self.peer, export = %export.name,
                %reason, "export refused");
        }
    }
}

/// What [`fill_batch`] queued.
struct Filled {
    /// Replies (not handshake bytes) in the batch.
    replies: usize,
    /// It stopped at the STARTTLS marker: what follows must be encrypted.
    start_tls: bool,
}

/// Moves queued output into `batch` while it has room: headers are copied, data chunks
/// point into their pool buffers.
fn fill_batch(out: &mut VecDeque<Out>, batch: &mut SendBatch) -> Filled {
    let mut filled = Filled {
        replies: 0,
        start_tls: false,
    };
    while batch.has_room(2) {
        let Some(next) = out.pop_front() else {
            break;
        };
        match next {
            Out::Head(head) => {
                batch.push_bytes(head.as_bytes());
                filled.replies += 1;
            }
            Out::Data(head, buf, at, len) => {
                batch.push_bytes(head.as_bytes());
                batch.push_buf(buf, at, len);
                filled.replies += 1;
            }
            Out::Bytes(bytes, is_reply) => {
                batch.push_bytes(&bytes);
                filled.replies += usize::from(is_reply);
            }
            Out::Sparse(read) if !batch.has_room(sparse_runs(&read.chunks)) => {
                out.push_front(Out::Sparse(read));
                break;
            }
            Out::Sparse(read) => {
                push_sparse(batch, read);
                filled.replies += 1;
            }
            Out::StartTls => {
                filled.start_tls = true;
                break;
            }
        }
    }
    filled
}

/// Whether a small WRITE's payload is only partly buffered (wait for it: module docs).
fn small_write_split(header: usize, length: u64, buffered: usize) -> bool {
    let whole = header as u64 + length;
    whole <= WHOLE_WRITE_BYTES_MAX as u64 && (buffered as u64) < whole
}

/// Iovecs a sparse READ reply takes: a header per chunk, and the data of each data chunk.
fn sparse_runs(chunks: &ReadChunks) -> usize {
    chunks.len() + chunks.iter().filter(|chunk| !chunk.hole).count()
}

/// Appends a sparse READ reply: chunk headers, with data chunks pointing into the read
/// buffer (no copy); the last chunk carries `NBD_REPLY_FLAG_DONE`.
fn push_sparse(batch: &mut SendBatch, read: SparseRead) {
    let SparseRead {
        style,
        cookie,
        offset,
        chunks,
        buf,
        skip,
    } = read;
    let mut buf = Some(buf);
    let last = chunks.len() - 1;
    for (index, chunk) in chunks.iter().enumerate() {
        let (at, len, done) = (chunk.at as u64, chunk.len as u64, index == last);
        if chunk.hole {
            let head = codec::reply_read_hole(style, cookie, offset, offset + at, len, done);
            batch.push_bytes(head.as_bytes());
            continue;
        }
        let head = codec::reply_read_data(style, cookie, offset, offset + at, len, done);
        batch.push_bytes(head.as_bytes());
        match buf.take() {
            Some(buf) => batch.push_buf(buf, skip + chunk.at, chunk.len),
            None => batch.push_buf_range(skip + chunk.at, chunk.len),
        }
    }
    assert!(buf.is_none(), "a sparse reply has a data chunk");
}

fn set_nodelay(socket: &Socket) {
    if let Socket::Tcp(stream) = socket {
        let _ = stream.set_nodelay(true);
    }
}
