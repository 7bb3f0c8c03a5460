//! Kernel TLS (kTLS) end to end: ringbd runs inside a qemu guest whose kernel has `tls.ko`
//! (the development host's kernel has no `CONFIG_TLS`), and real clients on the host reach it
//! through a qemu `hostfwd` on 127.0.0.1: nbdinfo, nbdcopy and python3-libnbd (GnuTLS).
//!
//! Two servers run in the guest: one with `--tls-kernel auto` (the default) and client
//! certificates required (`--tls-ca`), one with `--tls-kernel off`. Their logs stream to the
//! serial console with `AUTO| ` / `OFF| ` prefixes, and the kernel's own counters
//! (`/proc/net/tls_stat`) are printed before and after. The test checks:
//!
//! * data: nbdcopy of random data in and out with equal SHA-256 (32 MiB at the default suite,
//!   4 MiB for each other suite and for the `off` server); python3-libnbd with hundreds of
//!   concurrent 1 MiB and 4 KiB requests on several connections, a clean disconnect of one
//!   of them, and the others continuing (tests/python/ktls_io.py);
//! * every (version, cipher) pair ringbd hands to the kernel, forced from the client with a
//!   GnuTLS system priority file (`GNUTLS_SYSTEM_PRIORITY_FILE`, `[overrides]`): libnbd sets
//!   the priority string `NORMAL`, which the overrides still restrict;
//! * TLS 1.2 AES-GCM explicit nonces as sent on the wire (through a recording relay): the
//!   kernel's never repeat the one rustls used for the Finished record;
//! * close_notify without NBD_CMD_DISC from OpenSSL (tests/python/ktls_close_notify.py), on
//!   both servers: the connection is closed, the others keep being served;
//! * from the `auto` log, that every TLS connection logged `kernel TLS on` with the suite it
//!   negotiated and ended with the expected close; from the `off` log, that no connection
//!   tried the kernel;
//! * from the kernel, that `TlsTxSw`/`TlsRxSw` grew by exactly the `kernel TLS on`
//!   connections plus ringbd's one-time probe (one per pair, all supported), that no record
//!   failed to decrypt (`TlsDecryptError`), and that no kTLS socket is left open at the end.
//!
//! A second test runs tests/tls_layer.rs's kTLS check inside the guest (see its docs).
//!
//! Needs `scripts/install-deps` (qemu-system-x86, busybox-static, cpio, socat, the guest
//! kernel of `scripts/guest-kernel`, gnutls-bin, libnbd-bin, python3-libnbd); fails under
//! `RINGBD_STRICT_TESTS=1` without them. About 30 s under TCG.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::free_tcp_port;
use common::guest::{Guest, GuestOutput, RunningGuest, require_guest};
use common::tls::{Ca, ServerCreds, Subject, json_u64};
use common::*;

const MIB: u64 = 1 << 20;
/// Bound on the whole guest (boot, every client, power-off).
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on one client command.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest ports of the two servers and of the "host is done" listener.
const AUTO_PORT: u16 = 10809;
const OFF_PORT: u16 = 10810;
const CONTROL_PORT: u16 = 7000;
const READY: &str = "RINGBD-KTLS-READY";
const SEED: u64 = 0x6b74_6c73;
/// Bytes copied in and out at the default suite.
const COPY_BYTES: u64 = 32 * MIB;
/// Bytes copied in and out for every other suite and the `off` server.
const SMALL_BYTES: u64 = 4 * MIB;
/// Size of the python3-libnbd export (ktls_io.py needs 16 MiB).
const PYTHON_BYTES: u64 = 16 * MIB;
/// What libnbd negotiates with ringbd when nothing is forced.
const DEFAULT_SUITE: &str = "TLS1.3 TLS13_AES_256_GCM_SHA384";
/// What the shard logs when a kTLS connection's receive fails because the client sent
/// close_notify without NBD_CMD_DISC: the kernel returns EIO for a record that is not
/// application data, which `recv_ended` (src/shard.rs) names this way on kernel-TLS
/// connections. The user-space path logs "client disconnected" for the same client (checked
/// on `off`).
const KTLS_CLOSE_NOTIFY_REASON: &str = "client ended the TLS session";
/// Pairs ringbd can hand to the kernel; its probe sets keys for each once per process.
const PROBED_PAIRS: u64 = ringbd::ring::ktls::ALL_PAIRS.len() as u64;

/// Crypto modules the `tls` module allocates by name (`gcm(aes)`, `rfc7539(chacha20,poly1305)`).
/// A full system loads them on demand; the guest's initramfs holds only what it is given.
const CRYPTO_MODULES: [&str; 7] = [
    "aesni_intel",
    "gcm",
    "ctr",
    "ghash_generic",
    "chacha_generic",
    "poly1305_generic",
    "chacha20poly1305",
];

/// A client setting that forces one suite, and the export it uses (one per suite, so the
/// server log says which connection was which).
struct Forced {
    export: &'static str,
    /// GnuTLS `[overrides]` lines (see the module docs).
    overrides: &'static str,
    /// The start of ringbd's session summary: version and rustls suite name.
    suite: &'static str,
}

const FORCED: [Forced; 5] = [
    Forced {
        export: "tls13aes128",
        overrides: "tls-disabled-cipher = AES-256-GCM\ntls-disabled-cipher = CHACHA20-POLY1305\n",
        suite: "TLS1.3 TLS13_AES_128_GCM_SHA256",
    },
    Forced {
        export: "tls13chacha",
        overrides: "tls-disabled-cipher = AES-256-GCM\ntls-disabled-cipher = AES-128-GCM\n",
        suite: "TLS1.3 TLS13_CHACHA20_POLY1305_SHA256",
    },
    Forced {
        export: "tls12aes256",
        overrides: "disabled-version = tls1.3\n",
        suite: "TLS1.2 TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    },
    Forced {
        export: "tls12aes128",
        overrides: "disabled-version = tls1.3\ntls-disabled-cipher = AES-256-GCM\n\
                    tls-disabled-cipher = CHACHA20-POLY1305\n",
        suite: "TLS1.2 TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    },
    Forced {
        export: "tls12chacha",
        overrides: "disabled-version = tls1.3\ntls-disabled-cipher = AES-256-GCM\n\
                    tls-disabled-cipher = AES-128-GCM\n",
        suite: "TLS1.2 TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    },
];

fn require_ktls_guest() -> bool {
    require_guest(&[ringbd_bin()])
        && require_tools(&["nbdinfo", "nbdcopy", "certtool", "sha256sum"])
        && require_python_nbd()
}

/// The guest's script: both servers, logs to the console, wait for the host, stop, report.
fn guest_script() -> String {
    let bin = ringbd_bin();
    let mut exports = format!(
        "info=memory:{SMALL_BYTES} copy=memory:{COPY_BYTES} py=memory:{PYTHON_BYTES} \
         notify=memory:{SMALL_BYTES}"
    );
    for forced in &FORCED {
        exports.push_str(&format!(" {}=memory:{SMALL_BYTES}", forced.export));
    }
    format!(
        r#"
grep -q '^tls ' /proc/modules || guest_fail "tls.ko is not loaded"
sed 's/^/STAT0| /' /proc/net/tls_stat
creds="--tls require --tls-cert /creds/server-cert.pem --tls-key /creds/server-key.pem"
log="--log-level info,ringbd::shard::tls=debug"
mkfifo /tmp/auto.log /tmp/off.log
sed 's/^/AUTO| /' < /tmp/auto.log &
auto_sed=$!
sed 's/^/OFF| /' < /tmp/off.log &
off_sed=$!
{bin} serve --listen 0.0.0.0:{AUTO_PORT} $creds --tls-ca /creds/ca-cert.pem --tls-kernel auto \
    $log {exports} 2> /tmp/auto.log &
auto=$!
{bin} serve --listen 0.0.0.0:{OFF_PORT} $creds --tls-kernel off $log off=memory:{SMALL_BYTES} \
    2> /tmp/off.log &
off=$!
tries=0
until netstat -tln | grep -q ':{AUTO_PORT} ' && netstat -tln | grep -q ':{OFF_PORT} '; do
    kill -0 $auto && kill -0 $off || guest_fail "a server exited during startup"
    tries=$((tries + 1)); [ $tries -lt 300 ] || guest_fail "the servers never listened"
    sleep 0.1
done
printf '#!/bin/sh\necho stopping\n' > /tmp/stop.sh
chmod +x /tmp/stop.sh
echo {READY}
nc -l -p {CONTROL_PORT} -e /tmp/stop.sh || guest_fail "the control listener failed"
kill -TERM $auto $off
wait $auto
auto_status=$?
wait $off
off_status=$?
wait $auto_sed $off_sed
sed 's/^/STAT1| /' /proc/net/tls_stat
guest_ok "auto_status=$auto_status off_status=$off_status"
"#
    )
}

#[test]
fn kernel_tls_serves_real_clients_in_a_guest() {
    if !require_ktls_guest() {
        return;
    }
    let dir = tempdir();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server(dir.path(), "server");
    let client = ca.client(dir.path(), "client", Subject::cn("ktls-client"), &ca);
    let ports = distinct_ports();
    let mut builder = Guest::builder().module("tls");
    for module in CRYPTO_MODULES {
        builder = builder.module(module);
    }
    let mut guest = builder
        .binary(ringbd_bin())
        .file(&server.cert, "/creds/server-cert.pem")
        .file(&server.key, "/creds/server-key.pem")
        .file(&server.ca, "/creds/ca-cert.pem")
        .hostfwd(ports.auto, AUTO_PORT)
        .hostfwd(ports.off, OFF_PORT)
        .hostfwd(ports.control, CONTROL_PORT)
        .memory_mib(1024)
        .init_script(&guest_script())
        .start(GUEST_TIMEOUT);
    let started = Instant::now();
    guest.wait_for_serial(READY);
    let ready_after = started.elapsed();
    let clients_started = Instant::now();
    while_printing_serial(&guest, || run_clients(&ports, &client, &server, dir.path()));
    let clients_took = clients_started.elapsed();
    stop_guest(ports.control);
    let out = guest.wait();
    out.expect_ok();
    assert_eq!(out.detail("auto_status"), "0", "the auto server's exit");
    assert_eq!(out.detail("off_status"), "0", "the off server's exit");

    let auto = connections(&out.serial, "AUTO| ");
    let off = connections(&out.serial, "OFF| ");
    let with_kernel = check_auto_log(&auto, &out);
    check_off_log(&off, &out);
    check_kernel_counters(&out, with_kernel);
    let mut suites = BTreeMap::<&str, usize>::new();
    for conn in &auto {
        *suites
            .entry(suite_of(conn.tls.as_deref().unwrap_or("")))
            .or_default() += 1;
    }
    eprintln!(
        "kTLS guest: {:?}, servers ready {:.1} s after qemu started, clients {:.1} s, \
         {:.1} s wall in all; {} connections in kernel TLS by suite {suites:?}; \
         {} user-space connections (off)",
        out.accel,
        ready_after.as_secs_f64(),
        clients_took.as_secs_f64(),
        out.wall.as_secs_f64(),
        with_kernel,
        off.len()
    );
}

/// The `tls_layer` test binary next to this one (cargo builds every test target before
/// running any; a targeted run needs `cargo test --release --test tls_layer --no-run`).
fn tls_layer_binary() -> Option<PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    fs::read_dir(deps)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with("tls_layer-") && !name.contains('.')
        })
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
}

/// tests/tls_layer.rs's kTLS check (gnutls-cli against a bare `TlsSession` that calls
/// `into_kernel` itself, then echoes plaintext and sends close_notify with
/// `ring::ktls::send_close_notify`) inside the guest, where it must take the kernel path: the
/// test itself only asserts that a switch agrees with the probe, so the kernel's counters must
/// show its four sessions (TLS 1.3 AES-GCM and ChaCha20, TLS 1.2 AES-128/256-GCM).
#[test]
fn tls_layer_kernel_switch_runs_in_the_guest() {
    let tools = [
        "/usr/bin/gnutls-cli",
        "/usr/bin/certtool",
        "/usr/bin/psktool",
    ];
    if !require_guest(&tools) {
        return;
    }
    let binary = tls_layer_binary();
    let found = require(
        binary.is_some(),
        "no tls_layer test binary next to this one (cargo test --release --test tls_layer \
         --no-run)",
    );
    let Some(binary) = binary.filter(|_| found) else {
        return;
    };
    let mut builder = Guest::builder().module("tls");
    for module in CRYPTO_MODULES {
        builder = builder.module(module);
    }
    for tool in tools {
        builder = builder.binary(tool);
    }
    let script = format!(
        r#"
export RINGBD_STRICT_TESTS=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin
sed 's/^/STAT0| /' /proc/net/tls_stat
{binary} --exact kernel_tls_switches_or_falls_back_cleanly --test-threads 1 --nocapture     > /tmp/tls_layer.log 2>&1
status=$?
sed 's/^/TLS_LAYER| /' /tmp/tls_layer.log
sed 's/^/STAT1| /' /proc/net/tls_stat
[ $status = 0 ] || guest_fail "tls_layer exited with $status"
grep -q '1 passed' /tmp/tls_layer.log || guest_fail "tls_layer did not pass its test"
guest_ok "status=$status"
"#,
        binary = binary.display()
    );
    let out = builder
        .binary(&binary)
        .init_script(&script)
        .run(GUEST_TIMEOUT);
    out.expect_ok();
    let before = tls_stat(&out.serial, "STAT0| ");
    let after = tls_stat(&out.serial, "STAT1| ");
    let delta = |name: &str| after[name] - before[name];
    let sessions = 4;
    assert_eq!(
        (delta("TlsTxSw"), delta("TlsRxSw"), delta("TlsDecryptError")),
        (sessions + PROBED_PAIRS, sessions + PROBED_PAIRS, 0),
        "kernel counters (tx, rx, decrypt errors) before {before:?} after {after:?}\n{}",
        out.serial
    );
    eprintln!(
        "tls_layer in the guest ({:?}): {} in {:.1} s",
        out.accel,
        binary.display(),
        out.wall.as_secs_f64()
    );
}

/// Host ports of the forwards (distinct).
struct Ports {
    auto: u16,
    off: u16,
    control: u16,
}

fn distinct_ports() -> Ports {
    let auto = free_tcp_port();
    let mut off = free_tcp_port();
    while off == auto {
        off = free_tcp_port();
    }
    let mut control = free_tcp_port();
    while control == auto || control == off {
        control = free_tcp_port();
    }
    Ports { auto, off, control }
}

/// Runs `clients`; if it panics, prints the guest's console (the server logs) first.
fn while_printing_serial(guest: &RunningGuest, clients: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(clients)) {
        eprintln!("===== guest serial console =====\n{}", guest.serial());
        resume_unwind(panic);
    }
}

fn uri(port: u16, export: &str, client: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        client.display()
    )
}

/// Every host-side client, in order. Panics on the first failure.
fn run_clients(ports: &Ports, client: &Path, server: &ServerCreds, scratch: &Path) {
    let info = run(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(uri(ports.auto, "info", client)),
        CLIENT_TIMEOUT,
    )
    .ok();
    assert!(info.contains("\"TLS\": true"), "nbdinfo: {info}");
    assert_eq!(json_u64(&info, "export-size"), Some(SMALL_BYTES), "{info}");

    nbdcopy_round_trip(&uri(ports.auto, "copy", client), COPY_BYTES, None, scratch);

    let seed = SEED.to_string();
    let printed = python(
        "ktls_io.py",
        &[&uri(ports.auto, "py", client), &seed],
        CLIENT_TIMEOUT,
    );
    assert!(printed.contains("ktls_io ok"), "{printed}");

    let printed = python(
        "ktls_close_notify.py",
        &[
            &ports.auto.to_string(),
            "notify",
            &client.display().to_string(),
        ],
        CLIENT_TIMEOUT,
    );
    assert!(printed.contains("close_notify ok"), "{printed}");

    for forced in &FORCED {
        let config = scratch.join(format!("{}.gnutls.conf", forced.export));
        fs::write(&config, format!("[overrides]\n{}", forced.overrides)).expect("priority file");
        let uri = uri(ports.auto, forced.export, client);
        nbdcopy_round_trip(&uri, SMALL_BYTES, Some(&config), scratch);
        if forced.suite.starts_with("TLS1.2") && forced.suite.contains("GCM") {
            check_tls12_explicit_nonces(ports.auto, forced.export, client, &config);
        }
    }

    let printed = python(
        "ktls_close_notify.py",
        &[&ports.off.to_string(), "off", &client.display().to_string()],
        CLIENT_TIMEOUT,
    );
    assert!(printed.contains("close_notify ok"), "{printed}");

    // The off server does not ask for client certificates: trust only.
    let trust = scratch.join("trust");
    fs::create_dir_all(&trust).expect("trust dir");
    fs::copy(&server.ca, trust.join("ca-cert.pem")).expect("copy CA");
    nbdcopy_round_trip(&uri(ports.off, "off", &trust), SMALL_BYTES, None, scratch);
}

/// TLS 1.2 AES-GCM records carry their 8-byte explicit nonce in the clear. Runs nbdinfo
/// through a recording relay and checks what the server sent after its ChangeCipherSpec: the
/// Finished record (rustls, record 0) and then the kernel's records, whose nonces must be
/// consecutive and never repeat the Finished record's (a repeat under one GCM key would leak
/// the key stream). ringbd hands the kernel rustls' explicit part with the top bit flipped
/// (src/tls/x509.rs), so the first kernel record's nonce is exactly that.
fn check_tls12_explicit_nonces(port: u16, export: &str, client: &Path, priority: &Path) {
    let (relay_port, relay) = relay_once(port);
    let out = run(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(uri(relay_port, export, client))
            .env("GNUTLS_SYSTEM_PRIORITY_FILE", priority),
        CLIENT_TIMEOUT,
    )
    .ok();
    assert!(out.contains("\"TLS\": true"), "{out}");
    let from_server = relay.join().expect("relay thread");
    let records = server_records(&from_server);
    let after_ccs: Vec<&Record> = records
        .iter()
        .skip_while(|record| record.kind != CONTENT_CHANGE_CIPHER_SPEC)
        .skip(1)
        .collect();
    let nonces: Vec<u64> = after_ccs
        .iter()
        .map(|record| record.explicit_nonce())
        .collect();
    let kinds: Vec<u8> = after_ccs.iter().map(|record| record.kind).collect();
    assert!(
        kinds.len() >= 3
            && kinds[0] == CONTENT_HANDSHAKE
            && kinds[1..]
                .iter()
                .all(|&kind| kind == CONTENT_APPLICATION_DATA),
        "{export}: record types after ChangeCipherSpec {kinds:?}"
    );
    let (finished, kernel) = (nonces[0], &nonces[1..]);
    assert!(
        !kernel.contains(&finished),
        "{export}: nonce reused: {nonces:x?}"
    );
    assert!(
        kernel
            .windows(2)
            .all(|pair| pair[1] == pair[0].wrapping_add(1)),
        "{export}: kernel nonces not consecutive: {nonces:x?}"
    );
    assert_eq!(
        kernel[0],
        finished ^ (1 << 63),
        "{export}: first kernel nonce vs the Finished record's: {nonces:x?}"
    );
    eprintln!(
        "{export}: Finished nonce {finished:#018x}, {} kernel records from {:#018x}",
        kernel.len(),
        kernel[0]
    );
}

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
/// What a newstyle server sends before TLS: the greeting (NBDMAGIC, IHAVEOPT, 16-bit flags)
/// and the 20-byte ACK of NBD_OPT_STARTTLS.
const PLAINTEXT_PREFIX_BYTES: usize = 18 + 20;

/// One TLS record as sent.
struct Record {
    kind: u8,
    body: Vec<u8>,
}

impl Record {
    fn explicit_nonce(&self) -> u64 {
        let prefix: [u8; 8] = self.body[..8].try_into().expect("an AEAD record");
        u64::from_be_bytes(prefix)
    }
}

/// The TLS records in a server-to-client byte stream of one NBD connection.
fn server_records(stream: &[u8]) -> Vec<Record> {
    assert!(
        stream.len() > PLAINTEXT_PREFIX_BYTES && stream.starts_with(b"NBDMAGIC"),
        "not an NBD server stream ({} bytes)",
        stream.len()
    );
    let mut records = Vec::new();
    let mut rest = &stream[PLAINTEXT_PREFIX_BYTES..];
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!(
            rest.len() >= 5 + len,
            "truncated record in the server stream"
        );
        records.push(Record {
            kind: rest[0],
            body: rest[5..5 + len].to_vec(),
        });
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes after the last record");
    records
}

/// A relay on 127.0.0.1 for one connection to `port`; the thread returns what the server sent.
fn relay_once(port: u16) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let relay_port = listener.local_addr().expect("relay address").port();
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let mut client = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("no client came to the relay: {error}"),
            }
        };
        client.set_nonblocking(false).expect("blocking client");
        let mut server = TcpStream::connect(("127.0.0.1", port)).expect("connect to the guest");
        for stream in [&client, &server] {
            stream
                .set_read_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
        }
        let (mut client_in, mut server_out) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let upstream = std::thread::spawn(move || {
            let _ = std::io::copy(&mut client_in, &mut server_out);
            let _ = server_out.shutdown(Shutdown::Write);
        });
        let mut recorded = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = server.read(&mut buf) {
            if n == 0 || client.write_all(&buf[..n]).is_err() {
                break;
            }
            recorded.extend_from_slice(&buf[..n]);
        }
        let _ = client.shutdown(Shutdown::Write);
        upstream.join().expect("upstream relay");
        recorded
    });
    (relay_port, handle)
}

/// `len` random bytes into the export and back out with nbdcopy; the SHA-256 must match.
/// `priority` is a GnuTLS system priority file for the client.
fn nbdcopy_round_trip(uri: &str, len: u64, priority: Option<&Path>, scratch: &Path) {
    let (source, copy) = (scratch.join("source.raw"), scratch.join("copy.raw"));
    random_file(&source, len);
    for (from, to) in [
        (source.as_os_str(), uri.as_ref()),
        (uri.as_ref(), copy.as_os_str()),
    ] {
        let mut cmd = Command::new("nbdcopy");
        cmd.arg(from).arg(to);
        if let Some(priority) = priority {
            cmd.env("GNUTLS_SYSTEM_PRIORITY_FILE", priority);
        }
        run(&mut cmd, CLIENT_TIMEOUT).ok();
    }
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&source),
        "data changed over {uri}"
    );
    fs::remove_file(&copy).expect("remove copy");
}

/// Tells the guest the host is done (its `nc -l` answers "stopping"). qemu accepts on the host
/// side even before the guest listens, so an empty answer is retried (bounded).
fn stop_guest(port: u16) {
    for _ in 0..50 {
        let mut text = String::new();
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("set_read_timeout");
            let _ = stream.read_to_string(&mut text);
        }
        if text.contains("stopping") {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the guest's control listener on 127.0.0.1:{port} never answered");
}

/// One TLS connection as a server logged it (lines with the same `peer=`, in order).
#[derive(Debug, Default, Clone)]
struct Conn {
    peer: String,
    /// `TLS established`: the session summary.
    tls: Option<String>,
    /// `kernel TLS on`: the summary after the switch.
    kernel: Option<String>,
    /// `kernel TLS declined`: the reason.
    declined: Option<String>,
    /// `client connected`: the export.
    export: Option<String>,
    /// `connection closed`: the reason.
    closed: Option<String>,
}

/// The value of `key=` in a log line: up to the next space, or (for the last field, `tls=`)
/// the rest of the line.
fn field<'a>(line: &'a str, key: &str, rest_of_line: bool) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = &line[at..];
    Some(if rest_of_line {
        value.trim_end()
    } else {
        value.split_whitespace().next().unwrap_or("")
    })
}

/// The connections in the lines of `serial` that start with `prefix`.
fn connections(serial: &str, prefix: &str) -> Vec<Conn> {
    let mut conns: Vec<Conn> = Vec::new();
    let mut open = BTreeMap::<String, usize>::new();
    for line in serial.lines().filter_map(|line| line.strip_prefix(prefix)) {
        let Some(peer) = field(line, "peer", false) else {
            continue;
        };
        if line.contains(" TLS established ") {
            open.insert(peer.to_string(), conns.len());
            conns.push(Conn {
                peer: peer.to_string(),
                tls: field(line, "tls", true).map(str::to_string),
                ..Conn::default()
            });
            continue;
        }
        let Some(&index) = open.get(peer) else {
            continue;
        };
        let conn = &mut conns[index];
        if line.contains(" kernel TLS on ") {
            conn.kernel = field(line, "tls", true).map(str::to_string);
        } else if line.contains(" kernel TLS declined") {
            conn.declined = field(line, "reason", true).map(str::to_string);
        } else if line.contains(" client connected ") {
            conn.export = field(line, "export", false).map(str::to_string);
        } else if line.contains(" connection closed ") {
            conn.closed = field(line, "reason", true).map(|r| r.trim_matches('"').to_string());
            open.remove(peer);
        }
    }
    conns
}

/// "TLS1.3 TLS13_AES_256_GCM_SHA384 x509 ..." -> "TLS1.3 TLS13_AES_256_GCM_SHA384".
fn suite_of(summary: &str) -> &str {
    let mut words = summary.match_indices(' ');
    match words.nth(1) {
        Some((end, _)) => &summary[..end],
        None => summary,
    }
}

fn the_export_suite(export: &str) -> &'static str {
    FORCED
        .iter()
        .find(|forced| forced.export == export)
        .map_or(DEFAULT_SUITE, |forced| forced.suite)
}

/// Every connection of the `auto` server switched to kernel TLS with the suite its client
/// forced, and closed cleanly. Returns how many switched.
fn check_auto_log(auto: &[Conn], out: &GuestOutput) -> u64 {
    let context = || format!("{auto:#?}\n===== serial =====\n{}", out.serial);
    assert!(
        !auto.is_empty(),
        "no TLS connection in the auto log: {}",
        context()
    );
    let mut exports = BTreeMap::<&str, usize>::new();
    let mut notify = Vec::new();
    for conn in auto {
        let tls = conn.tls.as_deref().expect("established");
        assert_eq!(
            conn.kernel.as_deref(),
            Some(format!("{tls} kTLS").as_str()),
            "connection {} did not switch to kernel TLS: {}",
            conn.peer,
            context()
        );
        assert!(
            tls.contains("x509 CN=ktls-client"),
            "client certificate identity missing: {tls}"
        );
        let closed = conn.closed.as_deref();
        // nbdinfo and nbdcopy may open connections that end before NBD_OPT_GO (listing).
        match conn.export.as_deref() {
            Some("notify") => {
                notify.push((suite_of(tls).split(' ').next().unwrap_or(""), closed));
                continue;
            }
            Some(export) => {
                *exports.entry(export).or_default() += 1;
                assert_eq!(
                    suite_of(tls),
                    the_export_suite(export),
                    "export {export}: {}",
                    context()
                );
            }
            None => {}
        }
        assert_eq!(
            closed,
            Some("client disconnected"),
            "connection {} did not end cleanly: {}",
            conn.peer,
            context()
        );
    }
    let mut expected = vec!["info", "copy", "py"];
    expected.extend(FORCED.iter().map(|forced| forced.export));
    for export in expected {
        assert!(
            exports.contains_key(export),
            "no connection to {export}: {}",
            context()
        );
    }
    // ktls_io.py holds three connections, one of which disconnects while another works.
    assert!(exports["py"] >= 3, "py connections: {}", context());
    // ktls_close_notify.py: K (DISC, then close_notify), then close_notify alone over TLS 1.3
    // and TLS 1.2, which the kernel turns into EIO on the server's receive.
    assert_eq!(
        notify,
        [
            ("TLS1.3", Some("client disconnected")),
            ("TLS1.3", Some(KTLS_CLOSE_NOTIFY_REASON)),
            ("TLS1.2", Some(KTLS_CLOSE_NOTIFY_REASON)),
        ],
        "close_notify connections: {}",
        context()
    );
    auto.len() as u64
}

/// The `off` server never tried the kernel, and served over user-space TLS.
fn check_off_log(off: &[Conn], out: &GuestOutput) {
    assert!(
        !off.is_empty(),
        "no TLS connection in the off log:\n{}",
        out.serial
    );
    for conn in off {
        assert!(
            conn.kernel.is_none() && conn.declined.is_none(),
            "--tls-kernel off tried the kernel: {conn:?}"
        );
        assert_eq!(
            conn.closed.as_deref(),
            Some("client disconnected"),
            "{conn:?}"
        );
    }
    assert!(
        off.iter().any(|conn| conn.export.as_deref() == Some("off")),
        "{off:#?}"
    );
    assert!(
        !out.serial
            .lines()
            .any(|line| line.starts_with("OFF| ") && line.contains("kernel TLS")),
        "the off server logged about kernel TLS:\n{}",
        out.serial
    );
}

/// `/proc/net/tls_stat` before (`STAT0| `) and after (`STAT1| `).
fn tls_stat(serial: &str, prefix: &str) -> BTreeMap<String, u64> {
    serial
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.parse().ok()?))
        })
        .collect()
}

fn check_kernel_counters(out: &GuestOutput, with_kernel: u64) {
    let before = tls_stat(&out.serial, "STAT0| ");
    let after = tls_stat(&out.serial, "STAT1| ");
    let delta = |name: &str| {
        let value = |stats: &BTreeMap<String, u64>| {
            *stats
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in /proc/net/tls_stat:\n{}", out.serial))
        };
        value(&after) - value(&before)
    };
    let context = format!("before {before:?}\nafter {after:?}");
    assert_eq!(
        delta("TlsTxSw"),
        with_kernel + PROBED_PAIRS,
        "kTLS transmit contexts: {context}"
    );
    assert_eq!(
        delta("TlsRxSw"),
        with_kernel + PROBED_PAIRS,
        "kTLS receive contexts: {context}"
    );
    assert_eq!(
        delta("TlsDecryptError"),
        0,
        "records failed to decrypt: {context}"
    );
    assert_eq!(after["TlsCurrTxSw"], 0, "kTLS sockets left open: {context}");
    assert_eq!(after["TlsCurrRxSw"], 0, "kTLS sockets left open: {context}");
}

#[test]
fn log_lines_group_into_connections() {
    let serial = "AUTO| t  INFO ringbd::shard::tls: TLS established shard=0 peer=10.0.2.2:5 \
                  tls=TLS1.3 TLS13_AES_256_GCM_SHA384 x509 CN=a\r\n\
                  AUTO| t  INFO ringbd::shard::tls: kernel TLS on shard=0 peer=10.0.2.2:5 \
                  tls=TLS1.3 TLS13_AES_256_GCM_SHA384 x509 CN=a kTLS\n\
                  OFF| t  INFO ringbd::shard::tls: TLS established shard=0 peer=10.0.2.2:5 \
                  tls=TLS1.2 X\n\
                  AUTO| t  INFO ringbd::shard: client connected shard=0 peer=10.0.2.2:5 \
                  export=copy style=Structured tls=true\n\
                  AUTO| t  INFO ringbd::shard: connection closed shard=0 peer=10.0.2.2:5 \
                  reason=\"client disconnected\"\n";
    let auto = connections(serial, "AUTO| ");
    assert_eq!(auto.len(), 1);
    assert_eq!(
        auto[0].tls.as_deref(),
        Some("TLS1.3 TLS13_AES_256_GCM_SHA384 x509 CN=a")
    );
    assert_eq!(
        auto[0].kernel.as_deref(),
        Some("TLS1.3 TLS13_AES_256_GCM_SHA384 x509 CN=a kTLS")
    );
    assert_eq!(auto[0].export.as_deref(), Some("copy"));
    assert_eq!(auto[0].closed.as_deref(), Some("client disconnected"));
    assert_eq!(suite_of(auto[0].tls.as_deref().unwrap()), DEFAULT_SUITE);
    let off = connections(serial, "OFF| ");
    assert_eq!(off.len(), 1);
    assert!(off[0].kernel.is_none());
}
