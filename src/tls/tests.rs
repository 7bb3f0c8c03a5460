//! In-memory tests: rustls and OpenSSL clients against [`TlsSession`], bytes moved by hand in
//! arbitrary chunks.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;
use crate::ring::ktls::{self, KtlsSupport};

/// A CA, a server certificate for `localhost`, a client certificate `CN=alice` from the CA
/// and one from an unrelated CA, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    client: (CertificateDer<'static>, Vec<u8>),
    stranger: (CertificateDer<'static>, Vec<u8>),
}

fn ca(name: &str) -> (CertificateParams, KeyPair, CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap().der().clone();
    (params, key, cert)
}

fn leaf(
    sans: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Example");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap().der().clone();
    (cert, key)
}

fn pem(label: &str, der: &[u8]) -> String {
    pem_encode(label, der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let word = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for index in 0..4 {
            if index <= chunk.len() {
                encoded.push(ALPHABET[((word >> (18 - 6 * index)) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_params, ca_key, ca_cert) = ca("test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let (server, server_key) = leaf(
            &["localhost"],
            "server",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client, client_key) = leaf(
            &["alice.example"],
            "alice",
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let (other_params, other_key, _) = ca("other CA");
        let other = Issuer::new(other_params, other_key);
        let (stranger, stranger_key) =
            leaf(&[], "mallory", ExtendedKeyUsagePurpose::ClientAuth, &other);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", pem("CERTIFICATE", &ca_cert));
        write(
            "server.pem",
            pem("CERTIFICATE", &server) + &pem("CERTIFICATE", &ca_cert),
        );
        write("server.key", server_key.serialize_pem());
        Pki {
            dir,
            ca: ca_cert,
            client: (client, client_key.serialize_der()),
            stranger: (stranger, stranger_key.serialize_der()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn paths(&self, with_ca: bool) -> TlsPaths {
        TlsPaths {
            cert: Some(self.path("server.pem")),
            key: Some(self.path("server.key")),
            ca: with_ca.then(|| self.path("ca.pem")),
            psk: None,
        }
    }

    fn client(
        &self,
        identity: Option<&(CertificateDer<'static>, Vec<u8>)>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConnection {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
        client.set_buffer_limit(None);
        client
    }
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// What the server side received and whether it failed.
#[derive(Default)]
struct ServerEnd {
    plaintext: Vec<u8>,
    pending_in: VecDeque<u8>,
}

/// Moves bytes both ways in chunks of the given sizes until nothing moves; the server's
/// plaintext is collected in `end`. Returns the server's error, if any.
fn pump_rustls(
    client: &mut ClientConnection,
    server: &mut TlsSession,
    end: &mut ServerEnd,
    chunks: &[usize],
) -> Result<(), TlsError> {
    let mut chunk_sizes = chunks.iter().copied().cycle();
    for _ in 0..10_000 {
        let mut moved = false;
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        end.pending_in.extend(wire);
        moved |= feed_some(server, end, &mut chunk_sizes)?;
        let mut buf = vec![0u8; chunk_sizes.next().unwrap_or(4096).max(1)];
        let n = server.write_ciphertext(&mut buf);
        if n > 0 {
            moved = true;
            let mut slice = &buf[..n];
            while !slice.is_empty() {
                client.read_tls(&mut slice).unwrap();
                client
                    .process_new_packets()
                    .map_err(|error| TlsError::Protocol(format!("client: {error}")))?;
            }
        }
        if !moved {
            return Ok(());
        }
    }
    panic!("pump did not settle");
}

fn feed_some(
    server: &mut TlsSession,
    end: &mut ServerEnd,
    chunk_sizes: &mut impl Iterator<Item = usize>,
) -> Result<bool, TlsError> {
    let mut moved = false;
    loop {
        let mut progress = false;
        if !end.pending_in.is_empty() {
            let size = chunk_sizes
                .next()
                .unwrap_or(4096)
                .max(1)
                .min(end.pending_in.len());
            let chunk: Vec<u8> = end.pending_in.iter().take(size).copied().collect();
            let consumed = server.feed(&chunk)?;
            assert!(consumed <= chunk.len());
            end.pending_in.drain(..consumed);
            progress |= consumed > 0;
        }
        let mut out = [0u8; 3000];
        loop {
            let n = server.read_plaintext(&mut out)?;
            if n == 0 {
                break;
            }
            end.plaintext.extend_from_slice(&out[..n]);
            progress = true;
        }
        moved |= progress;
        if !progress {
            return Ok(moved);
        }
    }
}

fn client_read_all(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => panic!("client read: {error}"),
        }
    }
    out
}

/// Sends `data` from the server to the client; returns what the client decrypted.
fn server_write_all(
    server: &mut TlsSession,
    mut data: &[u8],
    client: &mut ClientConnection,
) -> Vec<u8> {
    let mut received = Vec::new();
    while !data.is_empty() {
        let accepted = server.write_plaintext(data).unwrap();
        data = &data[accepted..];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server.write_ciphertext(&mut buf);
            if n == 0 {
                break;
            }
            let mut slice = &buf[..n];
            while !slice.is_empty() {
                client.read_tls(&mut slice).unwrap();
                client.process_new_packets().unwrap();
                received.extend(client_read_all(client));
            }
        }
    }
    received
}

fn handshake(
    pki: &Pki,
    with_ca: bool,
    client_identity: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (ClientConnection, TlsSession, ServerEnd) {
    let context = TlsContext::load(&pki.paths(with_ca)).unwrap();
    let mut server = context.session().unwrap();
    let mut client = pki.client(client_identity.then_some(&pki.client), versions);
    let mut end = ServerEnd::default();
    pump_rustls(&mut client, &mut server, &mut end, &[4096]).unwrap();
    assert!(!server.is_handshaking());
    assert!(!client.is_handshaking());
    (client, server, end)
}

#[test]
fn x509_handshake_and_data_both_ways() {
    let pki = Pki::new();
    for versions in [BOTH, TLS12_ONLY] {
        let (mut client, mut server, mut end) = handshake(&pki, false, false, versions);
        let expected_version = if versions.len() == 2 {
            "TLS1.3"
        } else {
            "TLS1.2"
        };
        assert!(
            server.summary().starts_with(expected_version),
            "{}",
            server.summary()
        );
        assert!(server.summary().ends_with("x509 (no client certificate)"));
        assert_eq!(server.identity(), None);

        let upload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        client.writer().write_all(&upload).unwrap();
        pump_rustls(&mut client, &mut server, &mut end, &[1, 7, 300, 5000, 17]).unwrap();
        assert_eq!(end.plaintext, upload);

        let download: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        assert_eq!(
            server_write_all(&mut server, &download, &mut client),
            download
        );

        client.send_close_notify();
        pump_rustls(&mut client, &mut server, &mut end, &[3]).unwrap();
        assert!(server.peer_closed());
        server.send_close_notify();
        assert!(server.wants_write());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn any_chunking_delivers_the_same_bytes(
        chunks in proptest::collection::vec(1usize..20_000, 1..8),
        data in proptest::collection::vec(any::<u8>(), 0..50_000),
    ) {
        let pki = shared_pki();
        let context = TlsContext::load(&pki.paths(true)).unwrap();
        let mut server = context.session().unwrap();
        let mut client = pki.client(Some(&pki.client), BOTH);
        let mut end = ServerEnd::default();
        client.writer().write_all(&data).unwrap();
        pump_rustls(&mut client, &mut server, &mut end, &chunks).unwrap();
        prop_assert_eq!(&end.plaintext, &data);
        prop_assert!(server.identity().is_some_and(|id| matches(id, "CN=alice")));
    }
}

/// Whether `identity` matches the `allow_clients` pattern `text`.
fn matches(identity: &super::Identity, text: &str) -> bool {
    use crate::access::{ClientIdentity, ClientPattern};
    identity.matches(&ClientPattern::parse(text).unwrap())
}

fn shared_pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(Pki::new)
}

#[test]
fn client_certificates_are_verified_and_identified() {
    let pki = Pki::new();
    let (_client, server, _) = handshake(&pki, true, true, BOTH);
    let identity = server.identity().expect("client identity");
    assert_eq!(identity.subject.as_deref(), Some("CN=alice,O=Example"));
    assert_eq!(identity.sans, ["DNS:alice.example"]);
    assert!(matches(identity, "CN=alice"));
    assert!(matches(identity, "CN=alice,O=Example"));
    assert!(matches(identity, "DNS:alice.example"));
    assert!(!matches(identity, "CN=bob"));
    assert!(
        server.summary().ends_with("x509 CN=alice,O=Example"),
        "{}",
        server.summary()
    );
    let context = TlsContext::load(&pki.paths(true)).unwrap();
    assert!(context.authenticates_clients());
    assert!(
        context.describe().contains("client certificates required"),
        "{}",
        context.describe()
    );
}

#[test]
fn missing_or_untrusted_client_certificates_are_refused() {
    let pki = Pki::new();
    let context = TlsContext::load(&pki.paths(true)).unwrap();
    for identity in [None, Some(&pki.stranger)] {
        let mut server = context.session().unwrap();
        let mut client = pki.client(identity, BOTH);
        let mut end = ServerEnd::default();
        let error = pump_rustls(&mut client, &mut server, &mut end, &[4096]).unwrap_err();
        assert!(matches!(error, TlsError::Protocol(_)), "{error}");
        assert!(server.identity().is_none());
    }
}

#[test]
fn garbage_and_oversized_records_are_errors() {
    let pki = shared_pki();
    let context = TlsContext::load(&pki.paths(false)).unwrap();
    let psk_context = psk_context(&[("alice", &[7u8; 32])]).1;
    for context in [&context, &psk_context] {
        // Not TLS at all.
        let mut session = context.session().unwrap();
        assert!(session.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
        // A handshake record announcing more than the protocol allows.
        let mut session = context.session().unwrap();
        assert!(session.feed(&[22, 3, 1, 0xff, 0xff, 1, 0, 0, 0]).is_err());
        // An application-data record before any handshake.
        let mut session = context.session().unwrap();
        assert!(session.feed(&[23, 3, 3, 0, 4, 1, 2, 3, 4]).is_err());
        // A truncated ClientHello is not an error yet: the session waits for more.
        let mut session = context.session().unwrap();
        let mut client = pki.client(None, BOTH);
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let consumed = session.feed(&hello[..hello.len() / 2]).unwrap();
        assert_eq!(consumed, hello.len() / 2);
        assert!(session.is_handshaking());
        let mut out = [0u8; 4096];
        assert_eq!(session.read_plaintext(&mut out).unwrap(), 0);
        // ... and garbage after the truncation is.
        let garbage = [0xffu8; 4096];
        let mut failed = false;
        for _ in 0..32 {
            if session.feed(&garbage).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "garbage after a truncated record must fail");
    }
}

#[test]
fn a_handshake_message_beyond_64k_is_refused() {
    let context = TlsContext::load(&shared_pki().paths(false)).unwrap();
    let mut session = context.session().unwrap();
    // A ClientHello header announcing 1 MiB, then 16 KiB records of filler.
    let mut stream = vec![22, 3, 1, 0x40, 0x00, 1, 0x10, 0x00, 0x00];
    stream.extend(std::iter::repeat_n(0u8, 0x4000 - 4));
    let mut failed = false;
    for _ in 0..100 {
        match session.feed(&stream) {
            Err(_) => {
                failed = true;
                break;
            }
            Ok(_) => stream = [vec![22, 3, 1, 0x40, 0x00], vec![0u8; 0x4000]].concat(),
        }
    }
    assert!(failed);
}

#[test]
fn unread_plaintext_pushes_back_instead_of_growing() {
    let pki = shared_pki();
    let (mut client, mut server, _) = handshake(pki, false, false, BOTH);
    client.writer().write_all(&vec![1u8; 1 << 20]).unwrap();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    let mut offered = &wire[..];
    let mut total = 0;
    loop {
        let consumed = server.feed(offered).unwrap();
        if consumed == 0 {
            break;
        }
        total += consumed;
        offered = &offered[consumed..];
    }
    assert!(
        total < 64 * 1024,
        "fed {total} bytes without reading plaintext"
    );
    // Reading makes room again.
    let mut out = vec![0u8; 1 << 16];
    assert!(server.read_plaintext(&mut out).unwrap() > 0);
    assert!(server.feed(offered).unwrap() > 0);
    // Writing without draining stops at the ceiling.
    let data = vec![2u8; 1 << 20];
    let mut accepted = 0;
    for _ in 0..100 {
        accepted += server.write_plaintext(&data[accepted..]).unwrap();
    }
    assert!(accepted < data.len());
    assert!(accepted <= SEND_BUFFER_BYTES_MAX + 64 * 1024, "{accepted}");
}

#[test]
fn into_kernel_declines_and_keeps_the_session() {
    let pki = shared_pki();
    let context = TlsContext::load(&pki.paths(false)).unwrap();
    // Before the handshake: declined, untouched.
    let session = context.session().unwrap();
    let Err(IntoKernelError::Declined { session, reason }) = session.into_kernel(-1) else {
        panic!("must decline");
    };
    assert!(reason.to_string().contains("handshake"), "{reason}");
    assert!(session.is_handshaking());
    // After the handshake, with ciphertext pending (the close_notify): declined.
    let (mut client, mut server, mut end) = handshake(pki, false, false, BOTH);
    server.send_close_notify();
    let Err(IntoKernelError::Declined { session, reason }) = server.into_kernel(-1) else {
        panic!("must decline");
    };
    assert!(reason.to_string().contains("pending"), "{reason}");
    let mut server = *session;
    pump_rustls(&mut client, &mut server, &mut end, &[4096]).unwrap();
    // A fresh, quiet session on this kernel: declined only if kTLS is unavailable.
    let (mut client, server, mut end) = handshake(pki, false, false, BOTH);
    if let KtlsSupport::Unavailable { reason: why } = ktls::probe() {
        let Err(IntoKernelError::Declined { session, reason }) = server.into_kernel(-1) else {
            panic!("must decline without kernel TLS");
        };
        assert_eq!(reason.to_string(), format!("kernel TLS: {why}"));
        // The session still works.
        let mut server = *session;
        client.writer().write_all(b"still here").unwrap();
        pump_rustls(&mut client, &mut server, &mut end, &[5]).unwrap();
        assert_eq!(end.plaintext, b"still here");
    }
}

// ---- PSK (OpenSSL server, OpenSSL client) ----

fn psk_context(users: &[(&str, &[u8])]) -> (tempfile::TempDir, TlsContext) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for (user, key) in users {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{user}:{hex}\n"));
    }
    let path = dir.path().join("keys.psk");
    std::fs::write(&path, text).unwrap();
    let context = TlsContext::load(&TlsPaths {
        psk: Some(path),
        ..TlsPaths::default()
    })
    .unwrap();
    (dir, context)
}

#[derive(Default)]
struct TestPipe {
    incoming: VecDeque<u8>,
    outgoing: Vec<u8>,
}

impl Read for TestPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.incoming.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.incoming.read(buf)
    }
}

impl Write for TestPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn openssl_client(
    user: &str,
    key: &[u8],
    max_version: openssl::ssl::SslVersion,
) -> openssl::ssl::SslStream<TestPipe> {
    use openssl::ssl::{Ssl, SslContext, SslMethod};
    let mut builder = SslContext::builder(SslMethod::tls_client()).unwrap();
    builder.set_max_proto_version(Some(max_version)).unwrap();
    builder.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
    let (user, key) = (user.to_string(), key.to_vec());
    builder.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
        identity[..user.len()].copy_from_slice(user.as_bytes());
        identity[user.len()] = 0;
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let mut ssl = Ssl::new(&builder.build()).unwrap();
    ssl.set_connect_state();
    openssl::ssl::SslStream::new(ssl, TestPipe::default()).unwrap()
}

/// Runs the PSK handshake plus a message each way; returns the server session on success.
fn psk_exchange(
    context: &TlsContext,
    user: &str,
    key: &[u8],
    max_version: openssl::ssl::SslVersion,
) -> Result<(TlsSession, Vec<u8>), TlsError> {
    let mut server = context.session()?;
    let mut client = openssl_client(user, key, max_version);
    let mut received = Vec::new();
    let mut client_done = false;
    let mut sent = false;
    for _ in 0..1000 {
        if !client_done {
            match client.do_handshake() {
                Ok(()) => client_done = true,
                Err(error) if error.code() == openssl::ssl::ErrorCode::WANT_READ => {}
                Err(error) => return Err(TlsError::Protocol(format!("client: {error}"))),
            }
        }
        if client_done && !sent {
            client.ssl_write(b"hello from the client").unwrap();
            sent = true;
        }
        let wire = std::mem::take(&mut client.get_mut().outgoing);
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let consumed = server.feed(rest)?;
            rest = &rest[consumed..];
            let mut out = [0u8; 1024];
            loop {
                let n = server.read_plaintext(&mut out)?;
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&out[..n]);
            }
        }
        let mut out = [0u8; 8192];
        let n = server.write_ciphertext(&mut out);
        client.get_mut().incoming.extend(&out[..n]);
        if received.len() == b"hello from the client".len() && wire.is_empty() && n == 0 {
            break;
        }
    }
    assert_eq!(received, b"hello from the client");
    let accepted = server.write_plaintext(b"hello from the server")?;
    assert_eq!(accepted, 21);
    let mut out = [0u8; 8192];
    let n = server.write_ciphertext(&mut out);
    client.get_mut().incoming.extend(&out[..n]);
    let mut reply = [0u8; 64];
    let n = client.ssl_read(&mut reply).unwrap();
    Ok((server, reply[..n].to_vec()))
}

#[test]
fn psk_right_key_works_in_tls13_and_tls12() {
    let (_dir, context) = psk_context(&[("alice", &[0x11; 32]), ("bob", &[0x22; 16])]);
    assert_eq!(context.describe().split(" (").next(), Some("psk"));
    assert!(
        context.describe().contains("2 users"),
        "{}",
        context.describe()
    );
    for (version, name) in [
        (openssl::ssl::SslVersion::TLS1_3, "TLS1.3"),
        (openssl::ssl::SslVersion::TLS1_2, "TLS1.2"),
    ] {
        let (server, reply) = psk_exchange(&context, "bob", &[0x22; 16], version).unwrap();
        assert_eq!(reply, b"hello from the server");
        let identity = server.identity().unwrap();
        assert_eq!(identity.psk_user.as_deref(), Some("bob"));
        assert!(matches(identity, "PSK:bob"));
        assert!(!matches(identity, "PSK:alice"));
        assert!(server.summary().starts_with(name), "{}", server.summary());
        assert!(
            server.summary().ends_with("psk bob"),
            "{}",
            server.summary()
        );
        let Err(IntoKernelError::Declined { session, reason }) = server.into_kernel(-1) else {
            panic!("PSK sessions stay in user space");
        };
        assert!(reason.to_string().contains("PSK"), "{reason}");
        assert!(!session.is_handshaking());
    }
}

#[test]
fn psk_wrong_key_or_unknown_user_fails() {
    let (_dir, context) = psk_context(&[("alice", &[0x11; 32])]);
    for version in [
        openssl::ssl::SslVersion::TLS1_3,
        openssl::ssl::SslVersion::TLS1_2,
    ] {
        assert!(psk_exchange(&context, "alice", &[0x12; 32], version).is_err());
        assert!(psk_exchange(&context, "mallory", &[0x11; 32], version).is_err());
    }
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let pki = shared_pki();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            TlsPaths {
                cert: Some(junk.clone()),
                ..pki.paths(false)
            },
            "--tls-cert",
            "junk.pem",
        ),
        (
            TlsPaths {
                key: Some(junk.clone()),
                ..pki.paths(false)
            },
            "--tls-key",
            "junk.pem",
        ),
        (
            TlsPaths {
                ca: Some(missing.clone()),
                ..pki.paths(false)
            },
            "--tls-ca",
            "missing.pem",
        ),
        (
            TlsPaths {
                psk: Some(junk.clone()),
                ..TlsPaths::default()
            },
            "--tls-psk",
            "junk.pem",
        ),
        (
            // The CA's certificate with the server's key: keys do not match.
            TlsPaths {
                cert: Some(pki.path("ca.pem")),
                ..pki.paths(false)
            },
            "--tls-key",
            "server.key",
        ),
    ];
    for (paths, flag, file) in cases {
        let error = TlsContext::load(&paths).unwrap_err().to_string();
        assert!(error.contains(flag) && error.contains(file), "{error}");
    }
    let both = TlsPaths {
        psk: Some(junk.clone()),
        ..pki.paths(false)
    };
    assert!(
        TlsContext::load(&both)
            .unwrap_err()
            .to_string()
            .contains("cannot be combined")
    );
    let half = TlsPaths {
        cert: Some(junk),
        ..TlsPaths::default()
    };
    assert!(
        TlsContext::load(&half)
            .unwrap_err()
            .to_string()
            .contains("--tls-key")
    );
    assert!(TlsContext::load(&TlsPaths::default()).is_err());
}

#[test]
fn contexts_are_shareable_and_sessions_movable_between_threads() {
    fn shared<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shared::<TlsContext>();
    movable::<TlsSession>();
    movable::<KernelTls>();
}
