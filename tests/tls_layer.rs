//! Interop of `ringbd::tls` with an independent TLS implementation: `gnutls-cli` (GnuTLS)
//! against a tiny test-only TCP server on 127.0.0.1 that drives a `TlsSession` by bytes over
//! a blocking std socket. Credentials come from `certtool` and `psktool` (gnutls-bin).
//!
//! The server sends a greeting after the handshake and echoes whatever plaintext arrives,
//! until the peer closes. With `try_kernel`, it first tries to move the session into kernel
//! TLS: on a kernel without the `tls` module that must be declined with the session intact
//! (and the echo continues in user space); on a kernel with it, the echo continues as plain
//! socket I/O and the client must still see correct TLS.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use ringbd::ring::ktls::{self, KtlsSupport};
use ringbd::tls::{Identity, IntoKernelError, TlsContext, TlsPaths, TlsSession};

/// Whether `identity` matches the `allow_clients` pattern `text`.
fn matches(identity: &Identity, text: &str) -> bool {
    use ringbd::access::{ClientIdentity, ClientPattern};
    identity.matches(&ClientPattern::parse(text).unwrap())
}

const GREETING: &[u8] = b"ringbd-tls-test ready\n";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// What the kTLS attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kernel {
    NotTried,
    Declined(String),
    Switched(String),
}

/// What the server saw.
#[derive(Debug)]
struct Outcome {
    error: Option<String>,
    identity: Option<Identity>,
    summary: String,
    received: Vec<u8>,
    kernel: Kernel,
}

fn tools() -> bool {
    common::require_tools(&["gnutls-cli", "certtool", "psktool"])
}

/// Serves one connection: handshake, greeting, echo until the peer closes.
fn serve_one(listener: TcpListener, context: TlsContext, try_kernel: bool) -> Outcome {
    let (mut socket, _) = listener.accept().expect("accept");
    socket.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    socket.set_write_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    let mut session = context.session().expect("session");
    let mut outcome = Outcome {
        error: None,
        identity: None,
        summary: String::new(),
        received: Vec::new(),
        kernel: Kernel::NotTried,
    };
    let mut greeted = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Err(error) = pump_in(&mut session, &buf[..n], &mut socket, &mut outcome) {
            outcome.error = Some(error);
            flush(&mut session, &mut socket);
            break;
        }
        if !session.is_handshaking() && !greeted {
            greeted = true;
            outcome.identity = session.identity().cloned();
            outcome.summary = session.summary();
            write_all(&mut session, GREETING, &mut socket);
        }
        if session.peer_closed() {
            session.send_close_notify();
            flush(&mut session, &mut socket);
            break;
        }
        if try_kernel && greeted && outcome.kernel == Kernel::NotTried && session.ready_for_kernel()
        {
            match session.into_kernel(socket.as_raw_fd()) {
                Ok(kernel) => {
                    outcome.kernel = Kernel::Switched(kernel.summary.clone());
                    outcome
                        .received
                        .extend_from_slice(&kernel.leftover_plaintext);
                    socket.write_all(&kernel.leftover_plaintext).unwrap();
                    echo_plain(&mut socket, &mut outcome);
                    let _ = ktls::send_close_notify(socket.as_raw_fd());
                    return outcome;
                }
                Err(IntoKernelError::Declined {
                    session: back,
                    reason,
                }) => {
                    outcome.kernel = Kernel::Declined(reason.to_string());
                    session = *back;
                }
                Err(IntoKernelError::Failed(reason)) => {
                    outcome.error = Some(format!("kTLS failed: {reason}"));
                    return outcome;
                }
            }
        }
    }
    outcome
}

/// Feeds everything, echoing plaintext as it comes out.
fn pump_in(
    session: &mut TlsSession,
    mut data: &[u8],
    socket: &mut TcpStream,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let mut plain = vec![0u8; 16 * 1024];
    for _ in 0..100_000 {
        let consumed = session.feed(data).map_err(|error| error.to_string())?;
        data = &data[consumed..];
        loop {
            let n = session
                .read_plaintext(&mut plain)
                .map_err(|error| error.to_string())?;
            if n == 0 {
                break;
            }
            outcome.received.extend_from_slice(&plain[..n]);
            let echo = plain[..n].to_vec();
            write_all(session, &echo, socket);
        }
        flush(session, socket);
        if data.is_empty() || session.peer_closed() {
            return Ok(());
        }
    }
    panic!("feed made no progress");
}

fn write_all(session: &mut TlsSession, mut data: &[u8], socket: &mut TcpStream) {
    while !data.is_empty() {
        let accepted = session.write_plaintext(data).expect("write_plaintext");
        data = &data[accepted..];
        flush(session, socket);
    }
}

fn flush(session: &mut TlsSession, socket: &mut TcpStream) {
    let mut out = vec![0u8; 32 * 1024];
    loop {
        let n = session.write_ciphertext(&mut out);
        if n == 0 || socket.write_all(&out[..n]).is_err() {
            return;
        }
    }
}

/// After the switch: the socket carries plaintext; echo until EOF or an error (EIO on the
/// client's close_notify record).
fn echo_plain(socket: &mut TcpStream, outcome: &mut Outcome) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                outcome.received.extend_from_slice(&buf[..n]);
                if socket.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts the server thread; returns the port and the handle.
fn start(context: TlsContext, try_kernel: bool) -> (u16, thread::JoinHandle<Outcome>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || serve_one(listener, context, try_kernel));
    (port, handle)
}

/// Runs gnutls-cli with `args` against `port`, sending `input`; returns (success, stdout).
fn gnutls_cli(port: u16, args: &[String], input: &[u8]) -> common::RunOutput {
    let mut command = Command::new("gnutls-cli");
    command
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .arg("127.0.0.1");
    common::run_with_stdin(&mut command, Some(input), CLIENT_TIMEOUT)
}

/// Runs gnutls-cli interactively: waits for the greeting before typing `input`, waits for
/// its echo, then closes stdin. Returns everything the client printed. Bounded in time; the
/// child is killed (by its own handle) on timeout.
fn gnutls_cli_interactive(port: u16, args: &[String], input: &[u8]) -> String {
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    let mut child = Command::new("gnutls-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .arg("127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gnutls-cli");
    let printed = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = printed.clone();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let wait_for = |needle: &[u8]| {
        let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let seen = printed
                .lock()
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle);
            if seen {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    };
    let mut stdin = child.stdin.take().unwrap();
    if wait_for(GREETING) {
        stdin.write_all(input).unwrap();
        wait_for(input);
    }
    drop(stdin);
    if common::wait_timeout(&mut child, CLIENT_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    reader.join().unwrap();
    String::from_utf8_lossy(&printed.lock().unwrap()).into_owned()
}

// ---- credentials made by certtool / psktool ----

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new() -> Pki {
        let pki = Pki {
            dir: common::tempdir(),
        };
        pki.authority("ca", "ringbd test CA");
        pki.authority("other-ca", "some other CA");
        let server = "organization = \"ringbd test\"\ncn = \"localhost\"\n\
                      dns_name = \"localhost\"\nip_address = \"127.0.0.1\"\ntls_www_server\n\
                      encryption_key\nsigning_key\n";
        pki.leaf("server", "ca", server);
        pki.leaf("ecserver", "ca", server);
        pki.leaf(
            "alice",
            "ca",
            "organization = \"Example\"\ncn = \"alice\"\nemail = \"alice@example.org\"\n\
             tls_www_client\nsigning_key\n",
        );
        pki.leaf(
            "mallory",
            "other-ca",
            "cn = \"mallory\"\ntls_www_client\nsigning_key\n",
        );
        pki
    }

    fn certtool(&self, args: &[&str]) {
        let mut command = Command::new("certtool");
        command.current_dir(self.dir.path()).args(args);
        common::run(&mut command, CLIENT_TIMEOUT).ok();
    }

    fn authority(&self, name: &str, cn: &str) {
        let template = format!("cn = \"{cn}\"\nca\ncert_signing_key\nexpiration_days = 2\n");
        std::fs::write(self.path(&format!("{name}.tmpl")), template).unwrap();
        self.certtool(&[
            "--generate-privkey",
            "--key-type=ecdsa",
            "--outfile",
            &format!("{name}.key"),
        ]);
        self.certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            &format!("{name}.key"),
            "--template",
            &format!("{name}.tmpl"),
            "--outfile",
            &format!("{name}.pem"),
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, template: &str) {
        let template = format!("{template}expiration_days = 2\n");
        std::fs::write(self.path(&format!("{name}.tmpl")), template).unwrap();
        // The server key stays RSA (certtool's default) to cover PKCS#1/RSA loading.
        let mut key_args = vec!["--generate-privkey", "--outfile"];
        let key = format!("{name}.key");
        key_args.push(&key);
        if name != "server" {
            key_args.push("--key-type=ecdsa");
        }
        self.certtool(&key_args);
        self.certtool(&[
            "--generate-certificate",
            "--load-privkey",
            &format!("{name}.key"),
            "--load-ca-certificate",
            &format!("{ca}.pem"),
            "--load-ca-privkey",
            &format!("{ca}.key"),
            "--template",
            &format!("{name}.tmpl"),
            "--outfile",
            &format!("{name}.pem"),
        ]);
    }

    /// `server`: RSA key (certtool's default, PKCS#1 PEM); `ecserver`: ECDSA (SEC1 PEM).
    fn server_paths(&self, require_client_certs: bool) -> TlsPaths {
        self.named_server_paths("server", require_client_certs)
    }

    fn named_server_paths(&self, name: &str, require_client_certs: bool) -> TlsPaths {
        TlsPaths {
            cert: Some(self.path(&format!("{name}.pem"))),
            key: Some(self.path(&format!("{name}.key"))),
            ca: require_client_certs.then(|| self.path("ca.pem")),
            psk: None,
        }
    }

    fn client_args(&self, identity: Option<&str>, priority: &str) -> Vec<String> {
        let mut args = vec![
            format!("--x509cafile={}", self.path("ca.pem").display()),
            format!("--priority={priority}"),
        ];
        if let Some(name) = identity {
            args.push(format!(
                "--x509certfile={}",
                self.path(&format!("{name}.pem")).display()
            ));
            args.push(format!(
                "--x509keyfile={}",
                self.path(&format!("{name}.key")).display()
            ));
        }
        args
    }
}

fn psk_file(dir: &Path, users: &[&str]) -> PathBuf {
    let path = dir.join("keys.psk");
    for user in users {
        let mut command = Command::new("psktool");
        command.args(["-u", user, "-p"]).arg(&path);
        common::run(&mut command, CLIENT_TIMEOUT).ok();
    }
    path
}

/// The hex key psktool stored for `user`.
fn psk_key(path: &Path, user: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{user}:")))
        .expect("user in the psk file")
        .to_string()
}

const TLS13: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.3";
const TLS12: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.2";

fn assert_echoed(client: &common::RunOutput, outcome: &Outcome, input: &[u8]) {
    assert!(
        outcome.error.is_none(),
        "server error: {outcome:?}\n{client}"
    );
    assert_eq!(outcome.received, input, "server received\n{client}");
    let greeting = String::from_utf8_lossy(GREETING);
    assert!(
        client.stdout.contains(greeting.trim()),
        "no greeting: {client}"
    );
    let echo = String::from_utf8_lossy(input);
    assert!(client.stdout.contains(echo.trim()), "no echo: {client}");
}

#[test]
fn x509_gnutls_cli_tls13_and_tls12() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let context = TlsContext::load(&pki.server_paths(false)).expect("load certtool credentials");
    assert!(
        context
            .describe()
            .starts_with("x509 (certificate CN=localhost,O=ringbd test")
    );
    for (priority, version) in [(TLS13, "TLS1.3"), (TLS12, "TLS1.2")] {
        let (port, server) = start(context.clone(), false);
        let input = b"hello over x509\n";
        let client = gnutls_cli(port, &pki.client_args(None, priority), input);
        let outcome = server.join().unwrap();
        assert_echoed(&client, &outcome, input);
        assert!(outcome.summary.starts_with(version), "{outcome:?}");
        assert!(
            outcome.summary.ends_with("x509 (no client certificate)"),
            "{outcome:?}"
        );
        assert!(outcome.identity.is_none());
    }
}

#[test]
fn x509_client_certificates_from_certtool() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let context =
        TlsContext::load(&pki.named_server_paths("ecserver", true)).expect("load with CA");
    // A certificate from the CA: accepted and identified.
    let (port, server) = start(context.clone(), false);
    let input = b"hello from alice\n";
    let client = gnutls_cli(port, &pki.client_args(Some("alice"), TLS13), input);
    let outcome = server.join().unwrap();
    assert_echoed(&client, &outcome, input);
    let identity = outcome.identity.expect("client identity");
    assert_eq!(identity.subject.as_deref(), Some("CN=alice,O=Example"));
    assert!(matches(&identity, "CN=alice"));
    assert!(
        matches(&identity, "EMAIL:alice@example.org"),
        "{identity:?}"
    );
    // No certificate, or one from another CA: refused during the handshake.
    for who in [None, Some("mallory")] {
        let (port, server) = start(context.clone(), false);
        let client = gnutls_cli(port, &pki.client_args(who, TLS13), b"let me in\n");
        let outcome = server.join().unwrap();
        assert!(
            outcome.error.is_some(),
            "{who:?} must be refused: {outcome:?}\n{client}"
        );
        assert!(outcome.received.is_empty());
        assert!(!client.stdout.contains("ringbd-tls-test ready"), "{client}");
    }
}

#[test]
fn psk_gnutls_cli_with_psktool_keys() {
    if !tools() {
        return;
    }
    let dir = common::tempdir();
    let file = psk_file(dir.path(), &["alice", "bob"]);
    let context = TlsContext::load(&TlsPaths {
        psk: Some(file.clone()),
        ..TlsPaths::default()
    })
    .expect("load psktool file");
    assert!(
        context.describe().contains("2 users"),
        "{}",
        context.describe()
    );
    let key = psk_key(&file, "bob");
    // gnutls-cli 3.7.9 (Debian 12) segfaults after negotiating TLS 1.2 ECDHE-PSK, against
    // `openssl s_server` too, so TLS 1.2 is tested with plain PSK; TLS 1.3 uses (EC)DHE-PSK.
    let psk_priority = |versions: &str| {
        if versions == TLS12 {
            format!("{versions}:+PSK")
        } else {
            format!("{versions}:+ECDHE-PSK:+DHE-PSK:+PSK")
        }
    };
    for (versions, version) in [(TLS13, "TLS1.3"), (TLS12, "TLS1.2")] {
        let (port, server) = start(context.clone(), false);
        let args = vec![
            "--pskusername=bob".to_string(),
            format!("--pskkey={key}"),
            format!("--priority={}", psk_priority(versions)),
        ];
        let input = b"hello over psk\n";
        let client = gnutls_cli(port, &args, input);
        let outcome = server.join().unwrap();
        assert_echoed(&client, &outcome, input);
        assert!(outcome.summary.starts_with(version), "{outcome:?}");
        let identity = outcome.identity.expect("psk identity");
        assert!(matches(&identity, "PSK:bob"), "{identity:?}");
    }
    // A wrong key and an unknown user are refused.
    let wrong = psk_key(&file, "alice");
    for (user, key) in [("bob", wrong.as_str()), ("mallory", key.as_str())] {
        let (port, server) = start(context.clone(), false);
        let args = vec![
            format!("--pskusername={user}"),
            format!("--pskkey={key}"),
            format!("--priority={}", psk_priority(TLS13)),
        ];
        let client = gnutls_cli(port, &args, b"let me in\n");
        let outcome = server.join().unwrap();
        assert!(
            outcome.error.is_some(),
            "{user} must be refused: {outcome:?}\n{client}"
        );
        assert!(outcome.received.is_empty());
    }
}

#[test]
fn kernel_tls_switches_or_falls_back_cleanly() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let context = TlsContext::load(&pki.server_paths(false)).unwrap();
    for priority in [
        TLS13,
        TLS12,
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305",
        "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM",
    ] {
        let (port, server) = start(context.clone(), true);
        let input = b"hello through the kernel\n";
        let printed = gnutls_cli_interactive(port, &pki.client_args(None, priority), input);
        let outcome = server.join().unwrap();
        assert!(
            outcome.error.is_none(),
            "{priority}: {outcome:?}\n{printed}"
        );
        assert_eq!(outcome.received, input, "{priority}: {printed}");
        let greeting = String::from_utf8_lossy(GREETING);
        let echo = String::from_utf8_lossy(input);
        assert!(
            printed.contains(greeting.trim()) && printed.contains(echo.trim()),
            "{printed}"
        );
        match (ktls::probe(), &outcome.kernel) {
            (KtlsSupport::Unavailable { reason }, Kernel::Declined(declined)) => {
                // The session came back intact (the echo above went through it) and the
                // reason is the probe's, which names the missing module on ENOENT.
                assert_eq!(declined, &format!("kernel TLS: {reason}"));
                assert!(declined.contains("TCP_ULP"), "{declined}");
                if declined.contains("os error 2)") {
                    assert!(declined.contains("no tls module"), "{declined}");
                }
            }
            (KtlsSupport::Available { .. }, Kernel::Switched(summary)) => {
                assert!(summary.ends_with("kTLS"), "{summary}");
            }
            (support, kernel) => panic!("probe {support:?} but the attempt gave {kernel:?}"),
        }
    }
}
