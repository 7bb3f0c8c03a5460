//! Pre-shared-key credentials and sessions on OpenSSL, driven through an in-memory pipe.
//!
//! # Why OpenSSL here
//!
//! rustls implements no external PSKs (only resumption PSKs). The clients that matter
//! (qemu, libnbd, nbdkit's peers) use GnuTLS PSK with a psktool file. OpenSSL 3 is the
//! system TLS library on Debian, audited and maintained, and its PSK server callback works
//! for TLS 1.3 and TLS 1.2; the `openssl` crate exposes it safely.
//!
//! # File format (psktool)
//!
//! One `user:hexkey` per line, as `psktool -u USER -p FILE` writes it. Blank lines and lines
//! starting with `#` are skipped; a trailing `\r` is ignored. The user is 1 to 256 bytes of
//! printable text without `:`; the key is 1 to 512 bytes in hex. Duplicate users are an
//! error. Keys are wiped from memory when the context is dropped.
//!
//! # Ciphers
//!
//! TLS 1.3: `TLS_AES_128_GCM_SHA256`, `TLS_CHACHA20_POLY1305_SHA256`
//! (SHA-256 suites, as an external PSK via this callback requires) and
//! `TLS_AES_256_GCM_SHA384`. TLS 1.2: ECDHE-PSK with ChaCha20-Poly1305 and plain PSK with
//! AES-GCM and ChaCha20-Poly1305 (AEAD only; no CBC). No renegotiation, no tickets.
//!
//! # The pipe
//!
//! OpenSSL reads ciphertext from, and writes to, a [`MemPipe`]: reading an empty pipe is
//! `WouldBlock` (OpenSSL's WANT_READ). The incoming side is capped at
//! [`RECEIVE_BUFFER_BYTES_MAX`]; the outgoing side only grows past
//! [`SEND_BUFFER_BYTES_MAX`] by one record, because plaintext is accepted one record at a time
//! and only while the pipe holds less than the ceiling.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslMode, SslOptions, SslSessionCacheMode, SslStream,
    SslVersion,
};
use zeroize::Zeroizing;

use super::identity::Identity;
use super::{RECEIVE_BUFFER_BYTES_MAX, SEND_BUFFER_BYTES_MAX, TlsError, read_credential};

/// Longest PSK identity accepted (OpenSSL's `PSK_MAX_IDENTITY_LEN`).
const USER_BYTES_MAX: usize = 256;
/// Longest key accepted (psktool's and OpenSSL 3's maximum).
const KEY_BYTES_MAX: usize = 512;
/// Plaintext handed to OpenSSL per `SSL_write` (one full record).
const RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:\
                            TLS_AES_256_GCM_SHA384";
const TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES256-GCM-SHA384:\
                             PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

type Keys = HashMap<Vec<u8>, Zeroizing<Vec<u8>>>;

/// Loaded PSK credentials.
pub(super) struct PskContext {
    context: SslContext,
    user_index: Index<Ssl, String>,
    path: PathBuf,
    users: usize,
}

impl PskContext {
    pub(super) fn load(path: &Path) -> Result<PskContext, TlsError> {
        let bytes = Zeroizing::new(read_credential("--tls-psk", path)?);
        let keys = parse_psk_file(&bytes).map_err(|reason| TlsError::File {
            flag: "--tls-psk",
            path: path.to_path_buf(),
            reason,
        })?;
        let users = keys.len();
        let openssl_error = |error| TlsError::Config(format!("OpenSSL PSK context: {error}"));
        let user_index = Ssl::new_ex_index::<String>().map_err(openssl_error)?;
        let context = build_context(Arc::new(keys), user_index).map_err(openssl_error)?;
        Ok(PskContext {
            context,
            user_index,
            path: path.to_path_buf(),
            users,
        })
    }

    pub(super) fn describe(&self) -> String {
        let plural = if self.users == 1 { "" } else { "s" };
        format!(
            "psk ({} user{plural} from {})",
            self.users,
            self.path.display()
        )
    }

    pub(super) fn session(&self) -> Result<OpenSslSession, TlsError> {
        let openssl_error =
            |error: openssl::error::ErrorStack| TlsError::Protocol(error.to_string());
        let mut ssl = Ssl::new(&self.context).map_err(openssl_error)?;
        ssl.set_accept_state();
        let stream = SslStream::new(ssl, MemPipe::default()).map_err(openssl_error)?;
        Ok(OpenSslSession {
            stream,
            user_index: self.user_index,
            handshake_done: false,
            identity: None,
            peer_closed: false,
        })
    }
}

fn build_context(
    keys: Arc<Keys>,
    user_index: Index<Ssl, String>,
) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut builder = SslContext::builder(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_ciphersuites(TLS13_SUITES)?;
    builder.set_cipher_list(TLS12_CIPHERS)?;
    builder.set_options(
        SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    builder.set_num_tickets(0)?;
    builder.set_session_cache_mode(SslSessionCacheMode::OFF);
    builder.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    // OpenSSL does not report the identity after a TLS 1.3 PSK handshake
    // (`SSL_get_psk_identity` is NULL then), so the callback records the user it accepted.
    builder.set_psk_server_callback(move |ssl, identity, psk| {
        let Some((user, key)) = identity.and_then(|identity| keys.get_key_value(identity)) else {
            return Ok(0); // unknown user: the handshake fails
        };
        if key.len() > psk.len() {
            return Ok(0);
        }
        psk[..key.len()].copy_from_slice(key);
        ssl.set_ex_data(user_index, String::from_utf8_lossy(user).into_owned());
        Ok(key.len())
    });
    Ok(builder.build())
}

/// Parses a psktool file (see the module docs); the error names the line.
pub(super) fn parse_psk_file(bytes: &[u8]) -> Result<Keys, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut keys = Keys::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hex)) = line.split_once(':') else {
            return Err(format!("line {number}: expected `user:hexkey`"));
        };
        if user.is_empty() || user.len() > USER_BYTES_MAX || user.chars().any(char::is_control) {
            return Err(format!(
                "line {number}: the user must be 1 to {USER_BYTES_MAX} bytes of printable text"
            ));
        }
        let key = decode_hex(hex.trim_end()).ok_or_else(|| {
            format!("line {number}: the key of {user:?} is not an even number of hex digits")
        })?;
        if key.is_empty() || key.len() > KEY_BYTES_MAX {
            return Err(format!(
                "line {number}: the key of {user:?} must be 1 to {KEY_BYTES_MAX} bytes"
            ));
        }
        if keys.insert(user.as_bytes().to_vec(), key).is_some() {
            return Err(format!("line {number}: user {user:?} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("no `user:hexkey` lines (make one with `psktool -u USER -p FILE`)".to_string());
    }
    Ok(keys)
}

fn decode_hex(hex: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(hex.len() / 2));
    for pair in hex.as_bytes().chunks_exact(2) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        out.push((high * 16 + low) as u8);
    }
    Some(out)
}

/// The in-memory transport OpenSSL reads ciphertext from and writes ciphertext to.
#[derive(Debug, Default)]
pub(super) struct MemPipe {
    incoming: VecDeque<u8>,
    outgoing: VecDeque<u8>,
}

impl Read for MemPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.incoming.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.incoming.read(buf)
    }
}

impl Write for MemPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One OpenSSL server session over a [`MemPipe`].
pub(super) struct OpenSslSession {
    stream: SslStream<MemPipe>,
    user_index: Index<Ssl, String>,
    handshake_done: bool,
    identity: Option<Identity>,
    peer_closed: bool,
}

fn would_block(error: &openssl::ssl::Error) -> bool {
    matches!(error.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE)
}

impl OpenSslSession {
    pub(super) fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        let pipe = self.stream.get_mut();
        let room = RECEIVE_BUFFER_BYTES_MAX.saturating_sub(pipe.incoming.len());
        let taken = room.min(ciphertext.len());
        pipe.incoming.extend(&ciphertext[..taken]);
        if !self.handshake_done {
            self.drive_handshake()?;
        }
        Ok(taken)
    }

    fn drive_handshake(&mut self) -> Result<(), TlsError> {
        match self.stream.accept() {
            Ok(()) => {
                self.handshake_done = true;
                let Some(user) = self.stream.ssl().ex_data(self.user_index) else {
                    return Err(TlsError::Protocol(
                        "PSK handshake completed without a PSK user".to_string(),
                    ));
                };
                self.identity = Some(Identity::from_psk_user(user));
                Ok(())
            }
            Err(error) if would_block(&error) => Ok(()),
            Err(error) => Err(TlsError::Protocol(format!("PSK handshake failed: {error}"))),
        }
    }

    pub(super) fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        if !self.handshake_done {
            self.drive_handshake()?;
        }
        if !self.handshake_done || self.peer_closed || out.is_empty() {
            return Ok(0);
        }
        match self.stream.ssl_read(out) {
            Ok(n) => Ok(n),
            Err(error) if error.code() == ErrorCode::ZERO_RETURN => {
                self.peer_closed = true;
                Ok(0)
            }
            Err(error) if would_block(&error) => Ok(0),
            Err(error) => Err(TlsError::Protocol(error.to_string())),
        }
    }

    pub(super) fn write_plaintext(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        if !self.handshake_done {
            return Ok(0);
        }
        let mut accepted = 0;
        while accepted < data.len() && self.stream.get_ref().outgoing.len() < SEND_BUFFER_BYTES_MAX
        {
            let end = data.len().min(accepted + RECORD_PLAINTEXT_BYTES);
            match self.stream.ssl_write(&data[accepted..end]) {
                Ok(n) => accepted += n,
                Err(error) if would_block(&error) => break,
                Err(error) => return Err(TlsError::Protocol(error.to_string())),
            }
        }
        Ok(accepted)
    }

    pub(super) fn write_ciphertext(&mut self, out: &mut [u8]) -> usize {
        self.stream
            .get_mut()
            .outgoing
            .read(out)
            .expect("reading a VecDeque cannot fail")
    }

    pub(super) fn wants_write(&self) -> bool {
        !self.stream.get_ref().outgoing.is_empty()
    }

    pub(super) fn is_handshaking(&self) -> bool {
        !self.handshake_done
    }

    pub(super) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    pub(super) fn send_close_notify(&mut self) {
        // Writes the alert into the pipe; the result only says whether the peer's came too.
        let _ = self.stream.shutdown();
    }

    pub(super) fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub(super) fn summary(&self) -> String {
        if !self.handshake_done {
            return "handshaking psk".to_string();
        }
        let ssl = self.stream.ssl();
        let cipher = ssl
            .current_cipher()
            .map(|cipher| cipher.standard_name().unwrap_or(cipher.name()))
            .unwrap_or("?");
        let peer = self
            .identity
            .as_ref()
            .map(Identity::describe)
            .unwrap_or_default();
        format!("{} {cipher} {peer}", super::version_name(ssl.version_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_format_parses() {
        let keys = parse_psk_file(b"alice:00ff10\r\n\n# comment\nbob:ABCDEF\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[&b"alice".to_vec()].as_slice(), &[0x00, 0xff, 0x10]);
        assert_eq!(keys[&b"bob".to_vec()].as_slice(), &[0xab, 0xcd, 0xef]);
    }

    #[test]
    fn bad_psk_files_name_the_line() {
        for (text, needle) in [
            ("alice:00\nbob\n", "line 2"),
            ("alice:0\n", "line 1"),
            ("alice:zz\n", "hex"),
            (":00\n", "line 1"),
            ("alice:\n", "1 to 512"),
            ("alice:00\nalice:01\n", "twice"),
            ("\n# only comments\n", "no `user:hexkey`"),
        ] {
            let error = parse_psk_file(text.as_bytes()).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
        let long = format!("alice:{}\n", "00".repeat(KEY_BYTES_MAX + 1));
        assert!(parse_psk_file(long.as_bytes()).is_err());
        assert!(parse_psk_file(&[0xff, 0xfe]).is_err());
    }
}
