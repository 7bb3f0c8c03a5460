//! Shared harness for the integration tests: start the real `ringbd` binary, run external
//! clients with bounded time, gate on tools, and talk raw NBD (see [`raw`]).
//!
//! # Process contract
//!
//! * [`Server`] starts `ringbd serve --unix SOCK ...` in a fresh temporary directory, waits
//!   (at most [`SERVER_READY_TIMEOUT`]) until the socket accepts a connection, and on `Drop`
//!   stops it by PID: SIGTERM, then SIGKILL after [`SERVER_STOP_TIMEOUT`]. Its stderr goes to
//!   a file that is printed when the owning test panics.
//! * The server is started with `PR_SET_PDEATHSIG = SIGKILL`, so it also dies if the test
//!   thread that spawned it dies without unwinding. Keep a [`Server`] on the thread that
//!   started it.
//! * Every external command runs through [`run`] with a deadline; on timeout the harness
//!   kills exactly that child (by PID) and fails the test.
//!
//! # Gating contract
//!
//! Tests call [`require_tool`], [`require_root`] and friends before using an optional facility.
//! When `RINGBD_STRICT_TESTS=1` (CI) a missing facility is a test failure: CI never silently
//! skips. Otherwise the test prints `SKIP: <reason>` and returns early.
//!
//! # Development aid
//!
//! `RINGBD_TEST_SERVER=nbdkit` runs the same tests against `nbdkit` (memory and file plugins,
//! one export) to check the *tests* before blaming the server. CI never sets it.
#![allow(unsafe_code)] // direct libc calls (signals, descriptors), each commented
#![allow(dead_code)]

pub mod fsstack;
pub mod guest;
pub mod raw;
pub mod tls;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a freshly started server may take to accept its first connection.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERMed server may take to exit before it gets SIGKILL.
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The server binary under test.
pub fn ringbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringbd")
}

/// Repository root (for `tests/python/*.py`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `RINGBD_STRICT_TESTS=1`: missing tools and facilities fail instead of skipping.
pub fn strict() -> bool {
    std::env::var("RINGBD_STRICT_TESTS").as_deref() == Ok("1")
}

/// Returns `ok`; if it is false, panics in strict mode, else prints `SKIP: reason`.
pub fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if strict() {
        panic!("RINGBD_STRICT_TESTS=1 and a requirement is missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    false
}

/// Finds `tool` in `PATH` (plus the sbin directories a non-root PATH may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/local/sbin"];
    path.split(':')
        .chain(extra)
        .map(|dir| Path::new(dir).join(tool))
        .find(|candidate| candidate.is_file())
}

/// Requires an executable in `PATH`.
pub fn require_tool(tool: &str) -> bool {
    require(
        which(tool).is_some(),
        &format!("`{tool}` is not installed (run `sudo scripts/install-deps`)"),
    )
}

/// Requires every tool in `tools`.
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|tool| require_tool(tool))
}

/// The interpreter the python tests use: Debian's, which has `python3-libnbd`.
pub const PYTHON: &str = "/usr/bin/python3";

/// Requires `/usr/bin/python3` with the libnbd bindings (`import nbd`).
pub fn require_python_nbd() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    require(
        ok,
        "python3-libnbd is not installed (`import nbd` fails in /usr/bin/python3)",
    )
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Requires root (loop devices, mounts).
pub fn require_root() -> bool {
    require(
        is_root(),
        "not running as root (loop devices and mounts need root)",
    )
}

/// Requires a usable `/dev/fuse`.
pub fn require_fuse() -> bool {
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    require(ok, "/dev/fuse cannot be opened (FUSE unavailable)")
}

/// Requires loop device support (`/dev/loop-control`).
pub fn require_loop() -> bool {
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .is_ok();
    require(
        ok,
        "/dev/loop-control cannot be opened (loop devices unavailable)",
    )
}

/// A fresh temporary directory under `$TMPDIR` (short path: unix socket names are ≤ 107 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ringbd-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill(2) with a positive pid targets exactly one process we started; it has no
    // memory-safety preconditions.
    let _ = unsafe { libc::kill(pid, signal) };
}

/// Waits for `child` until `timeout`; returns its status, or `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Output of a finished external command.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// The command line, for messages.
    pub command: String,
}

impl RunOutput {
    /// Panics with the full output unless the command succeeded; returns stdout.
    pub fn ok(self) -> String {
        assert!(self.status.success(), "command failed: {self}");
        self.stdout
    }
}

impl std::fmt::Display for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with no stdin, capturing output to files (no pipe deadlocks), killing it (by PID)
/// and panicking if it is still running after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> RunOutput {
    run_with_stdin(cmd, None, timeout)
}

/// Like [`run`], with `stdin` fed from a byte string.
pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> RunOutput {
    try_run(cmd, stdin, timeout).unwrap_or_else(|message| panic!("{message}"))
}

/// Like [`run_with_stdin`], but a spawn failure or timeout is an `Err` instead of a panic
/// (for cleanup code in `Drop`).
pub fn try_run(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<RunOutput, String> {
    let scratch = tempdir();
    let out_path = scratch.path().join("stdout");
    let err_path = scratch.path().join("stderr");
    let stdin_cfg = match stdin {
        Some(bytes) => {
            let in_path = scratch.path().join("stdin");
            fs::write(&in_path, bytes).map_err(|e| format!("write stdin file: {e}"))?;
            Stdio::from(File::open(&in_path).map_err(|e| format!("open stdin file: {e}"))?)
        }
        None => Stdio::null(),
    };
    let command = format!("{cmd:?}");
    let create = |path: &Path| File::create(path).map_err(|e| format!("create {path:?}: {e}"));
    let mut child = cmd
        .stdin(stdin_cfg)
        .stdout(create(&out_path)?)
        .stderr(create(&err_path)?)
        .spawn()
        .map_err(|e| format!("cannot spawn {command}: {e}"))?;
    let status = wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(RunOutput {
            status,
            stdout,
            stderr,
            command,
        }),
        None => Err(format!(
            "command timed out after {timeout:?}: {command}\n--- stdout ---\n{stdout}\n\
             --- stderr ---\n{stderr}"
        )),
    }
}

/// Writes `text` as `DIR/ringbd.toml` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ringbd.toml");
    fs::write(&path, text).expect("write config");
    path
}

/// Runs `ringbd ARGS` to completion (check-config, --help, a serve expected to fail).
pub fn ringbd(args: &[&str]) -> RunOutput {
    run(Command::new(ringbd_bin()).args(args), RINGBD_RUN_TIMEOUT)
}

/// Longest a one-shot `ringbd` command may take.
pub const RINGBD_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Runs `/usr/bin/python3 tests/python/<script> args...` and asserts success.
pub fn python(script: &str, args: &[&str], timeout: Duration) -> String {
    let path = repo_root().join("tests/python").join(script);
    run(Command::new(PYTHON).arg(&path).args(args), timeout).ok()
}

/// An `nbd+unix://` URI for `export` on `socket`.
pub fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Hex SHA-256 of a file, via coreutils `sha256sum` (no crypto dependency).
pub fn sha256_file(path: &Path) -> String {
    let out = run(
        Command::new("sha256sum").arg(path),
        Duration::from_secs(120),
    )
    .ok();
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Writes `len` bytes of `/dev/urandom` into `path`.
pub fn random_file(path: &Path, len: u64) {
    let mut src = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = File::create(path).expect("create random file");
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).expect("chunk fits usize");
        src.read_exact(&mut buf[..n]).expect("read /dev/urandom");
        dst.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    dst.sync_all().expect("sync random file");
}

/// Deterministic content: every 8-byte little-endian word holds its own byte offset XOR `seed`.
/// Any aligned range can be recomputed (by the python scripts too) without storing it.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    assert_eq!(offset % 8, 0, "pattern offsets are 8-byte aligned");
    assert_eq!(len % 8, 0, "pattern lengths are 8-byte multiples");
    let mut out = Vec::with_capacity(len);
    for word in 0..(len / 8) as u64 {
        out.extend_from_slice(&((offset + word * 8) ^ seed).to_le_bytes());
    }
    out
}

/// Creates `path` of `len` bytes filled with [`pattern`]`(0, len, seed)`.
pub fn pattern_file(path: &Path, len: u64, seed: u64) {
    let mut file = File::create(path).expect("create pattern file");
    let chunk: u64 = 1 << 20;
    let mut offset = 0;
    while offset < len {
        let n = chunk.min(len - offset);
        file.write_all(&pattern(offset, n as usize, seed))
            .expect("write pattern file");
        offset += n;
    }
    file.sync_all().expect("sync pattern file");
}

/// Creates a sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    File::create(path)
        .expect("create sparse file")
        .set_len(len)
        .expect("set_len");
}

/// What `ringbd serve` is started with.
#[derive(Debug, Clone, Default)]
pub struct ServerSpec {
    /// `[NAME=]PATH` arguments.
    pub exports: Vec<String>,
    /// Extra options (`--read-only`, `--shards 1`, ...).
    pub options: Vec<String>,
    /// Also listen on this TCP address.
    pub listen: Option<String>,
}

impl ServerSpec {
    /// One default export.
    pub fn new(export: impl Into<String>) -> Self {
        ServerSpec {
            exports: vec![export.into()],
            ..Default::default()
        }
    }

    /// Adds an export (`NAME=PATH` or `PATH`).
    pub fn export(mut self, export: impl Into<String>) -> Self {
        self.exports.push(export.into());
        self
    }

    /// Adds command-line options.
    pub fn options(mut self, options: &[&str]) -> Self {
        self.options.extend(options.iter().map(|o| o.to_string()));
        self
    }

    /// Also listens on a TCP address.
    pub fn listen(mut self, address: impl Into<String>) -> Self {
        self.listen = Some(address.into());
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Server {
        Server::start(self)
    }
}

/// A running server, stopped by PID on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    pid: u32,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    fn command(spec: &ServerSpec, socket: &Path) -> Command {
        if std::env::var("RINGBD_TEST_SERVER").as_deref() == Ok("nbdkit") {
            return nbdkit_command(spec, socket);
        }
        let mut cmd = Command::new(ringbd_bin());
        cmd.arg("serve").arg("--unix").arg(socket);
        if let Some(listen) = &spec.listen {
            cmd.arg("--listen").arg(listen);
        }
        cmd.args(&spec.options).args(&spec.exports);
        cmd
    }

    fn start(spec: &ServerSpec) -> Server {
        let dir = tempdir();
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("server.log");
        let mut cmd = Self::command(spec, &socket);
        cmd.env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("create server log"))
            .stderr(File::create(&log).expect("create server log"));
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let pid = child.id();
        let mut server = Server {
            child: Some(child),
            pid,
            dir,
            socket,
            log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("server child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "server exited during startup with {status}; log:\n{}",
                    self.log()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not accept on {} within {SERVER_READY_TIMEOUT:?}; log:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unix socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `nbd+unix:///EXPORT?socket=...`.
    pub fn uri(&self, export: &str) -> String {
        nbd_uri(&self.socket, export)
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Panics (with the log) if the server has exited.
    pub fn assert_running(&mut self) {
        assert!(
            self.is_running(),
            "server is no longer running; log:\n{}",
            self.log()
        );
    }

    /// Sends `signal` and waits for the exit status (SIGKILL and panic after the timeout).
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        assert!(self.child.is_some(), "server already stopped");
        send_signal(self.pid, signal);
        self.wait_exit()
    }

    /// Waits for the server to exit on its own (SIGKILL and panic after the stop timeout).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        match wait_timeout(&mut child, SERVER_STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {SERVER_STOP_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGKILL, no chance to clean up (crash simulation).
    pub fn kill9(&mut self) {
        let status = self.stop_with(libc::SIGKILL);
        assert!(!status.success());
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .expect("status field");
        line.split_whitespace()
            .nth(1)
            .expect("status value")
            .parse()
            .expect("status number")
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Peak resident set size in KiB (`VmHWM` of `/proc/PID/status`).
    pub fn rss_peak_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Number of open file descriptors (`/proc/PID/fd`).
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// The temporary directory holding the socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(self.pid, libc::SIGTERM);
            if wait_timeout(&mut child, SERVER_STOP_TIMEOUT).is_none() {
                eprintln!("server pid {} ignored SIGTERM; sending SIGKILL", self.pid);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "===== ringbd server log (pid {}) =====\n{}=====",
                self.pid,
                self.log()
            );
        }
    }
}

/// Dev aid: the nbdkit equivalent of a spec (one export; memory or file plugin).
fn nbdkit_command(spec: &ServerSpec, socket: &Path) -> Command {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(socket);
    if spec.options.iter().any(|o| o == "--read-only") {
        cmd.arg("-r");
    }
    let export = spec.exports.first().expect("one export");
    let (name, path) = export.split_once('=').unwrap_or(("", export));
    if !name.is_empty() {
        cmd.args(["-e", name]);
    }
    match path.strip_prefix("memory:") {
        Some(size) => cmd.args(["memory", size]),
        None => cmd.args(["file"]).arg(path).arg("cache=none"),
    };
    cmd
}
