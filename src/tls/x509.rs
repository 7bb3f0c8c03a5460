//! X.509 credentials and sessions on rustls (ring provider), and their hand-over to kTLS.
//!
//! # Configuration choices
//!
//! TLS 1.3 and 1.2 with rustls' default AEAD suites (AES-GCM, ChaCha20-Poly1305: all of them
//! kTLS-capable). No session tickets and no session cache: NBD clients reconnect rarely, and
//! a ticket sent after the handshake would sit in front of the kTLS switch. Secret extraction
//! is enabled for kTLS.
//!
//! # Nonces after the switch (TLS 1.2 AES-GCM)
//!
//! rustls builds a TLS 1.2 GCM record nonce as `salt || (explicit XOR seq)`, where `explicit`
//! comes from the key block, and sends the last 8 bytes as the record's explicit nonce. The
//! kernel instead sends `iv, iv + 1, iv + 2, …` starting from the 8 bytes it is given. Handing
//! it rustls' `explicit` would repeat the nonce of the Finished record (`explicit XOR 0`) under
//! the same key. [`kernel_tx_iv`] therefore flips the top bit of the explicit part: every nonce
//! rustls used (`explicit XOR m`, `m < 2^62`) keeps the top two bits of `explicit`, and no
//! value `(explicit XOR 2^63) + k` with `k < 2^62` has those two top bits, so the two ranges
//! never meet. The peer reads the explicit nonce from each record, so any unique value is
//! valid. TLS 1.3 and ChaCha20-Poly1305 derive nonces as `iv XOR seq` on both sides and need
//! no adjustment.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, RootCertStore, ServerConfig,
    ServerConnection,
};

use super::identity::{Identity, render_name};
use super::record::RecordBoundary;
use super::{KernelTls, SEND_BUFFER_BYTES_MAX, TlsError, read_credential};
use crate::ring::ktls::{self, CryptoInfo, Direction, KtlsCipher, KtlsSupport, KtlsVersion};

/// Loaded X.509 server configuration.
pub(super) struct X509Context {
    config: Arc<ServerConfig>,
    description: String,
    client_certificates: bool,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl X509Context {
    pub(super) fn load(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
    ) -> Result<X509Context, TlsError> {
        let certificates = load_certificates("--tls-cert", cert)?;
        let key_der = load_key(key)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| TlsError::Config(format!("rustls: {error}")))?;
        let mut ca_note = String::from("no client certificates");
        let builder = match ca {
            Some(ca) => {
                let roots = load_certificates("--tls-ca", ca)?;
                let mut store = RootCertStore::empty();
                for (index, root) in roots.iter().enumerate() {
                    store.add(root.clone()).map_err(|error| TlsError::File {
                        flag: "--tls-ca",
                        path: ca.to_path_buf(),
                        reason: format!("certificate #{}: {error}", index + 1),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                        .build()
                        .map_err(|error| TlsError::File {
                            flag: "--tls-ca",
                            path: ca.to_path_buf(),
                            reason: error.to_string(),
                        })?;
                ca_note = format!(
                    "client certificates required, CA {}: {} certificate{}",
                    ca.display(),
                    roots.len(),
                    if roots.len() == 1 { "" } else { "s" }
                );
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let leaf_subject = leaf_subject(&certificates[0]);
        let mut config = builder
            .with_single_cert(certificates, key_der)
            .map_err(|error| TlsError::File {
                flag: "--tls-key",
                path: key.to_path_buf(),
                reason: format!("does not fit --tls-cert {}: {error}", cert.display()),
            })?;
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(X509Context {
            config: Arc::new(config),
            description: format!("x509 (certificate {leaf_subject}; {ca_note})"),
            client_certificates: ca.is_some(),
        })
    }

    pub(super) fn describe(&self) -> String {
        self.description.clone()
    }

    pub(super) fn requires_client_certificates(&self) -> bool {
        self.client_certificates
    }

    pub(super) fn session(&self) -> Result<RustlsSession, TlsError> {
        let mut connection = ServerConnection::new(self.config.clone())
            .map_err(|error| TlsError::Protocol(error.to_string()))?;
        connection.set_buffer_limit(Some(SEND_BUFFER_BYTES_MAX));
        Ok(RustlsSession {
            connection,
            boundary: RecordBoundary::default(),
            identity: None,
            peer_closed: false,
        })
    }
}

fn leaf_subject(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(der) {
        Ok((_, certificate)) => render_name(certificate.subject()),
        Err(_) => "(unparsable)".to_string(),
    }
}

fn load_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_credential(flag, path)?;
    let file_error = |reason: String| TlsError::File {
        flag,
        path: path.to_path_buf(),
        reason,
    };
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(format!("bad PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(file_error(
            "no `-----BEGIN CERTIFICATE-----` block found (expected PEM certificates)".to_string(),
        ));
    }
    for (index, certificate) in certificates.iter().enumerate() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(certificate).map_err(|error| {
            file_error(format!(
                "certificate #{} is not valid X.509: {error}",
                index + 1
            ))
        })?;
    }
    Ok(certificates)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = zeroize::Zeroizing::new(read_credential("--tls-key", path)?);
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::File {
        flag: "--tls-key",
        path: path.to_path_buf(),
        reason: format!(
            "no usable private key (expected PEM PKCS#8, PKCS#1 RSA or SEC1 EC): {error}"
        ),
    })?;
    if provider()
        .key_provider
        .load_private_key(key.clone_key())
        .is_ok()
    {
        return Ok(key);
    }
    // ring takes SEC1 EC keys only without the optional curve parameters, which certtool and
    // openssl write: let OpenSSL re-encode the key as PKCS#8. If that fails too, rustls'
    // error (reported by the caller) is the more useful one.
    let pkcs8 = openssl::pkey::PKey::private_key_from_pem(&bytes)
        .and_then(|key| key.private_key_to_pkcs8());
    match pkcs8 {
        Ok(der) => Ok(PrivateKeyDer::Pkcs8(der.into())),
        Err(_) => Ok(key),
    }
}

/// One rustls server connection plus what the kTLS hand-over needs to know.
pub(super) struct RustlsSession {
    connection: ServerConnection,
    boundary: RecordBoundary,
    identity: Option<Identity>,
    peer_closed: bool,
}

/// Why a hand-over to the kernel did not happen.
pub(super) enum KernelError {
    Declined(Box<RustlsSession>, TlsError),
    Failed(TlsError),
}

impl RustlsSession {
    pub(super) fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        let mut rest = ciphertext;
        while !rest.is_empty() && !self.peer_closed {
            let before = rest.len();
            match self.connection.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                // Back-pressure: decrypted plaintext waits for read_plaintext.
                Err(error) if error.kind() == io::ErrorKind::Other => break,
                // "message buffer full": a record or handshake message beyond rustls' limits.
                Err(error) => return Err(TlsError::Protocol(error.to_string())),
            }
            let start = ciphertext.len() - before;
            self.boundary
                .consume(&ciphertext[start..ciphertext.len() - rest.len()]);
            let state = self
                .connection
                .process_new_packets()
                .map_err(|error| TlsError::Protocol(error.to_string()))?;
            self.peer_closed |= state.peer_has_closed();
            if self.identity.is_none() && !self.connection.is_handshaking() {
                self.identity = self.peer_identity()?;
            }
        }
        Ok(ciphertext.len() - rest.len())
    }

    fn peer_identity(&self) -> Result<Option<Identity>, TlsError> {
        match self.connection.peer_certificates() {
            Some([leaf, ..]) => Identity::from_certificate_der(leaf).map(Some),
            _ => Ok(None),
        }
    }

    pub(super) fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        if out.is_empty() {
            return Ok(0);
        }
        match self.connection.reader().read(out) {
            Ok(0) => {
                self.peer_closed = true;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(error) => Err(TlsError::Protocol(error.to_string())),
        }
    }

    pub(super) fn write_plaintext(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        if data.is_empty() {
            return Ok(0);
        }
        self.connection
            .writer()
            .write(data)
            .map_err(|error| TlsError::Protocol(error.to_string()))
    }

    pub(super) fn write_ciphertext(&mut self, out: &mut [u8]) -> usize {
        let mut written = 0;
        while written < out.len() && self.connection.wants_write() {
            let mut window = &mut out[written..];
            match self.connection.write_tls(&mut window) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
        written
    }

    pub(super) fn wants_write(&self) -> bool {
        self.connection.wants_write()
    }

    pub(super) fn is_handshaking(&self) -> bool {
        self.connection.is_handshaking()
    }

    pub(super) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    pub(super) fn send_close_notify(&mut self) {
        self.connection.send_close_notify();
    }

    pub(super) fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub(super) fn summary(&self) -> String {
        let version = match self.connection.protocol_version() {
            Some(version) => super::version_name(&format!("{version:?}")),
            None => "handshaking".to_string(),
        };
        let suite = self
            .connection
            .negotiated_cipher_suite()
            .map(|suite| format!(" {:?}", suite.suite()))
            .unwrap_or_default();
        let peer = match &self.identity {
            Some(identity) => identity.describe(),
            None => "x509 (no client certificate)".to_string(),
        };
        format!("{version}{suite} {peer}")
    }

    /// The negotiated (version, cipher) if the kernel could take it over.
    fn kernel_parameters(&self) -> Result<(KtlsVersion, KtlsCipher), TlsError> {
        let version = match self.connection.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => KtlsVersion::Tls13,
            Some(ProtocolVersion::TLSv1_2) => KtlsVersion::Tls12,
            other => return Err(TlsError::Kernel(format!("unsupported version {other:?}"))),
        };
        let suite = self
            .connection
            .negotiated_cipher_suite()
            .ok_or_else(|| TlsError::Kernel("no cipher suite negotiated".to_string()))?
            .suite();
        let cipher = match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => KtlsCipher::Aes128Gcm,
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => KtlsCipher::Aes256Gcm,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
                KtlsCipher::Chacha20Poly1305
            }
            other => {
                return Err(TlsError::Kernel(format!(
                    "cipher suite {other:?} has no kTLS"
                )));
            }
        };
        Ok((version, cipher))
    }

    pub(super) fn ready_for_kernel(&self) -> bool {
        !self.connection.is_handshaking()
            && !self.connection.wants_write()
            && !self.peer_closed
            && self.boundary.at_boundary()
    }

    /// Checks everything that can be checked while the session is still intact.
    fn kernel_precheck(&self) -> Result<(KtlsVersion, KtlsCipher), TlsError> {
        let declined = |why: &str| Err(TlsError::Kernel(why.to_string()));
        if self.connection.is_handshaking() {
            return declined("the handshake is not complete");
        }
        if self.connection.wants_write() {
            return declined("ciphertext is still pending; drain write_ciphertext first");
        }
        if self.peer_closed {
            return declined("the peer already sent close_notify");
        }
        if !self.boundary.at_boundary() {
            return declined("a partial TLS record was fed; switch between records");
        }
        let (version, cipher) = self.kernel_parameters()?;
        match ktls::probe() {
            KtlsSupport::Unavailable { reason } => {
                super::log_ktls_unavailable_once(reason);
                Err(TlsError::Kernel(reason.clone()))
            }
            support if !support.supports(version, cipher) => Err(TlsError::Kernel(format!(
                "the kernel's tls module does not accept {version:?} {cipher:?}"
            ))),
            _ => Ok((version, cipher)),
        }
    }

    pub(super) fn into_kernel(mut self: Box<Self>, fd: RawFd) -> Result<KernelTls, KernelError> {
        let (version, cipher) = match self.kernel_precheck() {
            Ok(parameters) => parameters,
            Err(reason) => return Err(KernelError::Declined(self, reason)),
        };
        if let Err(error) = ktls::enable(fd) {
            let reason = TlsError::Kernel(ktls::explain_enable_error(&error));
            return Err(KernelError::Declined(self, reason));
        }
        // From here on the socket has the ULP; the keys leave rustls below.
        let mut leftover_plaintext = Vec::new();
        let mut reader = self.connection.reader();
        loop {
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => leftover_plaintext.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    return Err(KernelError::Failed(TlsError::Protocol(error.to_string())));
                }
            }
        }
        let summary = format!("{} kTLS", self.summary());
        let identity = self.identity.take();
        let failed = |why: String| KernelError::Failed(TlsError::Kernel(why));
        let secrets = self
            .connection
            .dangerous_extract_secrets()
            .map_err(|error| failed(format!("rustls refused to export the keys: {error}")))?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let transmit =
            crypto_info(version, cipher, &tx, tx_seq, Direction::Transmit).map_err(failed)?;
        let receive =
            crypto_info(version, cipher, &rx, rx_seq, Direction::Receive).map_err(failed)?;
        ktls::set_crypto(fd, Direction::Transmit, &transmit)
            .map_err(|error| failed(format!("setsockopt(SOL_TLS, TLS_TX): {error}")))?;
        ktls::set_crypto(fd, Direction::Receive, &receive)
            .map_err(|error| failed(format!("setsockopt(SOL_TLS, TLS_RX): {error}")))?;
        Ok(KernelTls {
            leftover_plaintext,
            identity,
            summary,
            version,
            cipher,
        })
    }
}

/// The kernel's crypto info for one direction of extracted rustls secrets.
fn crypto_info(
    version: KtlsVersion,
    cipher: KtlsCipher,
    secrets: &ConnectionTrafficSecrets,
    seq: u64,
    direction: Direction,
) -> Result<CryptoInfo, String> {
    let (found, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (KtlsCipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (KtlsCipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (KtlsCipher::Chacha20Poly1305, key, iv)
        }
        _ => return Err("rustls exported keys of an unknown cipher".to_string()),
    };
    if found != cipher {
        return Err(format!(
            "negotiated {cipher:?} but rustls exported {found:?} keys"
        ));
    }
    let iv: [u8; ktls::IV_BYTES] = iv
        .as_ref()
        .try_into()
        .map_err(|_| format!("rustls exported a {}-byte IV", iv.as_ref().len()))?;
    let iv = match direction {
        Direction::Transmit => kernel_tx_iv(version, cipher, iv, seq)?,
        Direction::Receive => iv,
    };
    CryptoInfo::new(version, cipher, key.as_ref(), &iv, seq).map_err(|error| error.to_string())
}

/// Highest sequence number for which [`kernel_tx_iv`]'s nonce separation argument holds.
const TLS12_SEQ_MAX: u64 = 1 << 62;

/// The transmit IV for the kernel (see the module docs): TLS 1.2 AES-GCM gets the top bit of
/// its 8-byte explicit-nonce counter flipped; everything else is unchanged.
fn kernel_tx_iv(
    version: KtlsVersion,
    cipher: KtlsCipher,
    mut iv: [u8; ktls::IV_BYTES],
    seq: u64,
) -> Result<[u8; ktls::IV_BYTES], String> {
    if version == KtlsVersion::Tls12 && cipher != KtlsCipher::Chacha20Poly1305 {
        if seq >= TLS12_SEQ_MAX {
            return Err(format!(
                "sequence number {seq} too large for a TLS 1.2 hand-over"
            ));
        }
        iv[4] ^= 0x80;
    }
    Ok(iv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn explicit(iv: &[u8; 12]) -> u64 {
        u64::from_be_bytes(iv[4..].try_into().unwrap())
    }

    #[test]
    fn tls12_gcm_kernel_nonces_never_repeat_rustls_nonces() {
        // Explicit parts next to every carry boundary of the top two bits.
        let starts = [
            0u64,
            1,
            0x3fff_ffff_ffff_ffff,
            0x4000_0000_0000_0000,
            0x7fff_ffff_ffff_fffe,
            0x7fff_ffff_ffff_ffff,
            0xbfff_ffff_ffff_ffff,
            0xffff_ffff_ffff_fffe,
            0xffff_ffff_ffff_ffff,
            0x1234_5678_9abc_def1,
        ];
        for start in starts {
            let mut iv = [0u8; 12];
            iv[4..].copy_from_slice(&start.to_be_bytes());
            for used in [1u64, 2, 3, 1000] {
                let kernel =
                    kernel_tx_iv(KtlsVersion::Tls12, KtlsCipher::Aes128Gcm, iv, used).unwrap();
                assert_eq!(kernel[..4], iv[..4], "salt unchanged");
                let first = explicit(&kernel);
                let rustls: std::collections::HashSet<u64> = (0..used).map(|m| start ^ m).collect();
                for k in 0..5000u64 {
                    assert!(
                        !rustls.contains(&first.wrapping_add(k)),
                        "start {start:#x} k {k}"
                    );
                }
                // And far away: the top two bits differ for every k < 2^62.
                for k in [1u64 << 40, (1 << 61) + 12345, (1 << 62) - 1] {
                    let nonce = first.wrapping_add(k);
                    assert_ne!(nonce >> 62, start >> 62, "start {start:#x} k {k:#x}");
                }
            }
        }
    }

    /// Handshakes a rustls client with a server built like [`X509Context`] does, then
    /// extracts both sides' secrets.
    fn extracted_pair(
        version: &'static rustls::SupportedProtocolVersion,
        suite: rustls::SupportedCipherSuite,
    ) -> (rustls::ExtractedSecrets, rustls::ExtractedSecrets) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap().der().clone();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let mut server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key_der)
            .unwrap();
        server_config.enable_secret_extraction = true;
        server_config.send_tls13_tickets = 0;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.enable_secret_extraction = true;
        let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!server.is_handshaking() && !client.is_handshaking());
        // One application record each way, so the sequence numbers are not all zero.
        client.writer().write_all(b"ping").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut &wire[..]).unwrap();
        server.process_new_packets().unwrap();
        let mut plain = [0u8; 4];
        server.reader().read_exact(&mut plain).unwrap();
        server.writer().write_all(b"pong").unwrap();
        let mut wire = Vec::new();
        server.write_tls(&mut wire).unwrap();
        client.read_tls(&mut &wire[..]).unwrap();
        client.process_new_packets().unwrap();
        (
            server.dangerous_extract_secrets().unwrap(),
            client.dangerous_extract_secrets().unwrap(),
        )
    }

    #[test]
    fn server_transmit_keys_are_the_client_receive_keys() {
        use rustls::crypto::ring::cipher_suite as suites;
        let cases = [
            (
                &rustls::version::TLS13,
                suites::TLS13_AES_128_GCM_SHA256,
                KtlsCipher::Aes128Gcm,
            ),
            (
                &rustls::version::TLS13,
                suites::TLS13_AES_256_GCM_SHA384,
                KtlsCipher::Aes256Gcm,
            ),
            (
                &rustls::version::TLS13,
                suites::TLS13_CHACHA20_POLY1305_SHA256,
                KtlsCipher::Chacha20Poly1305,
            ),
            (
                &rustls::version::TLS12,
                suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                KtlsCipher::Aes128Gcm,
            ),
            (
                &rustls::version::TLS12,
                suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                KtlsCipher::Aes256Gcm,
            ),
            (
                &rustls::version::TLS12,
                suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                KtlsCipher::Chacha20Poly1305,
            ),
        ];
        for (version, suite, cipher) in cases {
            let ktls_version = if version.version == ProtocolVersion::TLSv1_3 {
                KtlsVersion::Tls13
            } else {
                KtlsVersion::Tls12
            };
            let (server, client) = extracted_pair(version, suite);
            // Both sides agree on every sequence number after one record each way.
            assert_eq!(server.tx.0, client.rx.0);
            assert_eq!(server.rx.0, client.tx.0);
            let expected_seq = if ktls_version == KtlsVersion::Tls13 {
                1
            } else {
                2
            };
            assert_eq!(server.tx.0, expected_seq, "{suite:?}");
            let tx = |secrets: &rustls::ExtractedSecrets| {
                crypto_info(
                    ktls_version,
                    cipher,
                    &secrets.tx.1,
                    secrets.tx.0,
                    Direction::Transmit,
                )
                .unwrap()
            };
            let rx = |secrets: &rustls::ExtractedSecrets| {
                crypto_info(
                    ktls_version,
                    cipher,
                    &secrets.rx.1,
                    secrets.rx.0,
                    Direction::Receive,
                )
                .unwrap()
            };
            let (server_tx, client_rx) = (tx(&server), rx(&client));
            let (a, b) = (server_tx.as_bytes(), client_rx.as_bytes());
            assert_eq!(a.len(), b.len());
            let differing: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            let tls12_gcm =
                ktls_version == KtlsVersion::Tls12 && cipher != KtlsCipher::Chacha20Poly1305;
            // Only the top bit of the TLS 1.2 GCM explicit-nonce counter (offset 4) differs.
            assert_eq!(
                differing,
                if tls12_gcm { vec![4] } else { vec![] },
                "{suite:?}"
            );
            if tls12_gcm {
                assert_eq!(a[4] ^ b[4], 0x80);
            }
            // The receive side is the peer's transmit side unchanged (no adjustment on RX).
            assert_eq!(rx(&server).as_bytes().len(), tx(&client).as_bytes().len());
            let mismatched = crypto_info(
                ktls_version,
                KtlsCipher::Aes256Gcm,
                &server.tx.1,
                server.tx.0,
                Direction::Transmit,
            );
            assert_eq!(
                mismatched.is_err(),
                cipher != KtlsCipher::Aes256Gcm,
                "{suite:?}"
            );
        }
    }

    #[test]
    fn tls13_and_chacha_ivs_are_unchanged() {
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8);
        for (version, cipher) in [
            (KtlsVersion::Tls13, KtlsCipher::Aes128Gcm),
            (KtlsVersion::Tls13, KtlsCipher::Aes256Gcm),
            (KtlsVersion::Tls13, KtlsCipher::Chacha20Poly1305),
            (KtlsVersion::Tls12, KtlsCipher::Chacha20Poly1305),
        ] {
            assert_eq!(kernel_tx_iv(version, cipher, iv, 5).unwrap(), iv);
        }
        assert!(kernel_tx_iv(KtlsVersion::Tls12, KtlsCipher::Aes256Gcm, iv, 1 << 62).is_err());
    }
}
