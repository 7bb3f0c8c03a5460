//! TLS and access-control test kit: credentials made by the real tools (`certtool`, `psktool`
//! from gnutls-bin), a TCP server on `127.0.0.1`, and the client commands and URIs that libnbd
//! and qemu accept.
//!
//! # Credentials contract
//!
//! * Everything is generated per test in the caller's temporary directory; nothing is shared
//!   between tests and nothing is checked in.
//! * Directories follow the layout libnbd (`tls-certificates=DIR`), qemu
//!   (`tls-creds-x509,dir=DIR`) and nbdkit (`--tls-certificates=DIR`) read: a client directory
//!   holds `ca-cert.pem`, `client-cert.pem`, `client-key.pem`; a server directory holds
//!   `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
//! * Keys are RSA 2048 in PKCS#1 PEM, what `certtool --generate-privkey` gives operators.
//!   (ECDSA is not used: qemu refuses certificates without the key-encipherment usage, which
//!   certtool leaves out for EC keys.)
//! * Server certificates carry CN and DNS name `localhost` and IP address `127.0.0.1`: gnutls
//!   clients (libnbd, qemu) check the name they dialled, so servers listen on `127.0.0.1`.
//!
//! # Server contract
//!
//! [`TlsSpec::start`] starts ringbd (through the common [`Server`] harness: unix socket plus
//! `--listen 127.0.0.1:PORT`) or, with `RINGBD_TEST_SERVER=nbdkit`, nbdkit with the same TLS
//! setup and one memory export, to check the *tests* against an independent TLS-capable server.
//! Scenarios nbdkit cannot express (configuration files, ringbd-only options) panic in that
//! mode instead of pretending to pass.
#![allow(dead_code)]

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RunOutput, Server, ServerSpec, free_tcp_port, run, send_signal, wait_timeout};

/// Bound on every client command (nbdinfo, qemu-img, certtool, ...).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The tools the TLS tests need besides nbdinfo and qemu-img.
pub const CREDENTIAL_TOOLS: [&str; 2] = ["certtool", "psktool"];

fn certtool(args: &[&str]) {
    run(Command::new("certtool").args(args), CLIENT_TIMEOUT).ok();
}

fn generate_key(path: &Path) {
    let path = path.to_str().expect("utf-8 path");
    certtool(&[
        "--generate-privkey",
        "--key-type",
        "rsa",
        "--bits",
        "2048",
        "--no-text",
        "--outfile",
        path,
    ]);
}

/// Who a client certificate names.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Common name (`CN=`).
    pub cn: &'a str,
    /// Optional DNS subject alternative name (`DNS:`).
    pub dns: Option<&'a str>,
}

impl<'a> Subject<'a> {
    /// A subject with only a common name.
    pub fn cn(cn: &'a str) -> Self {
        Subject { cn, dns: None }
    }
}

/// A certificate authority made by `certtool`, able to issue server and client certificates.
#[derive(Debug, Clone)]
pub struct Ca {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A server's X.509 credentials: the files ringbd takes as flags, in a directory nbdkit and
/// qemu-nbd can take as is.
#[derive(Debug, Clone)]
pub struct ServerCreds {
    /// Directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub dir: PathBuf,
    /// `server-cert.pem`.
    pub cert: PathBuf,
    /// `server-key.pem`.
    pub key: PathBuf,
    /// `ca-cert.pem`: the CA client certificates must chain to (`--tls-ca`).
    pub ca: PathBuf,
}

impl Ca {
    /// A new self-signed CA named `name` in `root/name/`.
    pub fn new(root: &Path, name: &str) -> Ca {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("create CA dir");
        let (cert, key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let template = dir.join("ca.info");
        fs::write(
            &template,
            format!("cn = \"{name}\"\nca\ncert_signing_key\nexpiration_days = 3650\n"),
        )
        .expect("write CA template");
        generate_key(&key);
        certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            key.to_str().unwrap(),
            "--template",
            template.to_str().unwrap(),
            "--outfile",
            cert.to_str().unwrap(),
        ]);
        Ca { dir, cert, key }
    }

    /// The CA certificate (PEM).
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    fn issue(&self, key: &Path, cert: &Path, template_text: &str) {
        let template = cert.with_extension("info");
        fs::write(&template, template_text).expect("write certificate template");
        generate_key(key);
        certtool(&[
            "--generate-certificate",
            "--load-privkey",
            key.to_str().unwrap(),
            "--load-ca-certificate",
            self.cert.to_str().unwrap(),
            "--load-ca-privkey",
            self.key.to_str().unwrap(),
            "--template",
            template.to_str().unwrap(),
            "--outfile",
            cert.to_str().unwrap(),
        ]);
    }

    /// A server certificate for `localhost` / `127.0.0.1` signed by this CA, in
    /// `root/name/`, next to this CA's certificate as `ca-cert.pem`.
    pub fn server(&self, root: &Path, name: &str) -> ServerCreds {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("create server creds dir");
        let (cert, key, ca) = (
            dir.join("server-cert.pem"),
            dir.join("server-key.pem"),
            dir.join("ca-cert.pem"),
        );
        self.issue(
            &key,
            &cert,
            "organization = \"ringbd tests\"\ncn = \"localhost\"\ndns_name = \"localhost\"\n\
             ip_address = \"127.0.0.1\"\ntls_www_server\nencryption_key\nsigning_key\n\
             expiration_days = 3650\n",
        );
        fs::copy(&self.cert, &ca).expect("copy CA certificate");
        ServerCreds { dir, cert, key, ca }
    }

    /// A client directory in `root/name/`: a certificate for `subject` signed by this CA, and
    /// `trust`'s certificate as `ca-cert.pem` (the CA the client checks the server against).
    pub fn client(&self, root: &Path, name: &str, subject: Subject<'_>, trust: &Ca) -> PathBuf {
        let dir = trust_dir(root, name, trust);
        let mut template = format!(
            "organization = \"ringbd tests\"\ncn = \"{}\"\ntls_www_client\nencryption_key\n\
             signing_key\nexpiration_days = 3650\n",
            subject.cn
        );
        if let Some(dns) = subject.dns {
            template.push_str(&format!("dns_name = \"{dns}\"\n"));
        }
        self.issue(
            &dir.join("client-key.pem"),
            &dir.join("client-cert.pem"),
            &template,
        );
        dir
    }
}

/// A client directory in `root/name/` with only `ca-cert.pem` (`trust`): a client that checks
/// the server but has no certificate of its own.
pub fn trust_dir(root: &Path, name: &str, trust: &Ca) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).expect("create client creds dir");
    fs::copy(trust.cert(), dir.join("ca-cert.pem")).expect("copy CA certificate");
    dir
}

/// Adds (or replaces) `user` with a fresh random key in the psktool file `path`
/// (`username:hexkey` lines, the format qemu, libnbd and nbdkit read).
pub fn psk_user(path: &Path, user: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create PSK dir");
    }
    run(
        Command::new("psktool").args(["-u", user, "-p"]).arg(path),
        CLIENT_TIMEOUT,
    )
    .ok();
    let text = fs::read_to_string(path).expect("read PSK file");
    assert!(
        text.lines()
            .any(|line| line.starts_with(&format!("{user}:"))),
        "psktool did not write {user}: {text}"
    );
}

/// `--tls` mode: the server's own type, so the flag spelling cannot drift.
pub use ringbd::config::TlsMode;

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// ringbd (always, in CI).
    Ringbd,
    /// nbdkit, with `RINGBD_TEST_SERVER=nbdkit` (checks the tests, never run by CI).
    Nbdkit,
}

/// The server the tests run against.
pub fn peer() -> Peer {
    match std::env::var("RINGBD_TEST_SERVER").as_deref() {
        Ok("nbdkit") => Peer::Nbdkit,
        _ => Peer::Ringbd,
    }
}

/// A TLS server setup, independent of which server runs it.
#[derive(Debug, Clone)]
pub struct TlsSpec {
    /// `--tls`.
    pub mode: TlsMode,
    /// X.509 credentials (`--tls-cert`, `--tls-key`).
    pub x509: Option<ServerCreds>,
    /// Require and verify client certificates against `x509.ca` (`--tls-ca`).
    pub verify_clients: bool,
    /// PSK file (`--tls-psk`).
    pub psk: Option<PathBuf>,
    /// `[NAME=]memory:SIZE` exports (nbdkit: exactly one).
    pub exports: Vec<String>,
    /// Further ringbd options that change what clients see (`--handshake-timeout-seconds 2`,
    /// `--config FILE`, ...); the nbdkit peer refuses to start with any.
    pub options: Vec<String>,
    /// ringbd tuning that clients cannot tell apart (`--shards 1`, `--tls-kernel off`); the
    /// nbdkit peer ignores it.
    pub tuning: Vec<String>,
}

impl TlsSpec {
    /// No TLS flags; `exports` served.
    pub fn plain(exports: &[&str]) -> Self {
        TlsSpec {
            mode: TlsMode::Off,
            x509: None,
            verify_clients: false,
            psk: None,
            exports: exports.iter().map(|e| e.to_string()).collect(),
            options: Vec::new(),
            tuning: Vec::new(),
        }
    }

    /// X.509 in `mode`.
    pub fn x509(mode: TlsMode, creds: &ServerCreds, exports: &[&str]) -> Self {
        TlsSpec {
            mode,
            x509: Some(creds.clone()),
            ..Self::plain(exports)
        }
    }

    /// PSK in `mode`.
    pub fn psk(mode: TlsMode, file: &Path, exports: &[&str]) -> Self {
        TlsSpec {
            mode,
            psk: Some(file.to_path_buf()),
            ..Self::plain(exports)
        }
    }

    /// Requires client certificates (`--tls-ca`).
    pub fn verify_clients(mut self) -> Self {
        self.verify_clients = true;
        self
    }

    /// Adds ringbd options (nbdkit cannot honour them: see [`TlsSpec::start`]).
    pub fn options(mut self, options: &[&str]) -> Self {
        self.options.extend(options.iter().map(|o| o.to_string()));
        self
    }

    /// Adds ringbd tuning flags (ignored by the nbdkit peer).
    pub fn tuning(mut self, options: &[&str]) -> Self {
        self.tuning.extend(options.iter().map(|o| o.to_string()));
        self
    }

    /// ringbd's command-line flags for the TLS part of this spec.
    pub fn ringbd_tls_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.mode != TlsMode::Off {
            flags.extend(["--tls".to_string(), self.mode.as_str().to_string()]);
        }
        if let Some(creds) = &self.x509 {
            flags.push("--tls-cert".into());
            flags.push(creds.cert.display().to_string());
            flags.push("--tls-key".into());
            flags.push(creds.key.display().to_string());
            if self.verify_clients {
                flags.push("--tls-ca".into());
                flags.push(creds.ca.display().to_string());
            }
        }
        if let Some(psk) = &self.psk {
            flags.push("--tls-psk".into());
            flags.push(psk.display().to_string());
        }
        flags
    }

    /// Starts the server (see the module docs for which one) on a fresh 127.0.0.1 port.
    pub fn start(&self) -> TcpServer {
        let port = free_tcp_port();
        let inner = match peer() {
            Peer::Ringbd => {
                let spec = ServerSpec {
                    exports: self.exports.clone(),
                    options: [
                        self.ringbd_tls_flags(),
                        self.options.clone(),
                        self.tuning.clone(),
                    ]
                    .concat(),
                    listen: Some(format!("127.0.0.1:{port}")),
                };
                Inner::Ringbd(spec.start())
            }
            Peer::Nbdkit => Inner::Nbdkit(NbdkitProcess::start(self, port)),
        };
        let mut server = TcpServer { port, inner };
        server.wait_tcp_ready();
        server
    }
}

/// A running server reachable on `127.0.0.1:port`.
#[derive(Debug)]
pub struct TcpServer {
    port: u16,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Ringbd(Server),
    Nbdkit(NbdkitProcess),
}

impl TcpServer {
    /// Starts ringbd from a full [`ServerSpec`] plus `--listen 127.0.0.1:PORT` (for scenarios
    /// only ringbd can express, such as configuration files). Panics under
    /// `RINGBD_TEST_SERVER=nbdkit`.
    pub fn ringbd(spec: ServerSpec) -> TcpServer {
        assert_eq!(
            peer(),
            Peer::Ringbd,
            "this scenario needs ringbd (nbdkit cannot express it)"
        );
        let port = free_tcp_port();
        let mut server = TcpServer {
            port,
            inner: Inner::Ringbd(spec.listen(format!("127.0.0.1:{port}")).start()),
        };
        server.wait_tcp_ready();
        server
    }

    fn wait_tcp_ready(&mut self) {
        let deadline = Instant::now() + super::SERVER_READY_TIMEOUT;
        while TcpStream::connect(self.address()).is_err() {
            assert!(
                self.is_running(),
                "server exited during startup; log:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "server does not accept on {}; log:\n{}",
                self.address(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        match &self.inner {
            Inner::Ringbd(server) => server.pid(),
            Inner::Nbdkit(process) => process.child.id(),
        }
    }

    /// The ringbd harness server (unix socket, log), if this is ringbd.
    pub fn ringbd_server(&mut self) -> Option<&mut Server> {
        match &mut self.inner {
            Inner::Ringbd(server) => Some(server),
            Inner::Nbdkit(_) => None,
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        match &self.inner {
            Inner::Ringbd(server) => server.log(),
            Inner::Nbdkit(process) => {
                String::from_utf8_lossy(&fs::read(&process.log).unwrap_or_default()).into_owned()
            }
        }
    }

    /// True while the server process has not exited.
    pub fn is_running(&mut self) -> bool {
        match &mut self.inner {
            Inner::Ringbd(server) => server.is_running(),
            Inner::Nbdkit(process) => process.child.try_wait().expect("try_wait").is_none(),
        }
    }

    /// Panics (with the log) if the server has exited.
    pub fn assert_running(&mut self) {
        let running = self.is_running();
        assert!(running, "server is no longer running; log:\n{}", self.log());
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` (plaintext).
    pub fn plain_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR` (libnbd, X.509).
    pub fn x509_uri(&self, export: &str, client_dir: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
            self.port,
            client_dir.display()
        )
    }

    /// `nbds://USER@127.0.0.1:PORT/EXPORT?tls-psk-file=FILE` (libnbd, PSK). libnbd 1.14 takes
    /// the PSK identity from the URI's user part only (it has no `tls-username` query key).
    pub fn psk_uri(&self, export: &str, user: &str, psk_file: &Path) -> String {
        format!(
            "nbds://{user}@127.0.0.1:{}/{export}?tls-psk-file={}",
            self.port,
            psk_file.display()
        )
    }

    /// `qemu-img info --output=json` with `--object tls-creds-x509` (endpoint=client).
    pub fn qemu_img_info_x509(&self, export: &str, client_dir: &Path) -> RunOutput {
        let object = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            client_dir.display()
        );
        self.qemu_img_info(export, Some(&object))
    }

    /// `qemu-img info --output=json` with `--object tls-creds-psk` (DIR holds `keys.psk`).
    pub fn qemu_img_info_psk(&self, export: &str, psk_dir: &Path, user: &str) -> RunOutput {
        assert!(
            psk_dir.join("keys.psk").is_file(),
            "qemu's tls-creds-psk reads DIR/keys.psk"
        );
        let object = format!(
            "tls-creds-psk,id=tls0,dir={},username={user},endpoint=client",
            psk_dir.display()
        );
        self.qemu_img_info(export, Some(&object))
    }

    /// `qemu-img info --output=json`, plaintext or with the `tls0` object given.
    pub fn qemu_img_info(&self, export: &str, tls_object: Option<&str>) -> RunOutput {
        let mut opts = format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export}",
            self.port
        );
        let mut cmd = Command::new("qemu-img");
        cmd.args(["info", "--output=json"]);
        if let Some(object) = tls_object {
            cmd.args(["--object", object]);
            opts.push_str(",tls-creds=tls0");
        }
        cmd.args(["--image-opts", &opts]);
        run(&mut cmd, CLIENT_TIMEOUT)
    }
}

/// `nbdinfo ARGS... URI`, bounded.
pub fn nbdinfo(args: &[&str], uri: &str) -> RunOutput {
    run(Command::new("nbdinfo").args(args).arg(uri), CLIENT_TIMEOUT)
}

/// The first unsigned number after `"key":` in a JSON text (nbdinfo and qemu-img print flat
/// objects; this avoids a JSON dependency).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle)? + needle.len();
    let digits: String = json[start..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Every string value of `"key": "value"` in a JSON text, in order.
pub fn json_strings(json: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\":");
    json.match_indices(&needle)
        .filter_map(|(at, _)| {
            let rest = json[at + needle.len()..].trim_start().strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// Asserts `nbdinfo --json` succeeded over TLS and reports `size` for its first export.
pub fn assert_nbdinfo_tls_size(out: RunOutput, size: u64) {
    assert!(out.status.success(), "nbdinfo failed: {out}");
    assert!(
        out.stdout.contains("\"TLS\": true"),
        "nbdinfo did not negotiate TLS: {out}"
    );
    assert_eq!(
        json_u64(&out.stdout, "export-size"),
        Some(size),
        "size: {out}"
    );
}

/// Asserts `qemu-img info --output=json` succeeded and reports `size`.
pub fn assert_qemu_size(out: RunOutput, size: u64) {
    assert!(out.status.success(), "qemu-img failed: {out}");
    assert_eq!(
        json_u64(&out.stdout, "virtual-size"),
        Some(size),
        "qemu-img info: {out}"
    );
}

/// Asserts a client command failed without showing the export's size (`nbdinfo --size`,
/// `--json` or `qemu-img info --output=json` output), and, if `needles` is not empty, that its
/// stderr contains one of `needles`.
pub fn assert_refused(out: &RunOutput, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "expected a refusal, got success: {out}"
    );
    let shows_size = out.stdout.trim().parse::<u64>().is_ok()
        || out.stdout.contains("export-size")
        || out.stdout.contains("virtual-size");
    assert!(
        !shows_size,
        "a refused client must not see the export: {out}"
    );
    assert!(
        needles.is_empty() || needles.iter().any(|n| out.stderr.contains(n)),
        "stderr should mention one of {needles:?}: {out}"
    );
}

/// libnbd's (`nbdinfo --size`, `nbd_connect_uri`) message when GO gets `NBD_REP_ERR_POLICY`.
pub const LIBNBD_POLICY: &str = "server policy prevents NBD_OPT_GO";
/// libnbd's message when GO gets `NBD_REP_ERR_TLS_REQD`.
pub const LIBNBD_TLS_REQUIRED: &str = "server requires TLS encryption first";
/// qemu's message when an option gets `NBD_REP_ERR_TLS_REQD`.
pub const QEMU_TLS_REQUIRED: &str = "TLS negotiation required before option";
/// qemu's message when GO gets `NBD_REP_ERR_POLICY` (followed by "server reported: REASON").
pub const QEMU_POLICY: &str = "Denied by server for option 7 (go)";

/// nbdkit started with the TLS setup of a [`TlsSpec`] (development aid only).
#[derive(Debug)]
struct NbdkitProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdkitProcess {
    fn start(spec: &TlsSpec, port: u16) -> NbdkitProcess {
        assert!(
            spec.options.is_empty(),
            "nbdkit cannot honour ringbd options {:?}",
            spec.options
        );
        assert_eq!(spec.exports.len(), 1, "the nbdkit peer serves one export");
        let dir = super::tempdir();
        let log = dir.path().join("nbdkit.log");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(format!("--tls={}", spec.mode.as_str()));
        if let Some(creds) = &spec.x509 {
            cmd.arg(format!("--tls-certificates={}", creds.dir.display()));
            if spec.verify_clients {
                cmd.arg("--tls-verify-peer");
            }
        }
        if let Some(psk) = &spec.psk {
            cmd.arg(format!("--tls-psk={}", psk.display()));
        }
        let export = &spec.exports[0];
        let (name, path) = export.split_once('=').unwrap_or(("", export));
        let size = path
            .strip_prefix("memory:")
            .expect("the nbdkit peer serves memory exports only");
        cmd.args(["-e", name, "memory", size])
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("create nbdkit log"))
            .stderr(File::create(&log).expect("create nbdkit log"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        NbdkitProcess {
            child,
            log,
            _dir: dir,
        }
    }
}

impl Drop for NbdkitProcess {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        if wait_timeout(&mut self.child, super::SERVER_STOP_TIMEOUT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== nbdkit log =====\n{}=====",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
