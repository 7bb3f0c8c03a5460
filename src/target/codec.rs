//! Transmission-phase codec: request headers in, reply headers out, as pure functions over
//! byte slices (sans-I/O).
//!
//! # Contract
//!
//! * [`decode_request`] never reads past `input` and never allocates. It reports how many
//!   header bytes it consumed; a WRITE's payload (or an extended request's
//!   `NBD_CMD_FLAG_PAYLOAD_LEN` payload) is *not* included: `validate` says how many payload
//!   bytes follow.
//! * Reply encoders return a [`ReplyHead`], a fixed array holding the reply header plus any
//!   small fixed payload prefix (e.g. `NBD_REPLY_TYPE_OFFSET_DATA`'s u64 offset). The caller
//!   sends [`ReplyHead::as_bytes`] and then its data, if any. Only
//!   [`reply_block_status`] writes a variable-length payload, into a caller-sized buffer
//!   (see [`block_status_reply_bytes`]).
//! * [`ReplyStyle`] selects the framing negotiated in the handshake: simple replies only,
//!   structured chunks (`NBD_OPT_STRUCTURED_REPLY`) or 32-byte extended chunks
//!   (`NBD_OPT_EXTENDED_HEADERS`, whose chunk header echoes the request offset).
//!
//! # Panics
//!
//! Encoders assert their preconditions (programmer errors, never client input): chunk types
//! that need structured replies are not requested in [`ReplyStyle::Simple`], content chunks
//! describe at least one byte, lengths fit the reply's length field and output buffers are
//! large enough.

use crate::target::proto::{
    BLOCK_STATUS_EXTENTS_MAX, EXTENDED_REPLY_BYTES, NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, NbdErrno, SIMPLE_REPLY_BYTES,
    STRUCTURED_REPLY_BYTES,
};

/// Size of a compact request header (`NBD_REQUEST_MAGIC`), in bytes.
pub const REQUEST_BYTES: usize = 28;
/// Size of an extended request header (`NBD_EXTENDED_REQUEST_MAGIC`), in bytes.
pub const EXTENDED_REQUEST_BYTES: usize = 32;
/// Capacity of a [`ReplyHead`], in bytes.
pub const REPLY_HEAD_BYTES_MAX: usize = 64;
/// Largest extent length sent in a compact `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor: the
/// largest u32 that is a multiple of every legal minimum block size (2^16 at most).
pub const BLOCK_STATUS_EXTENT_BYTES_MAX: u64 = 0xffff_0000;

/// Payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: u64 offset, u32 hole size.
const OFFSET_HOLE_PAYLOAD_BYTES: usize = 8 + 4;
/// Payload of an `NBD_REPLY_TYPE_ERROR` chunk without a message: u32 error, u16 length.
const ERROR_PAYLOAD_BYTES: usize = 4 + 2;
/// Payload of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk without a message: error, length, offset.
const ERROR_OFFSET_PAYLOAD_BYTES: usize = 4 + 2 + 8;
/// Fixed prefix of an `NBD_REPLY_TYPE_OFFSET_DATA` payload: the u64 offset.
const OFFSET_DATA_PREFIX_BYTES: usize = 8;
/// Fixed prefix of `NBD_REPLY_TYPE_BLOCK_STATUS`: u32 context id.
const BLOCK_STATUS_PREFIX_BYTES: usize = 4;
/// Fixed prefix of `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: u32 context id, u32 descriptor count.
const BLOCK_STATUS_EXT_PREFIX_BYTES: usize = 4 + 4;
/// One compact block status descriptor: u32 length, u32 flags.
const BLOCK_STATUS_DESCRIPTOR_BYTES: usize = 4 + 4;
/// One extended block status descriptor: u64 length, u64 flags.
const BLOCK_STATUS_EXT_DESCRIPTOR_BYTES: usize = 8 + 8;

const _: () = assert!(EXTENDED_REPLY_BYTES + ERROR_OFFSET_PAYLOAD_BYTES <= REPLY_HEAD_BYTES_MAX);
const _: () = assert!(EXTENDED_REPLY_BYTES + OFFSET_HOLE_PAYLOAD_BYTES <= REPLY_HEAD_BYTES_MAX);
const _: () = assert!(REPLY_HEAD_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(BLOCK_STATUS_EXTENT_BYTES_MAX.is_multiple_of(1 << 16));

/// A transmission request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub command: u16,
    /// Opaque cookie (formerly "handle") echoed in every reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Effect length, or payload length for WRITE / `NBD_CMD_FLAG_PAYLOAD_LEN` (u32 on the
    /// wire in compact requests, u64 in extended ones).
    pub length: u64,
}

/// Why bytes could not be decoded. Any of these is a framing error: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The request header does not start with this connection's request magic.
    #[error("bad request magic {found:#x}")]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// A reply header starts with none of the simple, structured or extended reply magics.
    #[error("bad reply magic {found:#x}")]
    BadReplyMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
}

/// Decodes one request header from the start of `input`.
///
/// Returns `Ok(None)` if more bytes are needed, or `Ok(Some((request, consumed)))` where
/// `consumed` counts header bytes only (28 compact, 32 extended). With `extended` only
/// `NBD_EXTENDED_REQUEST_MAGIC` is accepted, otherwise only `NBD_REQUEST_MAGIC`. A wrong
/// magic is reported as soon as its four bytes are present.
pub fn decode_request(
    input: &[u8],
    extended: bool,
) -> Result<Option<(Request, usize)>, DecodeError> {
    let (magic, header_bytes) = if extended {
        (NBD_EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_BYTES)
    } else {
        (NBD_REQUEST_MAGIC, REQUEST_BYTES)
    };
    if input.len() >= 4 {
        let found = be_u32(input, 0);
        if found != magic {
            return Err(DecodeError::BadMagic { found });
        }
    }
    if input.len() < header_bytes {
        return Ok(None);
    }
    let length = if extended {
        be_u64(input, 24)
    } else {
        u64::from(be_u32(input, 24))
    };
    let request = Request {
        flags: be_u16(input, 4),
        command: be_u16(input, 6),
        cookie: be_u64(input, 8),
        offset: be_u64(input, 16),
        length,
    };
    Ok(Some((request, header_bytes)))
}

/// Encodes a request header into `out` (for clients, tests and benches); returns the bytes
/// written (28 compact, 32 extended).
///
/// # Panics
///
/// If `out` is too small, or a compact request's length does not fit in 32 bits.
pub fn encode_request(request: &Request, extended: bool, out: &mut [u8]) -> usize {
    let header_bytes = if extended {
        EXTENDED_REQUEST_BYTES
    } else {
        REQUEST_BYTES
    };
    assert!(out.len() >= header_bytes, "request buffer too small");
    let magic = if extended {
        NBD_EXTENDED_REQUEST_MAGIC
    } else {
        NBD_REQUEST_MAGIC
    };
    out[0..4].copy_from_slice(&magic.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_be_bytes());
    out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    if extended {
        out[24..32].copy_from_slice(&request.length.to_be_bytes());
    } else {
        let length = u32::try_from(request.length).expect("compact request length fits u32");
        out[24..28].copy_from_slice(&length.to_be_bytes());
    }
    header_bytes
}

/// How replies are framed on this connection (from negotiation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Neither structured replies nor extended headers: 16-byte simple replies only.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte structured chunks (simple replies never used here).
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte extended chunks; simple replies are forbidden.
    Extended,
}

/// A reply header plus any small fixed payload prefix, in a fixed array (no allocation).
#[derive(Debug, Clone, Copy)]
pub struct ReplyHead {
    bytes: [u8; REPLY_HEAD_BYTES_MAX],
    len: u8,
}

impl ReplyHead {
    fn new() -> ReplyHead {
        ReplyHead {
            bytes: [0; REPLY_HEAD_BYTES_MAX],
            len: 0,
        }
    }

    fn put(&mut self, value: &[u8]) {
        let start = usize::from(self.len);
        let end = start + value.len();
        assert!(end <= REPLY_HEAD_BYTES_MAX, "reply head overflow");
        self.bytes[start..end].copy_from_slice(value);
        self.len = u8::try_from(end).expect("REPLY_HEAD_BYTES_MAX fits u8");
    }

    /// The encoded bytes to send (followed by data for READ replies).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

fn simple_reply(cookie: u64, error: u32) -> ReplyHead {
    let mut head = ReplyHead::new();
    head.put(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    head.put(&error.to_be_bytes());
    head.put(&cookie.to_be_bytes());
    assert_eq!(head.as_bytes().len(), SIMPLE_REPLY_BYTES);
    head
}

/// A structured or extended chunk header whose payload is `payload_bytes` long.
fn chunk_header(
    style: ReplyStyle,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    request_offset: u64,
    payload_bytes: u64,
) -> ReplyHead {
    let mut head = ReplyHead::new();
    match style {
        ReplyStyle::Simple => panic!("chunk type {chunk_type:#x} needs structured replies"),
        ReplyStyle::Structured => {
            let length = u32::try_from(payload_bytes).expect("structured chunk length fits u32");
            head.put(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            head.put(&flags.to_be_bytes());
            head.put(&chunk_type.to_be_bytes());
            head.put(&cookie.to_be_bytes());
            head.put(&length.to_be_bytes());
            assert_eq!(head.as_bytes().len(), STRUCTURED_REPLY_BYTES);
        }
        ReplyStyle::Extended => {
            head.put(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
            head.put(&flags.to_be_bytes());
            head.put(&chunk_type.to_be_bytes());
            head.put(&cookie.to_be_bytes());
            head.put(&request_offset.to_be_bytes());
            head.put(&payload_bytes.to_be_bytes());
            assert_eq!(head.as_bytes().len(), EXTENDED_REPLY_BYTES);
        }
    }
    head
}

fn done_flag(done: bool) -> u16 {
    if done { NBD_REPLY_FLAG_DONE } else { 0 }
}

/// Success with no data (WRITE, FLUSH, TRIM, ...): a simple reply with error 0, or an
/// `NBD_REPLY_TYPE_NONE` chunk with DONE (the extended one carries `request_offset`).
pub fn reply_ok(style: ReplyStyle, cookie: u64, request_offset: u64) -> ReplyHead {
    match style {
        ReplyStyle::Simple => simple_reply(cookie, 0),
        _ => reply_done(style, cookie, request_offset),
    }
}

/// Failure of any command: a simple reply carrying `errno`, or an `NBD_REPLY_TYPE_ERROR`
/// chunk (error, empty message) with DONE.
pub fn reply_error(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    errno: NbdErrno,
) -> ReplyHead {
    if style == ReplyStyle::Simple {
        return simple_reply(cookie, errno.code());
    }
    let mut head = chunk_header(
        style,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        request_offset,
        ERROR_PAYLOAD_BYTES as u64,
    );
    head.put(&errno.code().to_be_bytes());
    head.put(&0u16.to_be_bytes());
    head
}

/// An `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (error at `error_offset`, empty message), DONE set
/// if `done`. Structured and extended styles only.
pub fn reply_error_offset(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    errno: NbdErrno,
    error_offset: u64,
    done: bool,
) -> ReplyHead {
    let mut head = chunk_header(
        style,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR_OFFSET,
        cookie,
        request_offset,
        ERROR_OFFSET_PAYLOAD_BYTES as u64,
    );
    head.put(&errno.code().to_be_bytes());
    head.put(&0u16.to_be_bytes());
    head.put(&error_offset.to_be_bytes());
    head
}

/// The header preceding `data_len` bytes of READ data at `offset`. Simple: a simple reply
/// with error 0 (the data follows; `offset` and `done` are not on the wire). Structured and
/// extended: an `NBD_REPLY_TYPE_OFFSET_DATA` chunk header plus its u64 offset, DONE if `done`.
///
/// # Panics
///
/// If a chunk would describe no data or its length would not fit the length field.
pub fn reply_read_data(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    data_len: u64,
    done: bool,
) -> ReplyHead {
    if style == ReplyStyle::Simple {
        return simple_reply(cookie, 0);
    }
    assert!(
        data_len > 0,
        "an OFFSET_DATA chunk describes at least one byte"
    );
    let payload_bytes = data_len
        .checked_add(OFFSET_DATA_PREFIX_BYTES as u64)
        .expect("OFFSET_DATA length overflows u64");
    let mut head = chunk_header(
        style,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        request_offset,
        payload_bytes,
    );
    head.put(&offset.to_be_bytes());
    head
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeroes.
///
/// # Panics
///
/// In [`ReplyStyle::Simple`], or if `hole_len` is 0 or does not fit in 32 bits.
pub fn reply_read_hole(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    hole_len: u64,
    done: bool,
) -> ReplyHead {
    assert!(
        style != ReplyStyle::Simple,
        "OFFSET_HOLE needs structured replies"
    );
    assert!(
        hole_len > 0,
        "an OFFSET_HOLE chunk describes at least one byte"
    );
    let hole_len = u32::try_from(hole_len).expect("OFFSET_HOLE size fits u32");
    let mut head = chunk_header(
        style,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        request_offset,
        OFFSET_HOLE_PAYLOAD_BYTES as u64,
    );
    head.put(&offset.to_be_bytes());
    head.put(&hole_len.to_be_bytes());
    head
}

/// An `NBD_REPLY_TYPE_NONE` chunk with DONE, ending a multi-chunk reply.
///
/// # Panics
///
/// In [`ReplyStyle::Simple`].
pub fn reply_done(style: ReplyStyle, cookie: u64, request_offset: u64) -> ReplyHead {
    assert!(
        style != ReplyStyle::Simple,
        "NONE chunk needs structured replies"
    );
    chunk_header(
        style,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        cookie,
        request_offset,
        0,
    )
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero; a multiple of the export's minimum block size).
    pub length: u64,
    /// Context-defined flags (`NBD_STATE_HOLE`, `NBD_STATE_ZERO` for `base:allocation`).
    pub flags: u32,
}

/// Bytes [`reply_block_status`] needs for `extents` descriptors in `style` (an upper bound:
/// it may write fewer, see there).
///
/// # Panics
///
/// In [`ReplyStyle::Simple`], which has no block status reply.
pub const fn block_status_reply_bytes(style: ReplyStyle, extents: usize) -> usize {
    match style {
        ReplyStyle::Simple => panic!("block status needs structured replies"),
        ReplyStyle::Structured => {
            STRUCTURED_REPLY_BYTES
                + BLOCK_STATUS_PREFIX_BYTES
                + extents * BLOCK_STATUS_DESCRIPTOR_BYTES
        }
        ReplyStyle::Extended => {
            EXTENDED_REPLY_BYTES
                + BLOCK_STATUS_EXT_PREFIX_BYTES
                + extents * BLOCK_STATUS_EXT_DESCRIPTOR_BYTES
        }
    }
}

/// Encodes a whole block status reply (chunk header and payload, DONE set) for one context
/// into `out` and returns the bytes written: `NBD_REPLY_TYPE_BLOCK_STATUS` in
/// [`ReplyStyle::Structured`], `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` in [`ReplyStyle::Extended`].
///
/// In the compact chunk an extent longer than [`BLOCK_STATUS_EXTENT_BYTES_MAX`] is clamped to
/// it and ends the list (later extents are dropped): the spec lets a server describe less than
/// was asked, and clamping inside the list would shift every later extent.
///
/// # Panics
///
/// In [`ReplyStyle::Simple`], with no extents, more than [`BLOCK_STATUS_EXTENTS_MAX`], a
/// zero-length extent, or `out` shorter than [`block_status_reply_bytes`].
pub fn reply_block_status(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    extents: &[Extent],
    out: &mut [u8],
) -> usize {
    assert!(
        !extents.is_empty(),
        "block status needs at least one extent"
    );
    assert!(
        extents.len() <= BLOCK_STATUS_EXTENTS_MAX,
        "too many extents"
    );
    assert!(
        out.len() >= block_status_reply_bytes(style, extents.len()),
        "buffer too small"
    );
    assert!(
        extents.iter().all(|extent| extent.length > 0),
        "zero-length extent"
    );
    let (head, payload_bytes) = if style == ReplyStyle::Extended {
        let count = u32::try_from(extents.len()).expect("extent count fits u32");
        let payload = &mut out[EXTENDED_REPLY_BYTES..];
        payload[0..4].copy_from_slice(&context_id.to_be_bytes());
        payload[4..8].copy_from_slice(&count.to_be_bytes());
        let mut at = BLOCK_STATUS_EXT_PREFIX_BYTES;
        for extent in extents {
            payload[at..at + 8].copy_from_slice(&extent.length.to_be_bytes());
            payload[at + 8..at + 16].copy_from_slice(&u64::from(extent.flags).to_be_bytes());
            at += BLOCK_STATUS_EXT_DESCRIPTOR_BYTES;
        }
        let head = chunk_header(
            style,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            request_offset,
            at as u64,
        );
        (head, at)
    } else {
        assert!(
            style == ReplyStyle::Structured,
            "block status needs structured replies"
        );
        let payload = &mut out[STRUCTURED_REPLY_BYTES..];
        payload[0..4].copy_from_slice(&context_id.to_be_bytes());
        let mut at = BLOCK_STATUS_PREFIX_BYTES;
        for extent in extents {
            let length = extent.length.min(BLOCK_STATUS_EXTENT_BYTES_MAX);
            let length = u32::try_from(length).expect("clamped extent fits u32");
            payload[at..at + 4].copy_from_slice(&length.to_be_bytes());
            payload[at + 4..at + 8].copy_from_slice(&extent.flags.to_be_bytes());
            at += BLOCK_STATUS_DESCRIPTOR_BYTES;
            if extent.length > BLOCK_STATUS_EXTENT_BYTES_MAX {
                break;
            }
        }
        let head = chunk_header(
            style,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            request_offset,
            at as u64,
        );
        (head, at)
    };
    let head = head.as_bytes();
    out[..head.len()].copy_from_slice(head);
    head.len() + payload_bytes
}

// ---------------------------------------------------------------------------------------------
// Reply decoding, for clients, tests and benches.

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// `NBD_SIMPLE_REPLY_MAGIC`; READ data follows when `error` is 0 (length known only from
    /// the request).
    Simple {
        /// `NBD_E*` error or 0.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// `NBD_STRUCTURED_REPLY_MAGIC` chunk; `length` payload bytes follow.
    Chunk {
        /// Reply flags (`NBD_REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type (`NBD_REPLY_TYPE_*`).
        chunk_type: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length in bytes.
        length: u32,
    },
    /// `NBD_EXTENDED_REPLY_MAGIC` chunk; `length` payload bytes follow.
    ExtendedChunk {
        /// Reply flags (`NBD_REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type (`NBD_REPLY_TYPE_*`).
        chunk_type: u16,
        /// The request's cookie.
        cookie: u64,
        /// The request's offset, echoed.
        offset: u64,
        /// Payload length in bytes.
        length: u64,
    },
}

impl ReplyHeader {
    /// The cookie of the request this reply answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. }
            | ReplyHeader::Chunk { cookie, .. }
            | ReplyHeader::ExtendedChunk { cookie, .. } => cookie,
        }
    }

    /// Payload bytes announced by the header (0 for simple replies, whose READ data length
    /// comes from the request).
    pub fn payload_bytes(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { .. } => 0,
            ReplyHeader::Chunk { length, .. } => u64::from(length),
            ReplyHeader::ExtendedChunk { length, .. } => length,
        }
    }

    /// Whether this is the last message of its reply (simple replies always are).
    pub fn is_done(&self) -> bool {
        match *self {
            ReplyHeader::Simple { .. } => true,
            ReplyHeader::Chunk { flags, .. } | ReplyHeader::ExtendedChunk { flags, .. } => {
                flags & NBD_REPLY_FLAG_DONE != 0
            }
        }
    }
}

/// Decodes one reply header (any of the three magics) from the start of `input`: `Ok(None)`
/// if more bytes are needed, else the header and the header bytes consumed.
pub fn decode_reply_header(input: &[u8]) -> Result<Option<(ReplyHeader, usize)>, DecodeError> {
    if input.len() < 4 {
        return Ok(None);
    }
    let magic = be_u32(input, 0);
    let header_bytes = match magic {
        NBD_SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_BYTES,
        NBD_STRUCTURED_REPLY_MAGIC => STRUCTURED_REPLY_BYTES,
        NBD_EXTENDED_REPLY_MAGIC => EXTENDED_REPLY_BYTES,
        found => return Err(DecodeError::BadReplyMagic { found }),
    };
    if input.len() < header_bytes {
        return Ok(None);
    }
    let header = match magic {
        NBD_SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be_u32(input, 4),
            cookie: be_u64(input, 8),
        },
        NBD_STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: be_u16(input, 4),
            chunk_type: be_u16(input, 6),
            cookie: be_u64(input, 8),
            length: be_u32(input, 16),
        },
        _ => ReplyHeader::ExtendedChunk {
            flags: be_u16(input, 4),
            chunk_type: be_u16(input, 6),
            cookie: be_u64(input, 8),
            offset: be_u64(input, 16),
            length: be_u64(input, 24),
        },
    };
    Ok(Some((header, header_bytes)))
}

/// The payload of an error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// `NBD_E*` error (nonzero).
    pub error: u32,
    /// Human-readable message (may be empty).
    pub message: &'a [u8],
    /// Offset of the failure (`NBD_REPLY_TYPE_ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

/// Decodes the payload of an `NBD_REPLY_TYPE_ERROR` or `NBD_REPLY_TYPE_ERROR_OFFSET` chunk;
/// `None` if `chunk_type` is neither or the payload is malformed.
pub fn decode_error_chunk(chunk_type: u16, payload: &[u8]) -> Option<ErrorChunk<'_>> {
    let trailer_bytes = match chunk_type {
        NBD_REPLY_TYPE_ERROR => 0,
        NBD_REPLY_TYPE_ERROR_OFFSET => 8,
        _ => return None,
    };
    if payload.len() < ERROR_PAYLOAD_BYTES {
        return None;
    }
    let error = be_u32(payload, 0);
    let message_bytes = usize::from(be_u16(payload, 4));
    let message_end = ERROR_PAYLOAD_BYTES + message_bytes;
    if error == 0 || payload.len() != message_end + trailer_bytes {
        return None;
    }
    let offset = (trailer_bytes > 0).then(|| be_u64(payload, message_end));
    Some(ErrorChunk {
        error,
        message: &payload[ERROR_PAYLOAD_BYTES..message_end],
        offset,
    })
}

/// Decodes the payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk into (offset, hole size).
pub fn decode_offset_hole(payload: &[u8]) -> Option<(u64, u32)> {
    if payload.len() != OFFSET_HOLE_PAYLOAD_BYTES {
        return None;
    }
    let hole_len = be_u32(payload, 8);
    (hole_len > 0).then(|| (be_u64(payload, 0), hole_len))
}

/// Decodes the offset prefix of an `NBD_REPLY_TYPE_OFFSET_DATA` payload; the data starts
/// after these 8 bytes.
pub fn decode_offset_data(payload: &[u8]) -> Option<u64> {
    (payload.len() > OFFSET_DATA_PREFIX_BYTES).then(|| be_u64(payload, 0))
}

/// Decodes an `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT` payload into `out`; returns the context
/// id and the number of extents stored. `None` if the payload is malformed, holds more
/// extents than `out`, a zero length or (extended) flags that do not fit 32 bits.
pub fn decode_block_status(
    chunk_type: u16,
    payload: &[u8],
    out: &mut [Extent],
) -> Option<(u32, usize)> {
    let (prefix_bytes, descriptor_bytes) = match chunk_type {
        NBD_REPLY_TYPE_BLOCK_STATUS => (BLOCK_STATUS_PREFIX_BYTES, BLOCK_STATUS_DESCRIPTOR_BYTES),
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT => (
            BLOCK_STATUS_EXT_PREFIX_BYTES,
            BLOCK_STATUS_EXT_DESCRIPTOR_BYTES,
        ),
        _ => return None,
    };
    let descriptors = payload.len().checked_sub(prefix_bytes)?;
    if descriptors == 0 || descriptors % descriptor_bytes != 0 {
        return None;
    }
    let count = descriptors / descriptor_bytes;
    if count > out.len() {
        return None;
    }
    if chunk_type == NBD_REPLY_TYPE_BLOCK_STATUS_EXT {
        let claimed = be_u32(payload, 4) as usize;
        if claimed != 0 && claimed != count {
            return None;
        }
    }
    for (index, slot) in out[..count].iter_mut().enumerate() {
        let at = prefix_bytes + index * descriptor_bytes;
        *slot = if chunk_type == NBD_REPLY_TYPE_BLOCK_STATUS {
            Extent {
                length: u64::from(be_u32(payload, at)),
                flags: be_u32(payload, at + 4),
            }
        } else {
            let flags = u32::try_from(be_u64(payload, at + 8)).ok()?;
            Extent {
                length: be_u64(payload, at),
                flags,
            }
        };
        if slot.length == 0 {
            return None;
        }
    }
    Some((be_u32(payload, 0), count))
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::proto::{NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, NBD_STATE_HOLE, NBD_STATE_ZERO};
    use proptest::prelude::*;

    const STYLES: [ReplyStyle; 3] = [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ];

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text
            .bytes()
            .filter(|byte| byte.is_ascii_hexdigit())
            .collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_a_compact_write_header_exactly() {
        let bytes = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
        let (request, consumed) = decode_request(&bytes, false).unwrap().unwrap();
        assert_eq!(consumed, REQUEST_BYTES);
        assert_eq!(
            request,
            Request {
                flags: NBD_CMD_FLAG_FUA,
                command: NBD_CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 0x1000,
                length: 0x200,
            }
        );
    }

    #[test]
    fn decodes_an_extended_header_with_a_64_bit_length() {
        let bytes = hex("21e41c71 0000 0006 00000000000000ff 0000000000000000 0000000100000000");
        let (request, consumed) = decode_request(&bytes, true).unwrap().unwrap();
        assert_eq!(consumed, EXTENDED_REQUEST_BYTES);
        assert_eq!(request.length, 1 << 32);
        assert_eq!(request.command, 6);
        assert_eq!(request.cookie, 0xff);
    }

    #[test]
    fn every_prefix_needs_more_and_the_payload_is_not_consumed() {
        let request = Request {
            flags: 0,
            command: 1,
            cookie: 7,
            offset: 512,
            length: 4,
        };
        for extended in [false, true] {
            let mut bytes = [0u8; EXTENDED_REQUEST_BYTES + 4];
            let header = encode_request(&request, extended, &mut bytes);
            for cut in 0..header {
                assert_eq!(
                    decode_request(&bytes[..cut], extended),
                    Ok(None),
                    "cut {cut}"
                );
            }
            let (decoded, consumed) = decode_request(&bytes, extended).unwrap().unwrap();
            assert_eq!((decoded, consumed), (request, header));
        }
    }

    #[test]
    fn bad_magic_is_reported_as_soon_as_it_is_visible() {
        let compact = hex("25609513");
        let extended = hex("21e41c71");
        assert_eq!(
            decode_request(&compact, true),
            Err(DecodeError::BadMagic {
                found: NBD_REQUEST_MAGIC
            })
        );
        assert_eq!(
            decode_request(&extended, false),
            Err(DecodeError::BadMagic {
                found: NBD_EXTENDED_REQUEST_MAGIC
            })
        );
        assert_eq!(decode_request(&compact[..3], true), Ok(None));
        assert_eq!(
            decode_request(b"GET / HTTP/1.1", false),
            Err(DecodeError::BadMagic { found: 0x4745_5420 })
        );
    }

    #[test]
    fn simple_replies_are_exact() {
        let ok = reply_ok(ReplyStyle::Simple, 0x1122, 99);
        assert_eq!(ok.as_bytes(), hex("67446698 00000000 0000000000001122"));
        let error = reply_error(ReplyStyle::Simple, 0x1122, 99, NbdErrno::NoSpc);
        assert_eq!(error.as_bytes(), hex("67446698 0000001c 0000000000001122"));
        let read = reply_read_data(ReplyStyle::Simple, 5, 0, 0, 4096, true);
        assert_eq!(read.as_bytes(), hex("67446698 00000000 0000000000000005"));
    }

    #[test]
    fn structured_replies_are_exact() {
        let style = ReplyStyle::Structured;
        let ok = reply_ok(style, 0xabc, 4096);
        assert_eq!(
            ok.as_bytes(),
            hex("668e33ef 0001 0000 0000000000000abc 00000000")
        );
        let error = reply_error(style, 0xabc, 4096, NbdErrno::Inval);
        assert_eq!(
            error.as_bytes(),
            hex("668e33ef 0001 8001 0000000000000abc 00000006 00000016 0000")
        );
        let data = reply_read_data(style, 0xabc, 4096, 8192, 512, false);
        assert_eq!(
            data.as_bytes(),
            hex("668e33ef 0000 0001 0000000000000abc 00000208 0000000000002000")
        );
        let hole = reply_read_hole(style, 0xabc, 4096, 8192, 512, true);
        assert_eq!(
            hole.as_bytes(),
            hex("668e33ef 0001 0002 0000000000000abc 0000000c 0000000000002000 00000200")
        );
        let error_offset = reply_error_offset(style, 1, 0, NbdErrno::Io, 4096, true);
        assert_eq!(
            error_offset.as_bytes(),
            hex("668e33ef 0001 8002 0000000000000001 0000000e 00000005 0000 0000000000001000")
        );
    }

    #[test]
    fn extended_replies_echo_the_request_offset() {
        let style = ReplyStyle::Extended;
        let ok = reply_ok(style, 0xabc, 4096);
        assert_eq!(
            ok.as_bytes(),
            hex("6e8a278c 0001 0000 0000000000000abc 0000000000001000 0000000000000000")
        );
        let error = reply_error(style, 0xabc, 4096, NbdErrno::Perm);
        assert_eq!(
            error.as_bytes(),
            hex(
                "6e8a278c 0001 8001 0000000000000abc 0000000000001000 0000000000000006
                 00000001 0000"
            )
        );
        let data = reply_read_data(style, 0xabc, 4096, 8192, 512, true);
        assert_eq!(
            data.as_bytes(),
            hex(
                "6e8a278c 0001 0001 0000000000000abc 0000000000001000 0000000000000208
                 0000000000002000"
            )
        );
    }

    #[test]
    fn block_status_compact_and_extended_are_exact() {
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 8192,
                flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
            },
        ];
        let mut out = [0u8; block_status_reply_bytes(ReplyStyle::Extended, 2)];
        let written = reply_block_status(ReplyStyle::Structured, 9, 0, 1, &extents, &mut out);
        assert_eq!(written, block_status_reply_bytes(ReplyStyle::Structured, 2));
        assert_eq!(
            &out[..written],
            hex("668e33ef 0001 0005 0000000000000009 00000014 00000001
                 00001000 00000000 00002000 00000003")
        );
        let written = reply_block_status(ReplyStyle::Extended, 9, 512, 1, &extents, &mut out);
        assert_eq!(written, out.len());
        assert_eq!(
            &out[..written],
            hex(
                "6e8a278c 0001 0006 0000000000000009 0000000000000200 0000000000000028
                 00000001 00000002
                 0000000000001000 0000000000000000 0000000000002000 0000000000000003"
            )
        );
    }

    #[test]
    fn compact_block_status_clamps_a_huge_extent_and_stops_there() {
        let extents = [
            Extent {
                length: 1 << 12,
                flags: 0,
            },
            Extent {
                length: 1 << 40,
                flags: NBD_STATE_HOLE,
            },
            Extent {
                length: 1 << 12,
                flags: 0,
            },
        ];
        let mut out = [0u8; block_status_reply_bytes(ReplyStyle::Structured, 3)];
        let written = reply_block_status(ReplyStyle::Structured, 1, 0, 1, &extents, &mut out);
        assert_eq!(written, block_status_reply_bytes(ReplyStyle::Structured, 2));
        let (header, consumed) = decode_reply_header(&out).unwrap().unwrap();
        assert_eq!(header.payload_bytes() as usize, written - consumed);
        let mut decoded = [Extent {
            length: 0,
            flags: 0,
        }; 3];
        let (context, count) = decode_block_status(
            NBD_REPLY_TYPE_BLOCK_STATUS,
            &out[consumed..written],
            &mut decoded,
        )
        .unwrap();
        assert_eq!((context, count), (1, 2));
        assert_eq!(
            decoded[1],
            Extent {
                length: BLOCK_STATUS_EXTENT_BYTES_MAX,
                flags: 1
            }
        );
    }

    #[test]
    #[should_panic(expected = "needs structured replies")]
    fn hole_chunks_are_refused_in_simple_style() {
        let _ = reply_read_hole(ReplyStyle::Simple, 1, 0, 0, 512, true);
    }

    #[test]
    #[should_panic(expected = "structured chunk length fits u32")]
    fn structured_data_chunks_cannot_overflow_the_length_field() {
        let _ = reply_read_data(ReplyStyle::Structured, 1, 0, 0, u64::from(u32::MAX), true);
    }

    #[test]
    fn error_chunks_decode_back() {
        for style in [ReplyStyle::Structured, ReplyStyle::Extended] {
            let head = reply_error(style, 3, 0, NbdErrno::Shutdown);
            let (header, consumed) = decode_reply_header(head.as_bytes()).unwrap().unwrap();
            assert!(header.is_done());
            let chunk_type = match header {
                ReplyHeader::Chunk { chunk_type, .. }
                | ReplyHeader::ExtendedChunk { chunk_type, .. } => chunk_type,
                ReplyHeader::Simple { .. } => unreachable!(),
            };
            let error = decode_error_chunk(chunk_type, &head.as_bytes()[consumed..]).unwrap();
            assert_eq!(
                error,
                ErrorChunk {
                    error: 108,
                    message: b"",
                    offset: None
                }
            );
        }
    }

    fn any_request(extended: bool) -> impl Strategy<Value = Request> {
        let length_max = if extended {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            0..=length_max,
        )
            .prop_map(|(flags, command, cookie, offset, length)| Request {
                flags,
                command,
                cookie,
                offset,
                length,
            })
    }

    fn any_style() -> impl Strategy<Value = ReplyStyle> {
        prop::sample::select(STYLES.to_vec())
    }

    fn any_errno() -> impl Strategy<Value = NbdErrno> {
        prop::sample::select(vec![
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ])
    }

    /// Checks the style-independent fields of a decoded header.
    fn check_header(head: &ReplyHead, style: ReplyStyle, cookie: u64, request_offset: u64) {
        let (header, consumed) = decode_reply_header(head.as_bytes()).unwrap().unwrap();
        assert_eq!(header.cookie(), cookie);
        match (style, header) {
            (ReplyStyle::Simple, ReplyHeader::Simple { .. }) => assert_eq!(consumed, 16),
            (ReplyStyle::Structured, ReplyHeader::Chunk { .. }) => assert_eq!(consumed, 20),
            (ReplyStyle::Extended, ReplyHeader::ExtendedChunk { offset, .. }) => {
                assert_eq!(consumed, 32);
                assert_eq!(offset, request_offset);
            }
            (style, header) => panic!("{style:?} produced {header:?}"),
        }
    }

    proptest! {
        #[test]
        fn compact_requests_round_trip(request in any_request(false)) {
            let mut out = [0u8; REQUEST_BYTES];
            prop_assert_eq!(encode_request(&request, false, &mut out), REQUEST_BYTES);
            prop_assert_eq!(decode_request(&out, false), Ok(Some((request, REQUEST_BYTES))));
        }

        #[test]
        fn extended_requests_round_trip(request in any_request(true)) {
            let mut out = [0u8; EXTENDED_REQUEST_BYTES];
            prop_assert_eq!(encode_request(&request, true, &mut out), EXTENDED_REQUEST_BYTES);
            prop_assert_eq!(
                decode_request(&out, true),
                Ok(Some((request, EXTENDED_REQUEST_BYTES)))
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_overconsume(
            bytes in prop::collection::vec(any::<u8>(), 0..80),
            extended in any::<bool>(),
        ) {
            if let Ok(Some((_, consumed))) = decode_request(&bytes, extended) {
                prop_assert!(consumed <= bytes.len());
            }
            if let Ok(Some((header, consumed))) = decode_reply_header(&bytes) {
                prop_assert!(consumed <= bytes.len());
                let payload = &bytes[consumed..];
                let kind = match header {
                    ReplyHeader::Chunk { chunk_type, .. }
                    | ReplyHeader::ExtendedChunk { chunk_type, .. } => chunk_type,
                    ReplyHeader::Simple { .. } => 0,
                };
                let mut extents = [Extent { length: 0, flags: 0 }; 8];
                let _ = decode_block_status(kind, payload, &mut extents);
                let _ = decode_error_chunk(kind, payload);
                let _ = decode_offset_hole(payload);
                let _ = decode_offset_data(payload);
            }
        }

        #[test]
        fn ok_and_error_replies_decode_back(
            style in any_style(),
            cookie in any::<u64>(),
            request_offset in any::<u64>(),
            errno in any_errno(),
        ) {
            let ok = reply_ok(style, cookie, request_offset);
            check_header(&ok, style, cookie, request_offset);
            let (header, _) = decode_reply_header(ok.as_bytes()).unwrap().unwrap();
            prop_assert!(header.is_done());
            prop_assert_eq!(header.payload_bytes(), 0);
            if let ReplyHeader::Simple { error, .. } = header {
                prop_assert_eq!(error, 0);
            }

            let error = reply_error(style, cookie, request_offset, errno);
            check_header(&error, style, cookie, request_offset);
            let (header, consumed) = decode_reply_header(error.as_bytes()).unwrap().unwrap();
            prop_assert!(header.is_done());
            match header {
                ReplyHeader::Simple { error, .. } => prop_assert_eq!(error, errno.code()),
                ReplyHeader::Chunk { chunk_type, .. }
                | ReplyHeader::ExtendedChunk { chunk_type, .. } => {
                    let payload = &error.as_bytes()[consumed..];
                    prop_assert_eq!(header.payload_bytes() as usize, payload.len());
                    let chunk = decode_error_chunk(chunk_type, payload).unwrap();
                    prop_assert_eq!(chunk.error, errno.code());
                }
            }
        }

        #[test]
        fn read_chunks_decode_back(
            style in prop::sample::select(vec![ReplyStyle::Structured, ReplyStyle::Extended]),
            cookie in any::<u64>(),
            request_offset in any::<u64>(),
            offset in any::<u64>(),
            length in 1..=u64::from(u32::MAX - 8),
            done in any::<bool>(),
        ) {
            let data = reply_read_data(style, cookie, request_offset, offset, length, done);
            check_header(&data, style, cookie, request_offset);
            let (header, consumed) = decode_reply_header(data.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(header.is_done(), done);
            prop_assert_eq!(header.payload_bytes(), length + 8);
            let prefix = &data.as_bytes()[consumed..];
            prop_assert_eq!(prefix.len(), 8);
            prop_assert_eq!(decode_offset_data(&[prefix, &[0u8][..]].concat()), Some(offset));

            let hole = reply_read_hole(style, cookie, request_offset, offset, length, done);
            check_header(&hole, style, cookie, request_offset);
            let (header, consumed) = decode_reply_header(hole.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(header.is_done(), done);
            prop_assert_eq!(
                decode_offset_hole(&hole.as_bytes()[consumed..]),
                Some((offset, length as u32))
            );
        }

        #[test]
        fn block_status_decodes_back(
            style in prop::sample::select(vec![ReplyStyle::Structured, ReplyStyle::Extended]),
            cookie in any::<u64>(),
            context in any::<u32>(),
            extents in prop::collection::vec(
                (1..=BLOCK_STATUS_EXTENT_BYTES_MAX, any::<u32>())
                    .prop_map(|(length, flags)| Extent { length, flags }),
                1..40,
            ),
        ) {
            let mut out = vec![0u8; block_status_reply_bytes(style, extents.len())];
            let written = reply_block_status(style, cookie, 0, context, &extents, &mut out);
            prop_assert_eq!(written, out.len());
            let (header, consumed) = decode_reply_header(&out).unwrap().unwrap();
            prop_assert!(header.is_done());
            prop_assert_eq!(header.cookie(), cookie);
            prop_assert_eq!(header.payload_bytes() as usize, written - consumed);
            let chunk_type = match header {
                ReplyHeader::Chunk { chunk_type, .. }
                | ReplyHeader::ExtendedChunk { chunk_type, .. } => chunk_type,
                ReplyHeader::Simple { .. } => unreachable!(),
            };
            let mut decoded = vec![Extent { length: 0, flags: 0 }; extents.len()];
            let (decoded_context, count) =
                decode_block_status(chunk_type, &out[consumed..written], &mut decoded).unwrap();
            prop_assert_eq!(decoded_context, context);
            prop_assert_eq!(&decoded[..count], &extents[..]);
        }
    }
}
