//! Kernel TLS (kTLS): the few socket options that move an established TLS session's record
//! protection into the kernel, so io_uring sends and receives plaintext on the socket and the
//! kernel encrypts and decrypts records. Nothing here knows about a TLS library: the caller
//! hands over the negotiated version and cipher, the traffic key, IV and record sequence
//! number of each direction (see `crate::tls` for how they come out of rustls).
//!
//! # Contract
//!
//! * [`probe`] answers, once per process, whether this kernel has the `tls` upper-layer
//!   protocol (`CONFIG_TLS`, module `tls.ko`) and which (version, cipher) pairs it accepts. It
//!   tries them on a throw-away loopback TCP pair, so a later failure on a real connection
//!   (after the user-space library gave up its keys) is not expected.
//! * [`enable`] sets `TCP_ULP "tls"` on a connected TCP socket. On failure nothing changed and
//!   the caller may keep doing TLS in user space on the same socket.
//! * [`set_crypto`] installs one direction's keys (`SOL_TLS`/`TLS_TX` or `TLS_RX`). It can be
//!   done once per direction; after it the socket carries plaintext on that side. A failure
//!   here leaves the connection unusable (the user-space keys are already gone).
//! * After `TLS_RX`, a record that is not application data (alert, TLS 1.3 KeyUpdate or
//!   NewSessionTicket) makes a plain `recv` fail with `EIO`; the caller closes the connection.
//!   [`send_close_notify`] sends the closing alert as its own record on a kTLS socket.
//!
//! # Layout
//!
//! [`CryptoInfo`] wraps the kernel UAPI structs (`include/uapi/linux/tls.h`) as `libc`
//! defines them; their sizes and field offsets are asserted below against the UAPI header.
//! Key material is wiped (volatile writes via `zeroize`) when a [`CryptoInfo`] is dropped.

use std::io;
use std::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

use zeroize::Zeroize;

// The UAPI layouts (linux/tls.h): {u16 version, u16 cipher_type} then iv, key, salt, rec_seq.
const _: () = {
    assert!(size_of::<libc::tls_crypto_info>() == 4);
    assert!(size_of::<libc::tls12_crypto_info_aes_gcm_128>() == 4 + 8 + 16 + 4 + 8);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_128, iv) == 4);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_128, key) == 12);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_128, salt) == 28);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_128, rec_seq) == 32);
    assert!(size_of::<libc::tls12_crypto_info_aes_gcm_256>() == 4 + 8 + 32 + 4 + 8);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_256, iv) == 4);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_256, key) == 12);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_256, salt) == 44);
    assert!(offset_of!(libc::tls12_crypto_info_aes_gcm_256, rec_seq) == 48);
    assert!(size_of::<libc::tls12_crypto_info_chacha20_poly1305>() == 4 + 12 + 32 + 8);
    assert!(offset_of!(libc::tls12_crypto_info_chacha20_poly1305, iv) == 4);
    assert!(offset_of!(libc::tls12_crypto_info_chacha20_poly1305, key) == 16);
    assert!(offset_of!(libc::tls12_crypto_info_chacha20_poly1305, rec_seq) == 48);
    assert!(libc::SOL_TLS == 282);
    assert!(libc::TLS_TX == 1 && libc::TLS_RX == 2);
    assert!(libc::TLS_1_2_VERSION == 0x0303 && libc::TLS_1_3_VERSION == 0x0304);
    assert!(libc::TLS_CIPHER_AES_GCM_128 == 51);
    assert!(libc::TLS_CIPHER_AES_GCM_256 == 52);
    assert!(libc::TLS_CIPHER_CHACHA20_POLY1305 == 54);
    assert!(libc::TLS_SET_RECORD_TYPE == 1);
};

/// `SOL_TCP` socket option that attaches an upper-layer protocol (`linux/tcp.h`).
const TCP_ULP: libc::c_int = 31;
/// TLS record content type of an alert (RFC 8446 §5.1).
const CONTENT_TYPE_ALERT: u8 = 21;
/// The close_notify alert: level warning (1), description close_notify (0).
const CLOSE_NOTIFY_ALERT: [u8; 2] = [1, 0];

/// Length of the full per-direction IV/nonce base TLS uses for these AEADs.
pub const IV_BYTES: usize = 12;

/// TLS protocol version of a session handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KtlsVersion {
    /// TLS 1.2 (RFC 5246).
    Tls12,
    /// TLS 1.3 (RFC 8446).
    Tls13,
}

impl KtlsVersion {
    fn uapi(self) -> u16 {
        match self {
            KtlsVersion::Tls12 => libc::TLS_1_2_VERSION,
            KtlsVersion::Tls13 => libc::TLS_1_3_VERSION,
        }
    }
}

/// Record protection of a session handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KtlsCipher {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305,
}

impl KtlsCipher {
    /// Key length in bytes.
    pub fn key_bytes(self) -> usize {
        match self {
            KtlsCipher::Aes128Gcm => 16,
            KtlsCipher::Aes256Gcm | KtlsCipher::Chacha20Poly1305 => 32,
        }
    }
}

/// Which side of the socket a [`CryptoInfo`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sending (`TLS_TX`).
    Transmit,
    /// Receiving (`TLS_RX`).
    Receive,
}

/// Errors building a [`CryptoInfo`] (a programmer or library mismatch, not an OS error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoInfoError {
    /// The key length does not match the cipher.
    #[error("{cipher:?} needs a {expected}-byte key, got {got}")]
    KeyLength {
        /// The cipher.
        cipher: KtlsCipher,
        /// Its key length.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// The IV is not 12 bytes.
    #[error("the IV must be {IV_BYTES} bytes, got {0}")]
    IvLength(usize),
}

/// One direction's keys for the kernel, in the layout of `struct tls12_crypto_info_*`.
pub struct CryptoInfo {
    inner: Inner,
}

enum Inner {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl std::fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CryptoInfo")
            .field("version", &self.version())
            .field("cipher_type", &self.cipher_type())
            .field("bytes", &self.as_bytes().len())
            .finish()
    }
}

impl CryptoInfo {
    /// Builds one direction's crypto info.
    ///
    /// `iv` is the 12-byte nonce base as TLS defines it: for AES-GCM the 4-byte implicit salt
    /// followed by 8 bytes the kernel uses as the (TLS 1.2) explicit nonce counter or the
    /// (TLS 1.3) rest of the static IV; for ChaCha20-Poly1305 the whole IV. `seq` is the
    /// sequence number of the next record in this direction.
    pub fn new(
        version: KtlsVersion,
        cipher: KtlsCipher,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<CryptoInfo, CryptoInfoError> {
        if key.len() != cipher.key_bytes() {
            return Err(CryptoInfoError::KeyLength {
                cipher,
                expected: cipher.key_bytes(),
                got: key.len(),
            });
        }
        if iv.len() != IV_BYTES {
            return Err(CryptoInfoError::IvLength(iv.len()));
        }
        let rec_seq = seq.to_be_bytes();
        let header = |cipher_type| libc::tls_crypto_info {
            version: version.uapi(),
            cipher_type,
        };
        let inner = match cipher {
            KtlsCipher::Aes128Gcm => Inner::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: header(libc::TLS_CIPHER_AES_GCM_128),
                iv: iv[4..].try_into().expect("8 bytes"),
                key: key.try_into().expect("length checked"),
                salt: iv[..4].try_into().expect("4 bytes"),
                rec_seq,
            }),
            KtlsCipher::Aes256Gcm => Inner::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: header(libc::TLS_CIPHER_AES_GCM_256),
                iv: iv[4..].try_into().expect("8 bytes"),
                key: key.try_into().expect("length checked"),
                salt: iv[..4].try_into().expect("4 bytes"),
                rec_seq,
            }),
            KtlsCipher::Chacha20Poly1305 => {
                Inner::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: header(libc::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: iv.try_into().expect("length checked"),
                    key: key.try_into().expect("length checked"),
                    salt: [],
                    rec_seq,
                })
            }
        };
        Ok(CryptoInfo { inner })
    }

    /// The UAPI `version` field.
    pub fn version(&self) -> u16 {
        match &self.inner {
            Inner::Aes128Gcm(info) => info.info.version,
            Inner::Aes256Gcm(info) => info.info.version,
            Inner::Chacha20Poly1305(info) => info.info.version,
        }
    }

    /// The UAPI `cipher_type` field.
    pub fn cipher_type(&self) -> u16 {
        match &self.inner {
            Inner::Aes128Gcm(info) => info.info.cipher_type,
            Inner::Aes256Gcm(info) => info.info.cipher_type,
            Inner::Chacha20Poly1305(info) => info.info.cipher_type,
        }
    }

    /// The struct exactly as `setsockopt` passes it to the kernel.
    pub fn as_bytes(&self) -> &[u8] {
        let (pointer, len): (*const u8, usize) = match &self.inner {
            Inner::Aes128Gcm(info) => ((info as *const _ as *const u8), size_of_val(info)),
            Inner::Aes256Gcm(info) => ((info as *const _ as *const u8), size_of_val(info)),
            Inner::Chacha20Poly1305(info) => ((info as *const _ as *const u8), size_of_val(info)),
        };
        // SAFETY: the pointer and length describe one live, fully initialised `repr(C)` libc
        // struct owned by `self` (the const asserts above prove it has no padding: its size is
        // the sum of its byte-array fields plus the 4-byte header), borrowed for `&self`.
        unsafe { std::slice::from_raw_parts(pointer, len) }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::Aes128Gcm(info) => {
                info.key.zeroize();
                info.iv.zeroize();
                info.salt.zeroize();
            }
            Inner::Aes256Gcm(info) => {
                info.key.zeroize();
                info.iv.zeroize();
                info.salt.zeroize();
            }
            Inner::Chacha20Poly1305(info) => {
                info.key.zeroize();
                info.iv.zeroize();
            }
        }
    }
}

/// Attaches the `tls` upper-layer protocol to a connected TCP socket (`TCP_ULP "tls"`).
///
/// `ENOENT` means the kernel has no `tls` module (`CONFIG_TLS` unset, or `modprobe tls` not
/// possible); the socket is unchanged then.
pub fn enable(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: the option value points to a live 3-byte local and the length says 3; the
    // kernel copies it during the call. A bad fd yields EBADF.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs one direction's keys on a socket that went through [`enable`].
pub fn set_crypto(fd: RawFd, direction: Direction, info: &CryptoInfo) -> io::Result<()> {
    let name = match direction {
        Direction::Transmit => libc::TLS_TX,
        Direction::Receive => libc::TLS_RX,
    };
    let bytes = info.as_bytes();
    // SAFETY: the option value is `info`'s bytes (a live `repr(C)` UAPI struct borrowed for
    // the call) with their exact length; the kernel copies them before returning.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            name,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends a close_notify alert as its own record on a socket whose `TLS_TX` is in the kernel
/// (a `sendmsg` with a `TLS_SET_RECORD_TYPE` control message). Best effort and non-blocking;
/// only meaningful on kTLS sockets (on a plain socket it would send two raw bytes).
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    // Control buffer for one cmsg carrying one byte; u64 array for cmsghdr alignment.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    assert!(space <= size_of_val(&control));
    let mut payload = CLOSE_NOTIFY_ALERT;
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one cmsg with one byte of data
    // (asserted above), so CMSG_FIRSTHDR is non-null and CMSG_DATA stays inside `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null());
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = CONTENT_TYPE_ALERT;
    }
    // SAFETY: every pointer in `msg` refers to a live local (`iov` -> `payload`, `control`)
    // that outlives the call; the kernel only reads them.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What this kernel's TLS offload supports (see [`probe`]).
#[derive(Debug, Clone)]
pub enum KtlsSupport {
    /// The `tls` ULP could not be attached; `reason` says why (for one log line).
    Unavailable {
        /// Why kTLS is not used, with the fix if there is one.
        reason: String,
    },
    /// The `tls` ULP works; these (version, cipher) pairs accepted keys in both directions.
    Available {
        /// Supported pairs.
        pairs: Vec<(KtlsVersion, KtlsCipher)>,
    },
}

impl KtlsSupport {
    /// Whether the kernel accepts keys for this version and cipher.
    pub fn supports(&self, version: KtlsVersion, cipher: KtlsCipher) -> bool {
        match self {
            KtlsSupport::Unavailable { .. } => false,
            KtlsSupport::Available { pairs } => pairs.contains(&(version, cipher)),
        }
    }
}

/// Every (version, cipher) pair ringbd can hand to the kernel.
pub const ALL_PAIRS: [(KtlsVersion, KtlsCipher); 6] = [
    (KtlsVersion::Tls13, KtlsCipher::Aes128Gcm),
    (KtlsVersion::Tls13, KtlsCipher::Aes256Gcm),
    (KtlsVersion::Tls13, KtlsCipher::Chacha20Poly1305),
    (KtlsVersion::Tls12, KtlsCipher::Aes128Gcm),
    (KtlsVersion::Tls12, KtlsCipher::Aes256Gcm),
    (KtlsVersion::Tls12, KtlsCipher::Chacha20Poly1305),
];

/// Probes kernel TLS once per process (cached): attaches the ULP to a loopback TCP pair and
/// installs throw-away keys for every pair in [`ALL_PAIRS`].
pub fn probe() -> &'static KtlsSupport {
    static SUPPORT: OnceLock<KtlsSupport> = OnceLock::new();
    SUPPORT.get_or_init(probe_now)
}

fn probe_now() -> KtlsSupport {
    let first = match loopback_pair() {
        Ok(pair) => pair,
        Err(error) => {
            return KtlsSupport::Unavailable {
                reason: format!("cannot open a loopback TCP pair to probe kernel TLS: {error}"),
            };
        }
    };
    if let Err(error) = enable(first.0.as_raw_fd()) {
        return KtlsSupport::Unavailable {
            reason: explain_enable_error(&error),
        };
    }
    let mut pairs = Vec::new();
    for (version, cipher) in ALL_PAIRS {
        if probe_pair(version, cipher).is_ok() {
            pairs.push((version, cipher));
        }
    }
    if pairs.is_empty() {
        return KtlsSupport::Unavailable {
            reason: "the kernel tls module accepts none of AES-128-GCM, AES-256-GCM, \
                     ChaCha20-Poly1305 (crypto modules missing?)"
                .to_string(),
        };
    }
    KtlsSupport::Available { pairs }
}

/// One line saying why `TCP_ULP "tls"` failed, naming the fix.
pub fn explain_enable_error(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENOENT) => format!(
            "setsockopt(TCP_ULP, \"tls\") failed: {error}: the kernel has no tls module \
             (CONFIG_TLS unset or tls.ko not loadable; try `modprobe tls`)"
        ),
        Some(libc::ENOPROTOOPT) => format!(
            "setsockopt(TCP_ULP) failed: {error}: this kernel has no upper-layer protocol support"
        ),
        _ => format!("setsockopt(TCP_ULP, \"tls\") failed: {error}"),
    }
}

fn probe_pair(version: KtlsVersion, cipher: KtlsCipher) -> io::Result<()> {
    let (a, _b) = loopback_pair()?;
    enable(a.as_raw_fd())?;
    let key = vec![0x5au8; cipher.key_bytes()];
    let iv = [0xa5u8; IV_BYTES];
    let info = CryptoInfo::new(version, cipher, &key, &iv, 0)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    set_crypto(a.as_raw_fd(), Direction::Transmit, &info)?;
    set_crypto(a.as_raw_fd(), Direction::Receive, &info)
}

/// A connected loopback TCP pair (the ULP needs an established TCP socket).
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((server, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_gcm_layout_matches_uapi() {
        let key: Vec<u8> = (0..16).collect();
        let iv: Vec<u8> = (100..112).collect();
        let info =
            CryptoInfo::new(KtlsVersion::Tls13, KtlsCipher::Aes128Gcm, &key, &iv, 0x0102).unwrap();
        let bytes = info.as_bytes();
        assert_eq!(bytes.len(), 40);
        // version 0x0304 and cipher 51 in host (little-endian) order.
        assert_eq!(&bytes[0..4], &[0x04, 0x03, 51, 0]);
        assert_eq!(&bytes[4..12], &iv[4..]);
        assert_eq!(&bytes[12..28], &key[..]);
        assert_eq!(&bytes[28..32], &iv[..4]);
        assert_eq!(&bytes[32..40], &0x0102u64.to_be_bytes());
    }

    #[test]
    fn aes256_gcm_and_chacha_layouts_match_uapi() {
        let key = [7u8; 32];
        let iv: Vec<u8> = (0..12).collect();
        let info =
            CryptoInfo::new(KtlsVersion::Tls12, KtlsCipher::Aes256Gcm, &key, &iv, 9).unwrap();
        let bytes = info.as_bytes();
        assert_eq!(bytes.len(), 56);
        assert_eq!(&bytes[0..4], &[0x03, 0x03, 52, 0]);
        assert_eq!(&bytes[4..12], &iv[4..]);
        assert_eq!(&bytes[12..44], &key[..]);
        assert_eq!(&bytes[44..48], &iv[..4]);
        assert_eq!(&bytes[48..56], &9u64.to_be_bytes());

        let info = CryptoInfo::new(
            KtlsVersion::Tls13,
            KtlsCipher::Chacha20Poly1305,
            &key,
            &iv,
            1,
        )
        .unwrap();
        let bytes = info.as_bytes();
        assert_eq!(bytes.len(), 56);
        assert_eq!(&bytes[0..4], &[0x04, 0x03, 54, 0]);
        assert_eq!(&bytes[4..16], &iv[..]);
        assert_eq!(&bytes[16..48], &key[..]);
        assert_eq!(&bytes[48..56], &1u64.to_be_bytes());
        assert_eq!(info.version(), 0x0304);
        assert_eq!(info.cipher_type(), 54);
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let error = CryptoInfo::new(
            KtlsVersion::Tls13,
            KtlsCipher::Aes256Gcm,
            &[0; 16],
            &[0; 12],
            0,
        )
        .unwrap_err();
        assert_eq!(
            error,
            CryptoInfoError::KeyLength {
                cipher: KtlsCipher::Aes256Gcm,
                expected: 32,
                got: 16
            }
        );
        let error = CryptoInfo::new(
            KtlsVersion::Tls13,
            KtlsCipher::Aes128Gcm,
            &[0; 16],
            &[0; 8],
            0,
        )
        .unwrap_err();
        assert_eq!(error, CryptoInfoError::IvLength(8));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let info = CryptoInfo::new(
            KtlsVersion::Tls13,
            KtlsCipher::Aes128Gcm,
            &[0xab; 16],
            &[0; 12],
            0,
        )
        .unwrap();
        let text = format!("{info:?}");
        assert!(!text.contains("171"), "{text}");
        assert!(!text.to_lowercase().contains("ab, "), "{text}");
    }

    #[test]
    fn probe_agrees_with_a_direct_attempt() {
        // Whatever this kernel is, the cached probe must agree with a fresh attempt.
        let (a, _b) = loopback_pair().unwrap();
        let direct = enable(a.as_raw_fd());
        match probe() {
            KtlsSupport::Unavailable { reason } => {
                let error = direct.expect_err("probe said unavailable but the ULP attached");
                assert!(reason.contains("TCP_ULP"), "{reason}");
                if error.raw_os_error() == Some(libc::ENOENT) {
                    assert!(reason.contains("no tls module"), "{reason}");
                }
            }
            KtlsSupport::Available { pairs } => {
                direct.expect("probe said available but the ULP failed");
                assert!(!pairs.is_empty());
            }
        }
    }
}
