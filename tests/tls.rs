//! TLS with real, independent clients: libnbd (`nbdinfo`, `nbdcopy`, python3-libnbd) and qemu
//! (`qemu-img` with `tls-creds-x509` / `tls-creds-psk`), credentials made by gnutls' `certtool`
//! and `psktool`, and a raw client that misbehaves during the TLS handshake.
//!
//! Every server listens on `127.0.0.1` (the certificates name it, and gnutls clients check the
//! name they dialled). `RINGBD_TEST_SERVER=nbdkit` runs the scenarios nbdkit can express
//! against nbdkit instead, to check the tests themselves (see `tests/common/tls.rs`).

mod common;

use std::io::{ErrorKind, Read};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::raw::*;
use common::tls::*;
use common::*;

const MIB: u64 = 1 << 20;
const EXPORT_BYTES: u64 = 64 * MIB;
/// How long a raw client waits for the server to close a connection it should drop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

fn require_tls_tools(extra: &[&str]) -> bool {
    require_tools(&CREDENTIAL_TOOLS) && require_tools(extra)
}

/// CA "ca-a", a server certificate and a client certificate (CN `client-good`) from it.
struct X509Fixture {
    dir: tempfile::TempDir,
    ca: Ca,
    server: ServerCreds,
    client: std::path::PathBuf,
}

fn x509_fixture() -> X509Fixture {
    let dir = tempdir();
    let ca = Ca::new(dir.path(), "ca-a");
    let server = ca.server(dir.path(), "server");
    let client = ca.client(dir.path(), "client", Subject::cn("client-good"), &ca);
    X509Fixture {
        dir,
        ca,
        server,
        client,
    }
}

/// `DIR/keys.psk` with `users`, the layout qemu's `tls-creds-psk` wants.
fn psk_dir(root: &Path, name: &str, users: &[&str]) -> std::path::PathBuf {
    let dir = root.join(name);
    for user in users {
        psk_user(&dir.join("keys.psk"), user);
    }
    dir
}

#[test]
fn x509_nbdinfo_and_qemu_img_see_the_export() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let fx = x509_fixture();
    let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"]).start();
    let out = nbdinfo(&["--json"], &server.x509_uri("disk", &fx.client));
    assert_nbdinfo_tls_size(out, EXPORT_BYTES);
    assert_qemu_size(server.qemu_img_info_x509("disk", &fx.client), EXPORT_BYTES);
    // Without --tls-ca the server asks for no client certificate: a client with none works.
    let anonymous = trust_dir(fx.dir.path(), "anonymous", &fx.ca);
    let out = nbdinfo(&["--json"], &server.x509_uri("disk", &anonymous));
    assert_nbdinfo_tls_size(out, EXPORT_BYTES);
    assert_qemu_size(server.qemu_img_info_x509("disk", &anonymous), EXPORT_BYTES);
    server.assert_running();
}

#[test]
fn psk_nbdinfo_and_qemu_img_see_the_export() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = tempdir();
    let keys = psk_dir(dir.path(), "psk", &["alice"]);
    let mut server = TlsSpec::psk(
        TlsMode::Require,
        &keys.join("keys.psk"),
        &["disk=memory:64M"],
    )
    .start();
    let uri = server.psk_uri("disk", "alice", &keys.join("keys.psk"));
    assert_nbdinfo_tls_size(nbdinfo(&["--json"], &uri), EXPORT_BYTES);
    assert_qemu_size(
        server.qemu_img_info_psk("disk", &keys, "alice"),
        EXPORT_BYTES,
    );
    server.assert_running();
}

#[test]
fn plaintext_clients_are_refused_when_tls_is_required() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let fx = x509_fixture();
    let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"]).start();
    let out = nbdinfo(&["--size"], &server.plain_uri("disk"));
    assert_refused(&out, &[LIBNBD_TLS_REQUIRED]);
    let out = server.qemu_img_info("disk", None);
    assert_refused(&out, &[QEMU_TLS_REQUIRED]);
    // On the wire: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD, and the
    // connection stays usable for the next option.
    let mut client = RawClient::handshake(server.address()).expect("plaintext handshake");
    for (option, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_INFO, info_payload("disk", &[])),
        (OPT_GO, info_payload("disk", &[])),
        (
            OPT_LIST_META_CONTEXT,
            meta_payload("disk", &["base:allocation"]),
        ),
    ] {
        let reply = client.option(option, &data).expect("option reply");
        assert_eq!(
            reply.reply_type, REP_ERR_TLS_REQD,
            "option {option} before STARTTLS: {reply:?}"
        );
    }
    let reply = client.option(OPT_STARTTLS, &[]).expect("STARTTLS reply");
    assert_eq!(reply.reply_type, REP_ACK, "STARTTLS: {reply:?}");
    drop(client);
    // NBD_OPT_EXPORT_NAME cannot be answered with an error: the server must hang up.
    let mut client = RawClient::handshake(server.address()).expect("plaintext handshake");
    client
        .send_option(OPT_EXPORT_NAME, b"disk")
        .expect("send EXPORT_NAME");
    assert_closed(&mut client.stream, "NBD_OPT_EXPORT_NAME before TLS");
    server.assert_running();
    assert_nbdinfo_tls_size(
        nbdinfo(&["--json"], &server.x509_uri("disk", &fx.client)),
        EXPORT_BYTES,
    );
}

#[test]
fn client_certificates_are_required_and_verified_with_tls_ca() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let fx = x509_fixture();
    let root = fx.dir.path();
    let rogue_ca = Ca::new(root, "ca-rogue");
    // Trusts the real server, but presents a certificate from another CA.
    let rogue = rogue_ca.client(root, "rogue", Subject::cn("client-good"), &fx.ca);
    let anonymous = trust_dir(root, "anonymous", &fx.ca);
    let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"])
        .verify_clients()
        .start();
    let good = server.x509_uri("disk", &fx.client);
    assert_nbdinfo_tls_size(nbdinfo(&["--json"], &good), EXPORT_BYTES);
    assert_qemu_size(server.qemu_img_info_x509("disk", &fx.client), EXPORT_BYTES);

    // The handshake fails (TLS 1.3 may report it on the first record after the client's
    // Finished), so only the failure is asserted, not gnutls' wording.
    assert_refused(
        &nbdinfo(&["--size"], &server.x509_uri("disk", &anonymous)),
        &[],
    );
    assert_refused(&server.qemu_img_info_x509("disk", &anonymous), &[]);
    // qemu checks its own certificate against its ca-cert.pem before connecting, so only
    // libnbd can present a certificate the server does not trust.
    assert_refused(&nbdinfo(&["--size"], &server.x509_uri("disk", &rogue)), &[]);

    server.assert_running();
    assert_nbdinfo_tls_size(nbdinfo(&["--json"], &good), EXPORT_BYTES);
}

#[test]
fn a_wrong_psk_or_an_unknown_psk_identity_is_refused() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = tempdir();
    let keys = psk_dir(dir.path(), "psk", &["alice", "bob"]);
    // Same identity, another key.
    let wrong = psk_dir(dir.path(), "wrong", &["alice"]);
    // An identity the server does not know.
    let stranger = psk_dir(dir.path(), "stranger", &["carol"]);
    let mut server = TlsSpec::psk(
        TlsMode::Require,
        &keys.join("keys.psk"),
        &["disk=memory:64M"],
    )
    .start();
    let psk = |dir: &Path, user| server.psk_uri("disk", user, &dir.join("keys.psk"));

    assert_refused(&nbdinfo(&["--size"], &psk(&wrong, "alice")), &[]);
    assert_refused(&server.qemu_img_info_psk("disk", &wrong, "alice"), &[]);
    assert_refused(&nbdinfo(&["--size"], &psk(&stranger, "carol")), &[]);
    assert_refused(&server.qemu_img_info_psk("disk", &stranger, "carol"), &[]);

    for user in ["alice", "bob"] {
        assert_nbdinfo_tls_size(nbdinfo(&["--json"], &psk(&keys, user)), EXPORT_BYTES);
    }
    server.assert_running();
}

/// 64 MiB of random data into the export and back out with nbdcopy (several connections,
/// each its own TLS session); the SHA-256 must match.
fn nbdcopy_round_trip(uri: &str, scratch: &Path) {
    let (source, copy) = (scratch.join("source.raw"), scratch.join("copy.raw"));
    random_file(&source, EXPORT_BYTES);
    run(
        Command::new("nbdcopy").arg(&source).arg(uri),
        Duration::from_secs(300),
    )
    .ok();
    run(
        Command::new("nbdcopy").arg(uri).arg(&copy),
        Duration::from_secs(300),
    )
    .ok();
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&source),
        "data changed over TLS ({uri})"
    );
}

#[test]
fn nbdcopy_round_trip_over_x509_with_and_without_kernel_tls() {
    if !require_tls_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let fx = x509_fixture();
    for kernel in ["auto", "off"] {
        let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"])
            .tuning(&["--tls-kernel", kernel])
            .start();
        let scratch = tempdir();
        nbdcopy_round_trip(&server.x509_uri("disk", &fx.client), scratch.path());
        server.assert_running();
    }
}

#[test]
fn nbdcopy_round_trip_over_psk() {
    if !require_tls_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let dir = tempdir();
    let keys = psk_dir(dir.path(), "psk", &["alice"]);
    let mut server = TlsSpec::psk(
        TlsMode::Require,
        &keys.join("keys.psk"),
        &["disk=memory:64M"],
    )
    .start();
    nbdcopy_round_trip(
        &server.psk_uri("disk", "alice", &keys.join("keys.psk")),
        dir.path(),
    );
    server.assert_running();
}

#[test]
fn tls_only_export_is_hidden_from_plaintext_clients_and_served_over_tls() {
    if !require_tls_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let fx = x509_fixture();
    let config = fx.dir.path().join("ringbd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls = \"on\"\ntls_cert = {:?}\ntls_key = {:?}\n\n\
             [[export]]\nname = \"public\"\npath = \"memory:16M\"\n\n\
             [[export]]\nname = \"secret\"\npath = \"memory:32M\"\ntls_only = true\n",
            fx.server.cert.to_str().unwrap(),
            fx.server.key.to_str().unwrap(),
        ),
    )
    .unwrap();
    let mut server = TcpServer::ringbd(ServerSpec {
        options: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    });

    // Plaintext: only "public" is listed and served; "secret" asks for TLS.
    let listed = nbdinfo(&["--list", "--json"], &server.plain_uri("")).ok();
    assert_eq!(json_strings(&listed, "export-name"), ["public"], "{listed}");
    let public = nbdinfo(&["--size"], &server.plain_uri("public")).ok();
    assert_eq!(public.trim(), (16 * MIB).to_string());
    let out = nbdinfo(&["--size"], &server.plain_uri("secret"));
    assert_refused(&out, &[LIBNBD_TLS_REQUIRED]);
    assert_refused(&server.qemu_img_info("secret", None), &[QEMU_TLS_REQUIRED]);
    let mut raw = RawClient::handshake(server.address()).expect("plaintext handshake");
    assert_eq!(raw.list().expect("LIST"), ["public"]);
    let refused = raw.go("secret", &[]).expect("GO reply");
    let reply = refused.expect_err("GO on a TLS-only export without TLS must fail");
    assert_eq!(reply.reply_type, REP_ERR_TLS_REQD, "{reply:?}");

    // Over TLS: both are listed and served.
    let listed = nbdinfo(&["--list", "--json"], &server.x509_uri("", &fx.client)).ok();
    let mut names = json_strings(&listed, "export-name");
    names.sort_unstable();
    assert_eq!(names, ["public", "secret"], "{listed}");
    assert_nbdinfo_tls_size(
        nbdinfo(&["--json"], &server.x509_uri("secret", &fx.client)),
        32 * MIB,
    );
    assert_qemu_size(server.qemu_img_info_x509("secret", &fx.client), 32 * MIB);
    server.assert_running();
}

/// Reads until the peer closes (EOF or reset); panics if it is still open after
/// [`CLOSE_TIMEOUT`]. Alerts or other bytes before the close are fine.
fn assert_closed(stream: &mut Stream, what: &str) {
    if let Stream::Tcp(tcp) = stream {
        tcp.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    }
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                total += n;
                assert!(total < 1 << 20, "{what}: the server keeps sending");
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return;
            }
            Err(e) => panic!("{what}: the server did not close the connection: {e}"),
        }
    }
}

/// A plaintext NBD handshake up to an acknowledged STARTTLS: the next bytes are TLS.
fn starttls(server: &TcpServer) -> RawClient {
    let mut client = RawClient::handshake(server.address()).expect("NBD handshake");
    let reply = client.option(OPT_STARTTLS, &[]).expect("STARTTLS reply");
    assert_eq!(reply.reply_type, REP_ACK, "STARTTLS: {reply:?}");
    client
}

/// A TLS 1.3 ClientHello record as a real client would start it (the server never sees enough
/// of it to care about the rest): record header, handshake header, version, random, empty
/// session id, three suites, null compression, then `extensions_bytes` of extension data.
fn client_hello_record(extensions_bytes: usize) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    body.push(0); // session id
    body.extend([0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend([0x01, 0x00]); // compression: null
    body.extend((extensions_bytes as u16).to_be_bytes());
    body.extend((0..extensions_bytes).map(|i| i as u8));
    let mut handshake = vec![0x01];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[test]
fn garbage_and_truncated_tls_handshakes_neither_crash_nor_block_the_server() {
    if !require_tls_tools(&["nbdinfo"]) {
        return;
    }
    let fx = x509_fixture();
    // One shard: the misbehaving connections share the thread of the good client.
    let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"])
        .tuning(&["--shards", "1"])
        .start();
    let good = server.x509_uri("disk", &fx.client);

    // (a) Not TLS at all: the server must give up on the connection.
    let mut garbage = starttls(&server);
    garbage.write_all(&b"GARBAGE!".repeat(64)).unwrap();
    assert_closed(&mut garbage.stream, "garbage instead of a ClientHello");

    // (a') A well-framed handshake record whose content is nonsense.
    let mut nonsense = starttls(&server);
    let mut record = client_hello_record(200);
    for byte in record.iter_mut().skip(9) {
        *byte ^= 0xa5;
    }
    nonsense.write_all(&record).unwrap();
    assert_closed(&mut nonsense.stream, "a scrambled ClientHello");

    // (b) Half a ClientHello, then silence: the connection stays open while another TLS
    // client is served on the same shard.
    let record = client_hello_record(300);
    let mut stalled = starttls(&server);
    stalled.write_all(&record[..record.len() / 2]).unwrap();

    // (c) Half a ClientHello, then a hang-up; and a hang-up right after the STARTTLS ACK.
    let mut vanished = starttls(&server);
    vanished.write_all(&record[..record.len() / 2]).unwrap();
    drop(vanished);
    drop(starttls(&server));

    assert_nbdinfo_tls_size(nbdinfo(&["--json"], &good), EXPORT_BYTES);
    server.assert_running();
    drop(stalled);
    server.assert_running();
    assert_nbdinfo_tls_size(nbdinfo(&["--json"], &good), EXPORT_BYTES);
}

#[test]
fn a_stalled_tls_handshake_is_closed_by_the_handshake_timeout() {
    if !require_tls_tools(&["nbdinfo"]) {
        return;
    }
    let fx = x509_fixture();
    let mut server = TlsSpec::x509(TlsMode::Require, &fx.server, &["disk=memory:64M"])
        .options(&["--handshake-timeout-seconds", "2"])
        .tuning(&["--shards", "1"])
        .start();
    let record = client_hello_record(300);
    let mut stalled = starttls(&server);
    stalled.write_all(&record[..record.len() / 2]).unwrap();
    assert_nbdinfo_tls_size(
        nbdinfo(&["--json"], &server.x509_uri("disk", &fx.client)),
        EXPORT_BYTES,
    );
    // The deadline covers the TLS handshake, not only the NBD options.
    assert_closed(
        &mut stalled.stream,
        "a ClientHello stalled past the timeout",
    );
    server.assert_running();
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    if !require_tls_tools(&[]) || !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let root = dir.path();
    let (ca_a, ca_b) = (Ca::new(root, "ca-a"), Ca::new(root, "ca-b"));
    let (set_a, set_b) = (ca_a.server(root, "server-a"), ca_b.server(root, "server-b"));
    let client_a = ca_a.client(root, "client-a", Subject::cn("client-a"), &ca_a);
    let client_b = ca_b.client(root, "client-b", Subject::cn("client-b"), &ca_b);
    // Trusts the new server certificate but presents a certificate from the old CA: it works
    // only if the server did not reload its client CA.
    let client_mixed = ca_a.client(root, "client-mixed", Subject::cn("client-a"), &ca_b);
    // The files the server reads; they start as set A.
    let live = root.join("live");
    std::fs::create_dir_all(&live).unwrap();
    for name in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
        std::fs::copy(set_a.dir.join(name), live.join(name)).unwrap();
    }
    let live_creds = ServerCreds {
        dir: live.clone(),
        cert: live.join("server-cert.pem"),
        key: live.join("server-key.pem"),
        ca: live.join("ca-cert.pem"),
    };
    assert_eq!(peer(), Peer::Ringbd, "nbdkit does not reload certificates");
    let mut server = TlsSpec::x509(TlsMode::Require, &live_creds, &["disk=memory:64M"])
        .verify_clients()
        .start();
    let swaps: Vec<String> = ["server-cert.pem", "server-key.pem", "ca-cert.pem"]
        .iter()
        .map(|name| {
            format!(
                "{}={}",
                set_b.dir.join(name).display(),
                live.join(name).display()
            )
        })
        .collect();
    let (port, pid) = (server.port().to_string(), server.pid().to_string());
    let mut args = vec![
        "127.0.0.1",
        &port,
        "disk",
        &pid,
        client_a.to_str().unwrap(),
        client_b.to_str().unwrap(),
        client_mixed.to_str().unwrap(),
    ];
    args.extend(swaps.iter().map(String::as_str));
    let out = python("tls_reload.py", &args, Duration::from_secs(120));
    assert!(out.contains("tls reload ok"), "{out}");
    server.assert_running();
}
