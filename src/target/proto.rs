//! NBD wire constants, named as in the specification (`doc/proto.md` of NetworkBlockDevice/nbd
//! and its `extension-ext-header` branch), the wire error enum [`NbdErrno`] and every limit the
//! protocol layer enforces.
//!
//! # Contract
//!
//! * Every value that travels on the wire is big-endian; the constants here are host values.
//! * Constant names keep the spec's `NBD_` names verbatim so that a grep for a spec name lands
//!   here. Types follow the field width on the wire (`u16` flags, `u32` option numbers, ...).
//! * Limits are named with their unit last (`NAME_BYTES_MAX`) and every one is enforced by
//!   `handshake`, `codec` or `validate`; nothing else in the protocol layer is unbounded.

// ---------------------------------------------------------------------------------------------
// Handshake magics and flags.

/// `NBDMAGIC`: first 8 bytes of the server greeting (ASCII "NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second magic of the newstyle greeting and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply (`0x3e889045565a9`).
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Oldstyle `cliserv_magic`; never sent by ringbd (oldstyle is refused), kept for completeness.
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Handshake flag: the server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Options (client -> server during haggling).

/// Choose an export and enter transmission (no error reply possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during haggling.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension; answered `NBD_REP_ERR_UNSUP` like any unknown option.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Use structured replies in transmission.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Use 32-byte extended request and reply headers (extension-ext-header).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types (server -> client during haggling).

/// Bit 31 marks an error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option succeeded; final reply.
pub const NBD_REP_ACK: u32 = 1;
/// One export in answer to `NBD_OPT_LIST`: u32 name length, name, optional description.
pub const NBD_REP_SERVER: u32 = 2;
/// One `NBD_INFO_*` item in answer to `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context: u32 id, name.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// The option is unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// The option is forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The requested export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` before `NBD_OPT_GO`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or the reply is too large to process.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers are required (or were negotiated and cannot be downgraded).
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------------------------
// NBD_REP_INFO item types (u16).

/// u64 export size + u16 transmission flags (mandatory before a successful ACK).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// u32 minimum, u32 preferred, u32 maximum block size.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission flags (u16, sent with the export size).

/// Always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads (only with structured or extended replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent image.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported (extension-resize; never advertised by ringbd).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported (only with `NBD_FLAG_SEND_WRITE_ZEROES`).
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_CMD_BLOCK_STATUS` accepts a payload (extension-ext-header; never advertised).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Transmission magics.

/// Compact (28-byte) request header magic.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request header magic.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple (16-byte) reply magic.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured (20-byte) reply chunk magic.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended (32-byte) reply chunk magic.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Commands (u16 request type).

/// Read `length` bytes at `offset`.
pub const NBD_CMD_READ: u16 = 0;
/// Write the payload at `offset`.
pub const NBD_CMD_WRITE: u16 = 1;
/// Soft disconnect; no reply.
pub const NBD_CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard a range (hint).
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch a range (advisory).
pub const NBD_CMD_CACHE: u16 = 5;
/// Zero a range without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata (e.g. `base:allocation`) of a range.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Resize the export (extension-resize; never advertised, always rejected).
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------------------------
// Command flags (u16).

/// Force unit access: reply only once the data is durable.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`: do not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_READ`: do not fragment the reply (at most one content chunk).
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS`: exactly one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES`: fail fast with `NBD_ENOTSUP` unless zeroing is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: `length` is a payload length and that many bytes follow the header.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Every command flag the specification defines.
pub const NBD_CMD_FLAGS_KNOWN: u16 = NBD_CMD_FLAG_FUA
    | NBD_CMD_FLAG_NO_HOLE
    | NBD_CMD_FLAG_DF
    | NBD_CMD_FLAG_REQ_ONE
    | NBD_CMD_FLAG_FAST_ZERO
    | NBD_CMD_FLAG_PAYLOAD_LEN;

// ---------------------------------------------------------------------------------------------
// Structured / extended reply chunks.

/// Reply flag: this is the final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Bit 15 of a chunk type marks an error chunk.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Empty chunk; always with `NBD_REPLY_FLAG_DONE`.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// u64 offset followed by data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// u64 offset, u32 hole size: the range reads as zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// u32 context id followed by `{u32 length, u32 flags}` descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// u32 context id, u32 count, then `{u64 length, u64 flags}` descriptors (extended headers).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// u32 error, u16 message length, message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// u32 error, u16 message length, message, u64 offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------------
// Metadata contexts.

/// Name of the only metadata context ringbd implements.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The `base:` namespace query: a wildcard in `NBD_OPT_LIST_META_CONTEXT`, ignored in SET.
pub const BASE_NAMESPACE: &str = "base:";
/// `base:allocation` flag: the extent is a hole (unallocated).
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Fixed wire sizes.

/// Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Client flags that answer the greeting.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Option header: IHAVEOPT, u32 option, u32 length.
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Option reply header: magic, u32 option, u32 reply type, u32 length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Reserved zeroes after the `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Simple reply: magic, u32 error, u64 cookie.
pub const SIMPLE_REPLY_BYTES: usize = 4 + 4 + 8;
/// Structured reply chunk header: magic, u16 flags, u16 type, u64 cookie, u32 length.
pub const STRUCTURED_REPLY_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// Extended reply chunk header: magic, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
pub const EXTENDED_REPLY_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 8;

// ---------------------------------------------------------------------------------------------
// Limits.

/// Longest string (export name, description, context name, query) on the wire, in bytes.
pub const NAME_BYTES_MAX: usize = 4096;
/// Most queries accepted in one `NBD_OPT_{LIST,SET}_META_CONTEXT`; more get `ERR_TOO_BIG`.
pub const META_CONTEXT_QUERIES_MAX: usize = 16;
/// Largest option payload that is buffered and parsed, in bytes: an option header plus this
/// fit a 64 KiB receive buffer (`handshake::HANDSHAKE_INPUT_BYTES_MAX`). That is room for a
/// maximal export name plus 14 maximal meta-context queries, far more than real clients send.
/// Larger payloads are skipped without buffering and answered with an error (see
/// `handshake`).
pub const OPTION_BYTES_MAX: usize = 64 * 1024 - OPTION_HEADER_BYTES;
/// Options accepted on one connection; the next one closes it (denial of service).
pub const OPTIONS_COUNT_MAX: u32 = 64;
/// Largest READ or WRITE payload, in bytes (2^25, the spec's portable limit). A WRITE payload
/// above this cannot be drained cheaply and closes the connection.
pub const PAYLOAD_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most extents in one `NBD_CMD_BLOCK_STATUS` reply chunk (the spec suggests at most 2^20).
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;

const _: () = assert!(GREETING_BYTES == 18);
const _: () = assert!(OPTION_HEADER_BYTES == 16);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 20);
const _: () = assert!(SIMPLE_REPLY_BYTES == 16);
const _: () = assert!(STRUCTURED_REPLY_BYTES == 20);
const _: () = assert!(EXTENDED_REPLY_BYTES == 32);
const _: () = assert!(OPTION_BYTES_MAX < u32::MAX as usize);
// A maximal NBD_OPT_INFO/GO (name, many info requests) and a meta-context option with a
// maximal name and several maximal queries are always buffered.
const _: () = assert!(OPTION_BYTES_MAX >= 4 + NAME_BYTES_MAX + 4 + 8 * (4 + NAME_BYTES_MAX));
const _: () = assert!(PAYLOAD_BYTES_MAX.is_power_of_two());
const _: () = assert!(NBD_OPT_INFO != NBD_OPT_GO);

// ---------------------------------------------------------------------------------------------
// Errors.

/// The error values allowed in NBD replies (`NBD_E*`). Discriminants are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    /// `NBD_EPERM`: operation not permitted (e.g. write to a read-only export).
    Perm = 1,
    /// `NBD_EIO`: input/output error; the default for unmapped errors.
    Io = 5,
    /// `NBD_ENOMEM`: out of memory (the spec asks servers to avoid it).
    NoMem = 12,
    /// `NBD_EINVAL`: invalid argument (bad flags, range, alignment, unknown command).
    Inval = 22,
    /// `NBD_ENOSPC`: no space left (also write beyond the end, EDQUOT, EFBIG).
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: value too large (DF reads that cannot be sent unfragmented).
    Overflow = 75,
    /// `NBD_ENOTSUP`: operation not supported (only for `NBD_CMD_FLAG_FAST_ZERO`).
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown = 108,
}

impl NbdErrno {
    /// Maps a Linux errno to the NBD error a client understands, like nbdkit's `nbd_errno()`:
    /// EPERM/EROFS -> Perm, ENOSPC/EDQUOT/EFBIG -> NoSpc, EINVAL -> Inval, EOVERFLOW ->
    /// Overflow, EOPNOTSUPP/ENOTSUP -> NotSup, ESHUTDOWN -> Shutdown, ENOMEM -> NoMem and
    /// everything else -> Io. The sign is ignored, so a negative CQE result maps directly.
    pub fn from_errno(errno: i32) -> NbdErrno {
        let errno = i32::try_from(errno.unsigned_abs()).unwrap_or(i32::MAX);
        if errno == libc::EPERM || errno == libc::EROFS {
            NbdErrno::Perm
        } else if errno == libc::ENOSPC || errno == libc::EDQUOT || errno == libc::EFBIG {
            NbdErrno::NoSpc
        } else if errno == libc::EINVAL {
            NbdErrno::Inval
        } else if errno == libc::EOVERFLOW {
            NbdErrno::Overflow
        } else if errno == libc::EOPNOTSUPP || errno == libc::ENOTSUP {
            NbdErrno::NotSup
        } else if errno == libc::ESHUTDOWN {
            NbdErrno::Shutdown
        } else if errno == libc::ENOMEM {
            NbdErrno::NoMem
        } else {
            NbdErrno::Io
        }
    }

    /// The wire value of this error.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error for a wire value, or `None` if the value is not an `NBD_E*` code (clients
    /// should then treat it as `Inval`).
    pub fn from_code(code: u32) -> Option<NbdErrno> {
        let errno = match code {
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            22 => NbdErrno::Inval,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            _ => return None,
        };
        Some(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [NbdErrno; 8] = [
        NbdErrno::Perm,
        NbdErrno::Io,
        NbdErrno::NoMem,
        NbdErrno::Inval,
        NbdErrno::NoSpc,
        NbdErrno::Overflow,
        NbdErrno::NotSup,
        NbdErrno::Shutdown,
    ];

    #[test]
    fn wire_values_match_the_spec() {
        let codes: Vec<u32> = ALL.iter().map(|errno| errno.code()).collect();
        assert_eq!(codes, [1, 5, 12, 22, 28, 75, 95, 108]);
        for errno in ALL {
            assert_eq!(NbdErrno::from_code(errno.code()), Some(errno));
        }
        assert_eq!(NbdErrno::from_code(0), None);
        assert_eq!(NbdErrno::from_code(2), None);
    }

    #[test]
    fn linux_errnos_map_like_nbd_errno() {
        let table = [
            (libc::EPERM, NbdErrno::Perm),
            (libc::EROFS, NbdErrno::Perm),
            (libc::ENOSPC, NbdErrno::NoSpc),
            (libc::EDQUOT, NbdErrno::NoSpc),
            (libc::EFBIG, NbdErrno::NoSpc),
            (libc::EINVAL, NbdErrno::Inval),
            (libc::EOVERFLOW, NbdErrno::Overflow),
            (libc::EOPNOTSUPP, NbdErrno::NotSup),
            (libc::ENOTSUP, NbdErrno::NotSup),
            (libc::ESHUTDOWN, NbdErrno::Shutdown),
            (libc::ENOMEM, NbdErrno::NoMem),
            (libc::EIO, NbdErrno::Io),
            (libc::EAGAIN, NbdErrno::Io),
            (libc::EBADF, NbdErrno::Io),
            (0, NbdErrno::Io),
            (i32::MAX, NbdErrno::Io),
        ];
        for (errno, expected) in table {
            assert_eq!(NbdErrno::from_errno(errno), expected, "errno {errno}");
            assert_eq!(NbdErrno::from_errno(-errno), expected, "errno -{errno}");
        }
        assert_eq!(NbdErrno::from_errno(i32::MIN), NbdErrno::Io);
    }

    #[test]
    fn magics_match_the_spec() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(NBD_REP_ERR_EXT_HEADER_REQD, 0x8000_000a);
        assert_eq!(NBD_REPLY_TYPE_ERROR, 0x8001);
        assert_eq!(NBD_REPLY_TYPE_ERROR_OFFSET, 0x8002);
        assert_eq!(NBD_CMD_FLAGS_KNOWN, 0x3f);
    }
}
