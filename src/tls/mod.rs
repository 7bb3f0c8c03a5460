//! TLS for ringbd's connections, sans-I/O: the shard receives ciphertext from the socket into
//! its own buffers, [`TlsSession::feed`]s it here, and sends what
//! [`TlsSession::write_ciphertext`] hands back. Nothing here touches a socket, except
//! [`TlsSession::into_kernel`], which moves an established session into the kernel (kTLS,
//! see [`crate::ring::ktls`]) so io_uring carries plaintext afterwards.
//!
//! # Credentials ([`TlsContext`])
//!
//! * X.509 (`--tls-cert`, `--tls-key`, optional `--tls-ca`): rustls 0.23 with the `ring`
//!   provider, TLS 1.3 and 1.2. With a CA, every client must present a certificate that
//!   chains to it (rustls' WebPKI client verifier); the session's [`Identity`] then carries
//!   the certificate's subject and SANs for per-export authorisation.
//! * PSK (`--tls-psk FILE`, psktool's `user:hexkey` format): OpenSSL (the system library,
//!   through the `openssl` crate's safe API) over an in-memory pipe, because rustls has no
//!   external pre-shared keys. TLS 1.3 and 1.2 PSK suites with AEAD ciphers only.
//! * Both at once is refused: one listener serves one kind of credential (see docs/TLS.md).
//!
//! A context is immutable and cheap to clone (an `Arc`); reloading means loading a new one
//! and using it for new connections, while existing sessions keep the one they started with.
//!
//! # Driving a session (the caller's loop)
//!
//! ```text
//! on bytes from the socket:   n = feed(bytes)?          (n < len: call read_plaintext, retry)
//!                             while read_plaintext(buf)? > 0 { hand to the protocol }
//! on protocol output:         n = write_plaintext(data)? (n < len: drain ciphertext, retry)
//! whenever wants_write():     len = write_ciphertext(buf); send buf[..len]
//! ```
//!
//! `feed` returning `Ok(0)` for non-empty input means either back-pressure (decrypted
//! plaintext waits to be read) or that the peer sent close_notify ([`TlsSession::peer_closed`]).
//! An `Err` is fatal for the connection: flush [`TlsSession::write_ciphertext`] (it may hold
//! an alert) and close. No call blocks, panics on peer input, or grows memory without bound:
//! received plaintext, unsent ciphertext and buffered records each have a fixed ceiling
//! ([`SEND_BUFFER_BYTES_MAX`], [`RECEIVE_BUFFER_BYTES_MAX`], and rustls' own 64 KiB cap on a
//! handshake message). A client that stalls mid-handshake is the caller's timeout to enforce.
//!
//! # Kernel TLS
//!
//! [`TlsSession::into_kernel`] succeeds only for X.509 (rustls) sessions after the handshake,
//! with no unsent ciphertext and no partial record fed, on a kernel whose `tls` module
//! accepts the negotiated cipher. Otherwise it returns the session unchanged
//! ([`IntoKernelError::Declined`]) and the caller keeps user-space TLS; the first decline
//! because the kernel lacks kTLS is logged once per process.

pub mod identity;
mod psk;
mod record;
mod x509;

use std::fmt;
use std::io::Read;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

pub use identity::Identity;

use crate::ring::ktls::{KtlsCipher, KtlsVersion};

/// Ceiling on ciphertext waiting to be sent (rustls' buffer limit; OpenSSL's pipe stops
/// accepting plaintext beyond it). [`TlsSession::write_plaintext`] accepts less when full.
pub const SEND_BUFFER_BYTES_MAX: usize = 256 * 1024;
/// Ceiling on received ciphertext held before it is decrypted (OpenSSL path; rustls holds at
/// most one record plus 16 KiB of plaintext before [`TlsSession::feed`] pushes back).
pub const RECEIVE_BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Largest credential file read (certificates, keys, PSK files).
pub const CREDENTIAL_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Where the credentials are; the fields map to `--tls-cert`, `--tls-key`, `--tls-ca` and
/// `--tls-psk`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// Server certificate chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to; requires client
    /// certificates when set.
    pub ca: Option<PathBuf>,
    /// PSK file in psktool format (`user:hexkey` per line).
    pub psk: Option<PathBuf>,
}

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A credential file is missing, unreadable or malformed.
    #[error("{flag} {}: {reason}", path.display())]
    File {
        /// The option that named the file (`--tls-cert`, …).
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// The combination of options is unusable.
    #[error("{0}")]
    Config(String),
    /// The peer sent something TLS does not allow, or the handshake failed (wrong key,
    /// untrusted certificate, garbage): fatal for the connection.
    #[error("TLS: {0}")]
    Protocol(String),
    /// Moving the session into the kernel was declined or failed.
    #[error("kernel TLS: {0}")]
    Kernel(String),
}

/// Loaded, immutable server credentials; clone freely.
#[derive(Clone)]
pub struct TlsContext {
    inner: Arc<ContextInner>,
}

enum ContextInner {
    X509(x509::X509Context),
    Psk(psk::PskContext),
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TlsContext").field(&self.describe()).finish()
    }
}

impl TlsContext {
    /// Loads every credential file; all or nothing. Errors name the option, the file and
    /// what is wrong with it.
    pub fn load(paths: &TlsPaths) -> Result<TlsContext, TlsError> {
        let x509_given = paths.cert.is_some() || paths.key.is_some() || paths.ca.is_some();
        let inner = match (&paths.psk, x509_given) {
            (Some(_), true) => {
                return Err(TlsError::Config(
                    "--tls-psk cannot be combined with --tls-cert/--tls-key/--tls-ca: a listener \
                     serves either PSK or X.509 credentials"
                        .to_string(),
                ));
            }
            (Some(psk), false) => ContextInner::Psk(psk::PskContext::load(psk)?),
            (None, _) => match (&paths.cert, &paths.key) {
                (Some(cert), Some(key)) => {
                    ContextInner::X509(x509::X509Context::load(cert, key, paths.ca.as_deref())?)
                }
                (Some(_), None) => {
                    return Err(TlsError::Config("--tls-cert needs --tls-key".to_string()));
                }
                (None, Some(_)) => {
                    return Err(TlsError::Config("--tls-key needs --tls-cert".to_string()));
                }
                (None, None) => {
                    return Err(TlsError::Config(
                        "TLS needs --tls-cert and --tls-key (optionally --tls-ca), or --tls-psk"
                            .to_string(),
                    ));
                }
            },
        };
        Ok(TlsContext {
            inner: Arc::new(inner),
        })
    }

    /// A new server-side session for one connection.
    pub fn session(&self) -> Result<TlsSession, TlsError> {
        let inner = match &*self.inner {
            ContextInner::X509(context) => SessionInner::Rustls(Box::new(context.session()?)),
            ContextInner::Psk(context) => SessionInner::OpenSsl(Box::new(context.session()?)),
        };
        Ok(TlsSession { inner })
    }

    /// One line for logs, e.g. `x509 (certificate CN=server; client certificates required,
    /// CA /etc/ringbd/ca.pem: 1 certificate)` or `psk (3 users from /etc/ringbd/keys.psk)`.
    pub fn describe(&self) -> String {
        match &*self.inner {
            ContextInner::X509(context) => context.describe(),
            ContextInner::Psk(context) => context.describe(),
        }
    }

    /// Whether clients authenticate (client certificates required, or PSK).
    pub fn authenticates_clients(&self) -> bool {
        match &*self.inner {
            ContextInner::X509(context) => context.requires_client_certificates(),
            ContextInner::Psk(_) => true,
        }
    }
}

/// One connection's TLS state (server side).
pub struct TlsSession {
    inner: SessionInner,
}

enum SessionInner {
    Rustls(Box<x509::RustlsSession>),
    OpenSsl(Box<psk::OpenSslSession>),
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.is_handshaking())
            .field("summary", &self.summary())
            .finish()
    }
}

macro_rules! dispatch {
    ($self:expr, $session:ident => $body:expr) => {
        match $self {
            SessionInner::Rustls($session) => $body,
            SessionInner::OpenSsl($session) => $body,
        }
    };
}

impl TlsSession {
    /// Hands ciphertext received from the peer to the session and processes it (handshake
    /// steps, decryption). Returns how many bytes were consumed; the caller keeps the rest and
    /// offers it again after [`TlsSession::read_plaintext`] made room. An error is fatal.
    pub fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        dispatch!(&mut self.inner, session => session.feed(ciphertext))
    }

    /// Copies decrypted application data into `out`; `Ok(0)` means none is available now.
    pub fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, TlsError> {
        dispatch!(&mut self.inner, session => session.read_plaintext(out))
    }

    /// Encrypts application data for the peer. Returns how many bytes were accepted (fewer
    /// than `data.len()`, possibly 0, when [`SEND_BUFFER_BYTES_MAX`] of ciphertext is waiting:
    /// drain [`TlsSession::write_ciphertext`] and offer the rest again). Before the handshake
    /// completes, the OpenSSL (PSK) path accepts nothing.
    pub fn write_plaintext(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        dispatch!(&mut self.inner, session => session.write_plaintext(data))
    }

    /// Moves pending ciphertext (handshake messages, records, alerts) into `out`; returns the
    /// number of bytes written (0 when nothing is pending). Never allocates.
    pub fn write_ciphertext(&mut self, out: &mut [u8]) -> usize {
        dispatch!(&mut self.inner, session => session.write_ciphertext(out))
    }

    /// Whether ciphertext is waiting for [`TlsSession::write_ciphertext`].
    pub fn wants_write(&self) -> bool {
        dispatch!(&self.inner, session => session.wants_write())
    }

    /// Whether the handshake is still in progress.
    pub fn is_handshaking(&self) -> bool {
        dispatch!(&self.inner, session => session.is_handshaking())
    }

    /// Whether the peer sent close_notify (no more application data will come).
    pub fn peer_closed(&self) -> bool {
        dispatch!(&self.inner, session => session.peer_closed())
    }

    /// Queues a close_notify alert (then drain [`TlsSession::write_ciphertext`]).
    pub fn send_close_notify(&mut self) {
        dispatch!(&mut self.inner, session => session.send_close_notify())
    }

    /// The authenticated peer, once the handshake completed: the client certificate's
    /// subject and SANs, or the PSK user. `None` for X.509 without client certificates.
    pub fn identity(&self) -> Option<&Identity> {
        dispatch!(&self.inner, session => session.identity())
    }

    /// One phrase for the connection log line, e.g.
    /// `TLS1.3 TLS13_AES_256_GCM_SHA384 x509 CN=alice,O=Example`.
    pub fn summary(&self) -> String {
        dispatch!(&self.inner, session => session.summary())
    }

    /// Whether [`TlsSession::into_kernel`] could switch now as far as the session is
    /// concerned: an X.509 (rustls) session whose handshake is done, with no ciphertext
    /// pending, no close_notify seen, and everything fed so far ending at a record boundary.
    /// (Whether the kernel can take it is [`crate::ring::ktls::probe`]'s answer.) PSK sessions
    /// are never ready: they stay in user space.
    pub fn ready_for_kernel(&self) -> bool {
        match &self.inner {
            SessionInner::Rustls(session) => session.ready_for_kernel(),
            SessionInner::OpenSsl(_) => false,
        }
    }

    /// Moves the established session into the kernel (kTLS) on the connected TCP socket
    /// `fd`, after which the caller sends and receives plaintext on `fd` and must first
    /// deliver [`KernelTls::leftover_plaintext`] to the protocol.
    ///
    /// Call it after the handshake, with every ciphertext byte received so far fed (the
    /// session then checks it ends at a record boundary) and nothing pending in
    /// [`TlsSession::write_ciphertext`]. [`IntoKernelError::Declined`] hands the session back
    /// untouched (keep using it in user space); [`IntoKernelError::Failed`] means the keys
    /// were already handed over and the connection must be closed.
    pub fn into_kernel(self, fd: RawFd) -> Result<KernelTls, IntoKernelError> {
        match self.inner {
            SessionInner::Rustls(session) => session.into_kernel(fd).map_err(|error| match error {
                x509::KernelError::Declined(session, reason) => IntoKernelError::Declined {
                    session: Box::new(TlsSession {
                        inner: SessionInner::Rustls(session),
                    }),
                    reason,
                },
                x509::KernelError::Failed(reason) => IntoKernelError::Failed(reason),
            }),
            SessionInner::OpenSsl(session) => Err(IntoKernelError::Declined {
                session: Box::new(TlsSession {
                    inner: SessionInner::OpenSsl(session),
                }),
                reason: TlsError::Kernel(
                    "PSK sessions (OpenSSL) stay in user-space TLS; see docs/TLS.md".to_string(),
                ),
            }),
        }
    }
}

/// A session now protected by the kernel.
#[derive(Debug)]
pub struct KernelTls {
    /// Application data the library had already decrypted; deliver it before reading the
    /// socket.
    pub leftover_plaintext: Vec<u8>,
    /// The authenticated peer (as [`TlsSession::identity`]).
    pub identity: Option<Identity>,
    /// As [`TlsSession::summary`], with ` kTLS` appended.
    pub summary: String,
    /// Negotiated version.
    pub version: KtlsVersion,
    /// Negotiated cipher.
    pub cipher: KtlsCipher,
}

/// Why [`TlsSession::into_kernel`] did not switch.
#[derive(Debug)]
pub enum IntoKernelError {
    /// Nothing changed: the session (returned) keeps working in user space.
    Declined {
        /// The session, untouched.
        session: Box<TlsSession>,
        /// Why (kernel without the `tls` module, unsupported cipher, PSK session, data
        /// still buffered, handshake not done).
        reason: TlsError,
    },
    /// The keys left the library but the kernel refused them: close the connection.
    Failed(TlsError),
}

/// Logs, once per process, why kernel TLS is not used at all.
fn log_ktls_unavailable_once(reason: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::warn!("kernel TLS unavailable, TLS stays in user space: {reason}");
    });
}

/// Reads a credential file with a size ceiling; errors name the option and the file.
fn read_credential(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        flag,
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|error| file_error(error.to_string()))?;
    let mut bytes = Vec::new();
    file.take(CREDENTIAL_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| file_error(error.to_string()))?;
    if bytes.len() as u64 > CREDENTIAL_FILE_BYTES_MAX {
        return Err(file_error(format!(
            "larger than {CREDENTIAL_FILE_BYTES_MAX} bytes; not a credential file"
        )));
    }
    Ok(bytes)
}

/// `TLS1.3` for OpenSSL's `TLSv1.3` and rustls' `TLSv1_3`.
fn version_name(name: &str) -> String {
    name.replace("TLSv1_", "TLS1.").replace("TLSv1.", "TLS1.")
}

#[cfg(test)]
mod tests;
