//! Loopback end-to-end benchmark: the real `ringbd` binary on a unix socket in a temporary
//! directory, serving a `memory:` export, driven by a small pipelined NBD client written
//! here (std sockets, the fixed-newstyle handshake with `NBD_OPT_GO` by hand, requests from
//! [`encode_request`], replies through [`decode_reply_header`]). It measures 4 KiB READ and
//! WRITE round trips at queue depth 1 and 32; criterion reports time per IO and IOPS
//! ("elem/s").
//!
//! # Which binary
//!
//! Cargo builds the package's binaries before its benches and tells them where:
//! `env!("CARGO_BIN_EXE_ringbd")` (set for integration tests *and* benches), so `cargo
//! bench` always measures the binary built from the same tree, in the bench profile
//! (= release). `RINGBD_BIN=/path/to/ringbd` overrides it, e.g. to compare two builds.
//!
//! # Process contract
//!
//! The server is started once for the whole group, waited for (bounded,
//! [`SERVER_READY_TIMEOUT`]) and stopped on `Drop` by its PID: SIGTERM, then SIGKILL after
//! [`SERVER_STOP_TIMEOUT`]. Every socket read and write has a timeout, so a hung server fails
//! the bench instead of hanging it.
//!
//! Run: `cargo bench --bench loopback` (about 30 s).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringbd::target::codec::{ReplyHeader, Request, decode_reply_header, encode_request};
use ringbd::target::proto::{
    IHAVEOPT, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK,
    NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBDMAGIC,
};

/// How long the server may take to accept its first connection.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERMed server may take to exit before SIGKILL.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Any single socket read or write taking longer than this fails the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of the RAM export.
const EXPORT_BYTES: u64 = 256 << 20;
/// Bytes per request.
const BLOCK_BYTES: u64 = 4096;
/// Option replies larger than this are a broken server (we only ask for NBD_OPT_GO).
const OPTION_REPLY_BYTES_MAX: u32 = 4096;

/// The `ringbd` binary: `RINGBD_BIN`, else the one cargo built for this bench.
fn ringbd_bin() -> PathBuf {
    std::env::var_os("RINGBD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ringbd")))
}

/// A running `ringbd serve --unix SOCK memory:256M` in its own temporary directory.
struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("ringbd.sock");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let child = Command::new(ringbd_bin())
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .arg("--log-level")
            .arg("warn")
            .arg(format!("memory:{}M", EXPORT_BYTES >> 20))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", ringbd_bin().display()));
        let mut server = Server {
            child,
            socket,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("ringbd exited during startup: {status}");
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ringbd did not accept on {} in time", self.socket.display());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Our own child, not yet reaped, so its PID cannot have been reused.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pipelined NBD client in transmission phase (simple replies: no structured replies or
/// extended headers were negotiated, so a READ reply is 16 header bytes plus the data).
struct Client {
    stream: UnixStream,
    /// Requests to send, encoded back to back (headers and WRITE payloads).
    out: Vec<u8>,
    /// Received bytes not yet parsed.
    input: Vec<u8>,
    input_len: usize,
    /// xorshift state for random block offsets.
    random: u64,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let mut stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let size = handshake_go(&mut stream);
        assert_eq!(size, EXPORT_BYTES, "export size");
        Client {
            stream,
            out: Vec::with_capacity(64 * (32 + BLOCK_BYTES as usize)),
            input: vec![0; 1 << 20],
            input_len: 0,
            random: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next_offset(&mut self) -> u64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        (self.random % (EXPORT_BYTES / BLOCK_BYTES)) * BLOCK_BYTES
    }

    fn queue(&mut self, command: u16, cookie: u64) {
        let request = Request {
            flags: 0,
            command,
            cookie,
            offset: self.next_offset(),
            length: BLOCK_BYTES,
        };
        let at = self.out.len();
        self.out.resize(at + 32, 0);
        let written = encode_request(&request, false, &mut self.out[at..]);
        self.out.truncate(at + written);
        if command == NBD_CMD_WRITE {
            let fill = (cookie as u8).wrapping_mul(31);
            self.out.resize(self.out.len() + BLOCK_BYTES as usize, fill);
        }
    }

    fn flush(&mut self) {
        self.stream.write_all(&self.out).expect("send requests");
        self.out.clear();
    }

    /// Receives at least one more reply; returns how many complete replies were parsed.
    fn receive_replies(&mut self, command: u16) -> u64 {
        let data_bytes = if command == NBD_CMD_READ {
            BLOCK_BYTES as usize
        } else {
            0
        };
        loop {
            let read = self
                .stream
                .read(&mut self.input[self.input_len..])
                .expect("receive replies");
            assert!(read > 0, "server closed the connection");
            self.input_len += read;
            let mut at = 0;
            let mut replies = 0;
            while let Some((header, consumed)) =
                decode_reply_header(&self.input[at..self.input_len]).expect("reply magic")
            {
                let ReplyHeader::Simple { error, .. } = header else {
                    panic!("unexpected structured reply {header:?}");
                };
                assert_eq!(error, 0, "NBD error reply");
                if self.input_len - at < consumed + data_bytes {
                    break;
                }
                at += consumed + data_bytes;
                replies += 1;
            }
            self.input.copy_within(at..self.input_len, 0);
            self.input_len -= at;
            if replies > 0 {
                return replies;
            }
        }
    }

    /// Runs `count` requests of `command` keeping `depth` in flight; returns the elapsed time.
    fn run(&mut self, command: u16, depth: u64, count: u64) -> Duration {
        let start = Instant::now();
        let mut sent = 0;
        let mut done = 0;
        while sent < depth.min(count) {
            self.queue(command, sent);
            sent += 1;
        }
        self.flush();
        while done < count {
            let replies = self.receive_replies(command);
            done += replies;
            let refill = replies.min(count - sent);
            for _ in 0..refill {
                self.queue(command, sent);
                sent += 1;
            }
            if refill > 0 {
                self.flush();
            }
        }
        assert_eq!(sent, done, "every request was answered");
        start.elapsed()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let disconnect = Request {
            flags: 0,
            command: NBD_CMD_DISC,
            cookie: u64::MAX,
            offset: 0,
            length: 0,
        };
        let mut header = [0u8; 28];
        encode_request(&disconnect, false, &mut header);
        let _ = self.stream.write_all(&header);
    }
}

fn read_u16(stream: &mut UnixStream) -> u16 {
    let mut bytes = [0u8; 2];
    stream.read_exact(&mut bytes).expect("handshake read");
    u16::from_be_bytes(bytes)
}

fn read_u32(stream: &mut UnixStream) -> u32 {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes).expect("handshake read");
    u32::from_be_bytes(bytes)
}

fn read_u64(stream: &mut UnixStream) -> u64 {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes).expect("handshake read");
    u64::from_be_bytes(bytes)
}

/// Fixed-newstyle negotiation of the default export with `NBD_OPT_GO` (no info requests, no
/// structured replies): returns the export size from `NBD_INFO_EXPORT`.
fn handshake_go(stream: &mut UnixStream) -> u64 {
    assert_eq!(read_u64(stream), NBDMAGIC, "server greeting");
    assert_eq!(read_u64(stream), IHAVEOPT, "newstyle greeting");
    let flags = read_u16(stream);
    assert!(flags & NBD_FLAG_FIXED_NEWSTYLE != 0, "fixed newstyle");
    let client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    // NBD_OPT_GO data: u32 name length (0: the default export), u16 info request count (0).
    let mut option = Vec::with_capacity(4 + 8 + 4 + 4 + 6);
    option.extend_from_slice(&client_flags.to_be_bytes());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    option.extend_from_slice(&6u32.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    option.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&option).expect("send NBD_OPT_GO");
    let mut size = None;
    loop {
        assert_eq!(read_u64(stream), NBD_REP_MAGIC, "option reply magic");
        assert_eq!(read_u32(stream), NBD_OPT_GO, "reply to NBD_OPT_GO");
        let reply_type = read_u32(stream);
        let length = read_u32(stream);
        assert!(length <= OPTION_REPLY_BYTES_MAX, "option reply too long");
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).expect("option reply data");
        assert!(
            reply_type & NBD_REP_FLAG_ERROR == 0,
            "NBD_OPT_GO failed: {reply_type:#x}"
        );
        match reply_type {
            NBD_REP_INFO
                if data.len() >= 12
                    && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
            {
                let bytes: [u8; 8] = data[2..10].try_into().expect("8 bytes");
                size = Some(u64::from_be_bytes(bytes));
            }
            NBD_REP_ACK => return size.expect("NBD_INFO_EXPORT before NBD_REP_ACK"),
            _ => {}
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn bench_loopback(c: &mut Criterion) {
    let server = Server::start();
    let mut client = Client::connect(&server.socket);
    // Touch the whole export once, so reads hit allocated tmpfs pages, not holes.
    let blocks = EXPORT_BYTES / BLOCK_BYTES;
    client.run(NBD_CMD_WRITE, 32, blocks);
    let mut group = c.benchmark_group("loopback_4k");
    group.throughput(Throughput::Elements(1));
    for (label, command) in [("read", NBD_CMD_READ), ("write", NBD_CMD_WRITE)] {
        for depth in [1u64, 32] {
            group.bench_function(format!("{label}/qd{depth}"), |b| {
                b.iter_custom(|iterations| client.run(command, depth, iterations))
            });
        }
    }
    group.finish();
    drop(client);
    drop(server);
}

criterion_group! {
    name = loopback;
    config = config();
    targets = bench_loopback
}
criterion_main!(loopback);
