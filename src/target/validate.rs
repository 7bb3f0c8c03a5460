//! Request validation: maps a decoded [`Request`] plus the export and the negotiated
//! [`Session`] to a [`Verdict`] (sans-I/O, no allocation).
//!
//! # Framing contract
//!
//! The payload that follows a header is decided first and independently of validity, so a
//! rejected request never desynchronises the stream: in compact mode only `NBD_CMD_WRITE`
//! carries a payload (`length` bytes); in extended mode the requests with
//! `NBD_CMD_FLAG_PAYLOAD_LEN` do, and so does every `NBD_CMD_WRITE`. The extension says an
//! extended WRITE MUST set the flag, but qemu 10 omits it and qemu-nbd and nbdkit accept such
//! writes (their `length` is still the payload), so ringbd serves them too rather than
//! rejecting a valid write or losing framing. A payload above `PAYLOAD_BYTES_MAX` cannot be drained
//! cheaply and is a [`Verdict::Disconnect`]; any other invalid request is a
//! [`Verdict::Reject`] telling how many payload bytes to consume before replying.
//!
//! # Rules (in the order they are checked)
//!
//! 1. `NBD_CMD_DISC` is always served: it has no reply, the client sends nothing after it, so
//!    nonzero offset/length or flags cannot be reported and are ignored (soft disconnect).
//! 2. Unknown flag bits, `NBD_CMD_FLAG_PAYLOAD_LEN` anywhere but on an extended WRITE (where
//!    it is optional, see above), FUA without `SEND_FUA`, and flags inapplicable to the command
//!    (DF only on READ with `SEND_DF`, NO_HOLE / FAST_ZERO only on WRITE_ZEROES, FAST_ZERO only
//!    with `SEND_FAST_ZERO`, REQ_ONE only on BLOCK_STATUS) are `EINVAL`. Unknown commands and
//!    `NBD_CMD_RESIZE` (never advertised) are `EINVAL`.
//! 3. WRITE, TRIM and WRITE_ZEROES on a read-only export are `EPERM`.
//! 4. Commands not advertised in the session's transmission flags (FLUSH, TRIM, CACHE,
//!    WRITE_ZEROES) are `EINVAL`; so is BLOCK_STATUS without structured/extended replies or
//!    without a negotiated `base:allocation` context. FLUSH with a nonzero offset or length is
//!    `EINVAL`.
//! 5. Zero-length READ, WRITE, TRIM, CACHE, WRITE_ZEROES and BLOCK_STATUS are `EINVAL`
//!    (the spec leaves them unspecified but asks not to disconnect; rejecting them means the
//!    data plane never sees an empty range).
//! 6. Offset or length not a multiple of the minimum block size is `EINVAL`.
//! 7. READ, WRITE and CACHE longer than the enforced maximum payload
//!    (`BlockSize::payload_bytes_max`) are `EINVAL` (`EOVERFLOW` for a DF read). TRIM,
//!    WRITE_ZEROES and BLOCK_STATUS carry no payload and are not capped.
//! 8. A range past the end of the export (`offset + length` overflow included) is `ENOSPC`
//!    for WRITE and WRITE_ZEROES, `EINVAL` otherwise.

use crate::target::codec::{ReplyStyle, Request};
use crate::target::export::ExportInfo;
use crate::target::handshake::Session;
use crate::target::proto::{
    NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLAGS_KNOWN, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
    NbdErrno, PAYLOAD_BYTES_MAX,
};

/// A valid request, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`; with `df` the reply must be a single content chunk (no holes).
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read (nonzero, at most the enforced maximum payload).
        length: u64,
        /// `NBD_CMD_FLAG_DF`: do not fragment.
        df: bool,
    },
    /// `NBD_CMD_WRITE`; `length` payload bytes follow the header.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload bytes (nonzero, at most the enforced maximum payload).
        length: u64,
        /// `NBD_CMD_FLAG_FUA`: durable before the reply.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes to discard (nonzero, not capped).
        length: u64,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_CACHE` (advisory).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Bytes to prefetch (nonzero, at most the enforced maximum payload).
        length: u64,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero (nonzero, not capped).
        length: u64,
        /// `NBD_CMD_FLAG_NO_HOLE`: keep the range allocated.
        no_hole: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail fast with `NBD_ENOTSUP` unless zeroing is fast.
        fast: bool,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS` for the negotiated `base:allocation` context.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Range of interest (a hint; nonzero, not capped).
        length: u64,
        /// `NBD_CMD_FLAG_REQ_ONE`: exactly one extent, no longer than `length`.
        req_one: bool,
    },
    /// `NBD_CMD_DISC`: finish outstanding requests, then close; no reply.
    Disconnect,
}

/// What the data plane does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Execute the command.
    Serve(Command),
    /// Reply `errno`, after consuming `payload_bytes` of the request's payload from the stream
    /// (so it stays framed).
    Reject {
        /// The error to reply.
        errno: NbdErrno,
        /// Payload bytes following the header, to be read and discarded.
        payload_bytes: u64,
    },
    /// Framing cannot be kept (e.g. payload larger than `PAYLOAD_BYTES_MAX`): hard disconnect.
    Disconnect(&'static str),
}

/// Validates `request` against `export` and the negotiated `session` (see the module docs).
///
/// # Panics
///
/// If `export` is not the export the session negotiated (`session.export_id`).
pub fn validate(request: &Request, export: &ExportInfo, session: &Session) -> Verdict {
    assert_eq!(
        session.export_id, export.id,
        "validating against another export"
    );
    if request.command == NBD_CMD_DISC {
        return Verdict::Serve(Command::Disconnect);
    }
    let payload_bytes = payload_bytes(request, session);
    if payload_bytes > PAYLOAD_BYTES_MAX as u64 {
        return Verdict::Disconnect("request payload larger than PAYLOAD_BYTES_MAX");
    }
    match check(request, export, session) {
        Ok(command) => {
            let expected = if matches!(command, Command::Write { .. }) {
                request.length
            } else {
                0
            };
            assert_eq!(
                payload_bytes, expected,
                "served command with unexpected payload"
            );
            Verdict::Serve(command)
        }
        Err(errno) => Verdict::Reject {
            errno,
            payload_bytes,
        },
    }
}

/// Bytes of payload that follow the header on the wire, whatever the request's validity.
pub fn payload_bytes(request: &Request, session: &Session) -> u64 {
    let carries_payload = if session.reply_style == ReplyStyle::Extended {
        request.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 || request.command == NBD_CMD_WRITE
    } else {
        request.command == NBD_CMD_WRITE
    };
    if carries_payload { request.length } else { 0 }
}

fn check(request: &Request, export: &ExportInfo, session: &Session) -> Result<Command, NbdErrno> {
    check_flags(request, session)?;
    let flags = request.flags;
    let (offset, length) = (request.offset, request.length);
    let fua = flags & NBD_CMD_FLAG_FUA != 0;
    let advertised = |flag: u16| session.transmission_flags & flag != 0;
    let command = match request.command {
        NBD_CMD_READ => {
            let df = flags & NBD_CMD_FLAG_DF != 0;
            check_range(
                request,
                export,
                Some(if df {
                    NbdErrno::Overflow
                } else {
                    NbdErrno::Inval
                }),
                NbdErrno::Inval,
            )?;
            Command::Read { offset, length, df }
        }
        NBD_CMD_WRITE => {
            check_writable(export)?;
            check_range(request, export, Some(NbdErrno::Inval), NbdErrno::NoSpc)?;
            Command::Write {
                offset,
                length,
                fua,
            }
        }
        NBD_CMD_FLUSH => {
            require(advertised(NBD_FLAG_SEND_FLUSH))?;
            require(offset == 0 && length == 0)?;
            Command::Flush
        }
        NBD_CMD_TRIM => {
            check_writable(export)?;
            require(advertised(NBD_FLAG_SEND_TRIM))?;
            check_range(request, export, None, NbdErrno::Inval)?;
            Command::Trim {
                offset,
                length,
                fua,
            }
        }
        NBD_CMD_CACHE => {
            require(advertised(NBD_FLAG_SEND_CACHE))?;
            check_range(request, export, Some(NbdErrno::Inval), NbdErrno::Inval)?;
            Command::Cache { offset, length }
        }
        NBD_CMD_WRITE_ZEROES => {
            check_writable(export)?;
            require(advertised(NBD_FLAG_SEND_WRITE_ZEROES))?;
            check_range(request, export, None, NbdErrno::NoSpc)?;
            let no_hole = flags & NBD_CMD_FLAG_NO_HOLE != 0;
            let fast = flags & NBD_CMD_FLAG_FAST_ZERO != 0;
            Command::WriteZeroes {
                offset,
                length,
                no_hole,
                fast,
                fua,
            }
        }
        NBD_CMD_BLOCK_STATUS => {
            require(session.reply_style != ReplyStyle::Simple)?;
            require(session.base_allocation.is_some() && export.caps.block_status)?;
            check_range(request, export, None, NbdErrno::Inval)?;
            let req_one = flags & NBD_CMD_FLAG_REQ_ONE != 0;
            Command::BlockStatus {
                offset,
                length,
                req_one,
            }
        }
        // NBD_CMD_RESIZE is never advertised; unknown commands get EINVAL as the spec asks.
        _ => return Err(NbdErrno::Inval),
    };
    Ok(command)
}

/// Rule 2: known, applicable and advertised flags only.
fn check_flags(request: &Request, session: &Session) -> Result<(), NbdErrno> {
    let flags = request.flags;
    let advertised = |flag: u16| session.transmission_flags & flag != 0;
    require(flags & !NBD_CMD_FLAGS_KNOWN == 0)?;
    let payload_len = flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0;
    let extended_write =
        session.reply_style == ReplyStyle::Extended && request.command == NBD_CMD_WRITE;
    require(!payload_len || extended_write)?;
    require(flags & NBD_CMD_FLAG_FUA == 0 || advertised(NBD_FLAG_SEND_FUA))?;
    let applicable = match request.command {
        NBD_CMD_READ => NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    let specific = flags & !(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_PAYLOAD_LEN);
    require(specific & !applicable == 0)?;
    require(flags & NBD_CMD_FLAG_DF == 0 || advertised(NBD_FLAG_SEND_DF))?;
    require(flags & NBD_CMD_FLAG_FAST_ZERO == 0 || advertised(NBD_FLAG_SEND_FAST_ZERO))?;
    Ok(())
}

/// Rules 5 to 8. `too_long` is the error for a length above the enforced maximum payload
/// (`None`: not capped); `past_end` the error for a range beyond the export.
fn check_range(
    request: &Request,
    export: &ExportInfo,
    too_long: Option<NbdErrno>,
    past_end: NbdErrno,
) -> Result<(), NbdErrno> {
    let minimum = export.block_size.minimum;
    assert!(
        minimum.is_power_of_two(),
        "minimum block size is a power of two"
    );
    let (offset, length) = (request.offset, request.length);
    require(length > 0)?;
    require((offset | length) & u64::from(minimum - 1) == 0)?;
    if let Some(errno) = too_long
        && length > u64::from(export.block_size.payload_bytes_max())
    {
        return Err(errno);
    }
    match offset.checked_add(length) {
        Some(end) if end <= export.size => Ok(()),
        _ => Err(past_end),
    }
}

fn check_writable(export: &ExportInfo) -> Result<(), NbdErrno> {
    if export.read_only {
        Err(NbdErrno::Perm)
    } else {
        Ok(())
    }
}

fn require(condition: bool) -> Result<(), NbdErrno> {
    if condition {
        Ok(())
    } else {
        Err(NbdErrno::Inval)
    }
}

/// The fuzz harness for request decoding and validation, in the library so that `fuzz/` and
/// the seed-replay test run exactly the same invariant checks.
pub mod harness {
    use super::{Command, Verdict, payload_bytes, validate};
    use crate::target::codec::{
        Extent, ReplyStyle, block_status_reply_bytes, decode_request, reply_block_status,
        reply_done, reply_error, reply_ok, reply_read_data, reply_read_hole,
    };
    use crate::target::export::ExportInfo;
    use crate::target::handshake::{BASE_ALLOCATION_CONTEXT_ID, Session};
    use crate::target::proto::{
        NBD_CMD_DISC, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO,
        NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
        PAYLOAD_BYTES_MAX,
    };

    /// Requests decoded per input at most (bounds the work of one fuzz iteration).
    pub const REQUESTS_PER_INPUT_MAX: usize = 256;

    /// The (export, session) pairs a fuzz input can select with its first byte: every reply
    /// style, with and without `base:allocation`, over the exports of
    /// [`crate::target::handshake::harness::exports`].
    pub fn contexts() -> Vec<(ExportInfo, Session)> {
        let exports = crate::target::handshake::harness::exports();
        let styles = [
            ReplyStyle::Simple,
            ReplyStyle::Structured,
            ReplyStyle::Extended,
        ];
        let mut contexts = Vec::new();
        for export in &exports {
            for style in styles {
                for base_allocation in [None, Some(BASE_ALLOCATION_CONTEXT_ID)] {
                    let usable = style != ReplyStyle::Simple && export.caps.block_status;
                    if base_allocation.is_some() && !usable {
                        continue;
                    }
                    let session = Session {
                        export_id: export.id,
                        reply_style: style,
                        base_allocation,
                        transmission_flags: export.transmission_flags(style),
                    };
                    contexts.push((export.clone(), session));
                }
            }
        }
        contexts
    }

    /// The fuzz entry point: byte 0 selects a context, the rest is a stream of request
    /// headers and payloads. Decodes, validates and encodes a reply for every request until
    /// the stream ends or breaks framing, asserting the verdict invariants.
    pub fn check_one_input(data: &[u8]) {
        let Some((&selector, mut stream)) = data.split_first() else {
            return;
        };
        let contexts = contexts();
        let (export, session) = &contexts[usize::from(selector) % contexts.len()];
        let extended = session.reply_style == ReplyStyle::Extended;
        for _ in 0..REQUESTS_PER_INPUT_MAX {
            let Ok(Some((request, consumed))) = decode_request(stream, extended) else {
                return;
            };
            assert!(consumed <= stream.len());
            stream = &stream[consumed..];
            let verdict = validate(&request, export, session);
            let payload = payload_bytes(&request, session);
            match verdict {
                Verdict::Serve(command) => check_served(&command, request.command, export, session),
                Verdict::Reject {
                    errno,
                    payload_bytes,
                } => {
                    assert_eq!(payload_bytes, payload);
                    assert!(payload_bytes <= PAYLOAD_BYTES_MAX as u64);
                    let head =
                        reply_error(session.reply_style, request.cookie, request.offset, errno);
                    assert!(!head.as_bytes().is_empty());
                }
                Verdict::Disconnect(_) => {
                    assert!(payload > PAYLOAD_BYTES_MAX as u64);
                    return;
                }
            }
            if matches!(verdict, Verdict::Serve(Command::Disconnect)) {
                return;
            }
            let skip = usize::try_from(payload)
                .unwrap_or(usize::MAX)
                .min(stream.len());
            stream = &stream[skip..];
        }
    }

    /// A served command is in range, aligned, advertised and encodable.
    fn check_served(command: &Command, wire_command: u16, export: &ExportInfo, session: &Session) {
        let advertised = |flag: u16| session.transmission_flags & flag != 0;
        let max = u64::from(export.block_size.payload_bytes_max());
        let in_range = |offset: u64, length: u64| {
            let minimum = u64::from(export.block_size.minimum);
            assert!(length > 0 && offset.is_multiple_of(minimum) && length.is_multiple_of(minimum));
            assert!(
                offset
                    .checked_add(length)
                    .is_some_and(|end| end <= export.size)
            );
        };
        let style = session.reply_style;
        match *command {
            Command::Read { offset, length, df } => {
                in_range(offset, length);
                assert!(length <= max && (!df || advertised(NBD_FLAG_SEND_DF)));
                let _ = reply_read_data(style, 1, offset, offset, length, true);
                if style != ReplyStyle::Simple {
                    let _ = reply_read_hole(style, 1, offset, offset, length, false);
                    let _ = reply_done(style, 1, offset);
                }
            }
            Command::Write {
                offset,
                length,
                fua,
            } => {
                in_range(offset, length);
                assert!(
                    length <= max && !export.read_only && (!fua || advertised(NBD_FLAG_SEND_FUA))
                );
            }
            Command::Flush => assert!(advertised(NBD_FLAG_SEND_FLUSH)),
            Command::Trim { offset, length, .. } => {
                in_range(offset, length);
                assert!(advertised(NBD_FLAG_SEND_TRIM) && !export.read_only);
            }
            Command::Cache { offset, length } => {
                in_range(offset, length);
                assert!(length <= max && advertised(NBD_FLAG_SEND_CACHE));
            }
            Command::WriteZeroes {
                offset,
                length,
                fast,
                ..
            } => {
                in_range(offset, length);
                assert!(advertised(NBD_FLAG_SEND_WRITE_ZEROES) && !export.read_only);
                assert!(!fast || advertised(NBD_FLAG_SEND_FAST_ZERO));
            }
            Command::BlockStatus { offset, length, .. } => {
                in_range(offset, length);
                let context = session
                    .base_allocation
                    .expect("block status needs a context");
                assert!(style != ReplyStyle::Simple);
                let extents = [Extent { length, flags: 0 }];
                let mut out = [0u8; block_status_reply_bytes(ReplyStyle::Extended, 1)];
                let written = reply_block_status(style, 1, offset, context, &extents, &mut out);
                assert!(written <= out.len());
            }
            Command::Disconnect => assert_eq!(wire_command, NBD_CMD_DISC),
        }
        let _ = reply_ok(style, 1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::harness::contexts;
    use super::*;
    use crate::target::codec::{EXTENDED_REQUEST_BYTES, REQUEST_BYTES, encode_request};
    use crate::target::handshake::BASE_ALLOCATION_CONTEXT_ID;
    use crate::target::proto::{NBD_CMD_RESIZE, NBD_FLAG_SEND_FAST_ZERO};
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// The full-featured 1 GiB "disk" (minimum block 512, maximum payload 32 MiB).
    fn disk(style: ReplyStyle, base_allocation: bool) -> (ExportInfo, Session) {
        let base_allocation = base_allocation.then_some(BASE_ALLOCATION_CONTEXT_ID);
        contexts()
            .into_iter()
            .find(|(export, session)| {
                export.name == "disk"
                    && session.reply_style == style
                    && session.base_allocation == base_allocation
            })
            .unwrap()
    }

    /// The read-only 1 MiB "ro" export (minimum block 4096, FLUSH only).
    fn read_only() -> (ExportInfo, Session) {
        contexts()
            .into_iter()
            .find(|(export, session)| {
                export.name == "ro" && session.reply_style == ReplyStyle::Simple
            })
            .unwrap()
    }

    fn request(command: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 0xc0ffee,
            offset,
            length,
        }
    }

    fn verdict(
        context: &(ExportInfo, Session),
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> Verdict {
        validate(
            &request(command, flags, offset, length),
            &context.0,
            &context.1,
        )
    }

    fn reject(errno: NbdErrno, payload_bytes: u64) -> Verdict {
        Verdict::Reject {
            errno,
            payload_bytes,
        }
    }

    const INVAL: Verdict = Verdict::Reject {
        errno: NbdErrno::Inval,
        payload_bytes: 0,
    };

    #[test]
    fn valid_commands_are_served() {
        let simple = disk(ReplyStyle::Simple, false);
        let structured = disk(ReplyStyle::Structured, true);
        let fua = NBD_CMD_FLAG_FUA;
        let cases = [
            (
                &simple,
                NBD_CMD_READ,
                0,
                0,
                4096,
                Command::Read {
                    offset: 0,
                    length: 4096,
                    df: false,
                },
            ),
            (
                &structured,
                NBD_CMD_READ,
                NBD_CMD_FLAG_DF | fua,
                512,
                512,
                Command::Read {
                    offset: 512,
                    length: 512,
                    df: true,
                },
            ),
            (
                &simple,
                NBD_CMD_WRITE,
                fua,
                GIB - 512,
                512,
                Command::Write {
                    offset: GIB - 512,
                    length: 512,
                    fua: true,
                },
            ),
            (&simple, NBD_CMD_FLUSH, 0, 0, 0, Command::Flush),
            (
                &simple,
                NBD_CMD_TRIM,
                0,
                0,
                GIB,
                Command::Trim {
                    offset: 0,
                    length: GIB,
                    fua: false,
                },
            ),
            (
                &simple,
                NBD_CMD_CACHE,
                0,
                4096,
                MIB,
                Command::Cache {
                    offset: 4096,
                    length: MIB,
                },
            ),
            (
                &simple,
                NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                0,
                GIB,
                Command::WriteZeroes {
                    offset: 0,
                    length: GIB,
                    no_hole: true,
                    fast: true,
                    fua: false,
                },
            ),
            (
                &structured,
                NBD_CMD_BLOCK_STATUS,
                NBD_CMD_FLAG_REQ_ONE,
                0,
                GIB,
                Command::BlockStatus {
                    offset: 0,
                    length: GIB,
                    req_one: true,
                },
            ),
        ];
        for (context, command, flags, offset, length, expected) in cases {
            assert_eq!(
                verdict(context, command, flags, offset, length),
                Verdict::Serve(expected)
            );
        }
    }

    #[test]
    fn extended_write_payloads_with_or_without_payload_len_and_other_payloads_are_consumed() {
        let extended = disk(ReplyStyle::Extended, true);
        let write = verdict(&extended, NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 4096);
        assert_eq!(
            write,
            Verdict::Serve(Command::Write {
                offset: 0,
                length: 4096,
                fua: false
            })
        );
        // qemu 10 omits PAYLOAD_LEN on WRITE: the length is still the payload.
        assert_eq!(verdict(&extended, NBD_CMD_WRITE, 0, 0, 4096), write);
        let unaligned = verdict(&extended, NBD_CMD_WRITE, 0, 0, 100);
        assert_eq!(
            unaligned,
            reject(NbdErrno::Inval, 100),
            "its payload is drained"
        );
        let huge = verdict(&extended, NBD_CMD_WRITE, 0, 0, 64 * MIB);
        assert!(matches!(huge, Verdict::Disconnect(_)));
        let read_with_payload = verdict(&extended, NBD_CMD_READ, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512);
        assert_eq!(read_with_payload, reject(NbdErrno::Inval, 512));
        let status_with_payload = verdict(
            &extended,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_FLAG_PAYLOAD_LEN,
            0,
            16,
        );
        assert_eq!(status_with_payload, reject(NbdErrno::Inval, 16));
        let unknown = verdict(&extended, 0x77, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 100);
        assert_eq!(unknown, reject(NbdErrno::Inval, 100));
        let huge = verdict(&extended, 0x77, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 64 * MIB);
        assert!(matches!(huge, Verdict::Disconnect(_)));
        // 64-bit effect lengths are fine where no payload is involved.
        let zero_all = verdict(&extended, NBD_CMD_WRITE_ZEROES, 0, 0, GIB);
        assert!(matches!(
            zero_all,
            Verdict::Serve(Command::WriteZeroes { length: GIB, .. })
        ));
    }

    #[test]
    fn payload_len_is_invalid_in_compact_mode() {
        let simple = disk(ReplyStyle::Simple, false);
        let write = verdict(&simple, NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512);
        assert_eq!(
            write,
            reject(NbdErrno::Inval, 512),
            "the WRITE payload is still drained"
        );
        assert_eq!(
            verdict(&simple, NBD_CMD_READ, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512),
            INVAL
        );
    }

    #[test]
    fn ranges_past_the_end_use_the_spec_errors() {
        let ctx = disk(ReplyStyle::Structured, true);
        let wrap = u64::MAX - 511;
        for (offset, length) in [(GIB, 512), (GIB - 512, 1024), (wrap, 1024)] {
            assert_eq!(verdict(&ctx, NBD_CMD_READ, 0, offset, length), INVAL);
            assert_eq!(verdict(&ctx, NBD_CMD_TRIM, 0, offset, length), INVAL);
            assert_eq!(verdict(&ctx, NBD_CMD_CACHE, 0, offset, length), INVAL);
            assert_eq!(
                verdict(&ctx, NBD_CMD_BLOCK_STATUS, 0, offset, length),
                INVAL
            );
            assert_eq!(
                verdict(&ctx, NBD_CMD_WRITE_ZEROES, 0, offset, length),
                reject(NbdErrno::NoSpc, 0)
            );
            assert_eq!(
                verdict(&ctx, NBD_CMD_WRITE, 0, offset, length),
                reject(NbdErrno::NoSpc, length),
                "write beyond the end drains its payload",
            );
        }
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let ro = read_only();
        assert_eq!(
            verdict(&ro, NBD_CMD_WRITE, 0, 0, 4096),
            reject(NbdErrno::Perm, 4096)
        );
        assert_eq!(
            verdict(&ro, NBD_CMD_TRIM, 0, 0, 4096),
            reject(NbdErrno::Perm, 0)
        );
        assert_eq!(
            verdict(&ro, NBD_CMD_WRITE_ZEROES, 0, 0, 4096),
            reject(NbdErrno::Perm, 0)
        );
        assert!(matches!(
            verdict(&ro, NBD_CMD_READ, 0, 0, 4096),
            Verdict::Serve(_)
        ));
        assert!(matches!(
            verdict(&ro, NBD_CMD_FLUSH, 0, 0, 0),
            Verdict::Serve(_)
        ));
    }

    #[test]
    fn unaligned_requests_are_invalid() {
        let ctx = disk(ReplyStyle::Structured, true);
        for command in [
            NBD_CMD_READ,
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
        ] {
            assert_eq!(
                verdict(&ctx, command, 0, 1, 512),
                INVAL,
                "command {command}"
            );
            assert_eq!(
                verdict(&ctx, command, 0, 512, 100),
                INVAL,
                "command {command}"
            );
        }
        assert_eq!(
            verdict(&ctx, NBD_CMD_WRITE, 0, 0, 100),
            reject(NbdErrno::Inval, 100)
        );
    }

    #[test]
    fn oversize_payload_commands_are_invalid_or_disconnect() {
        let ctx = disk(ReplyStyle::Structured, true);
        let too_big = 32 * MIB + 512;
        assert_eq!(verdict(&ctx, NBD_CMD_READ, 0, 0, too_big), INVAL);
        assert_eq!(
            verdict(&ctx, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, too_big),
            reject(NbdErrno::Overflow, 0)
        );
        assert_eq!(verdict(&ctx, NBD_CMD_CACHE, 0, 0, too_big), INVAL);
        let max = verdict(&ctx, NBD_CMD_WRITE, 0, 0, 32 * MIB);
        assert!(matches!(max, Verdict::Serve(_)));
        assert!(matches!(
            verdict(&ctx, NBD_CMD_WRITE, 0, 0, too_big),
            Verdict::Disconnect(_)
        ));
        // A smaller advertised maximum is enforced; the payload is drained.
        let ro = read_only();
        let mut writable = ro.clone();
        writable.0.read_only = false;
        assert_eq!(verdict(&ro, NBD_CMD_READ, 0, 0, 2 * MIB), INVAL);
        assert_eq!(
            verdict(&writable, NBD_CMD_WRITE, 0, 0, 2 * MIB),
            reject(NbdErrno::Inval, 2 * MIB)
        );
        // No-payload commands are not capped.
        assert!(matches!(
            verdict(&ctx, NBD_CMD_TRIM, 0, 0, GIB),
            Verdict::Serve(_)
        ));
        assert!(matches!(
            verdict(&ctx, NBD_CMD_BLOCK_STATUS, 0, 0, GIB),
            Verdict::Serve(_)
        ));
    }

    #[test]
    fn zero_length_requests_are_invalid_not_disconnects() {
        let ctx = disk(ReplyStyle::Structured, true);
        for command in [
            NBD_CMD_READ,
            NBD_CMD_WRITE,
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
        ] {
            assert_eq!(
                verdict(&ctx, command, 0, 4096, 0),
                INVAL,
                "command {command}"
            );
        }
    }

    #[test]
    fn flags_must_be_known_applicable_and_advertised() {
        let simple = disk(ReplyStyle::Simple, false);
        let structured = disk(ReplyStyle::Structured, true);
        // Unknown bits.
        assert_eq!(verdict(&structured, NBD_CMD_READ, 1 << 6, 0, 512), INVAL);
        assert_eq!(verdict(&structured, NBD_CMD_READ, 1 << 15, 0, 512), INVAL);
        // DF needs structured replies (SEND_DF).
        assert_eq!(
            verdict(&simple, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
            INVAL
        );
        // Inapplicable flags.
        assert_eq!(
            verdict(&structured, NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 512),
            reject(NbdErrno::Inval, 512)
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512),
            reject(NbdErrno::Inval, 512)
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_TRIM, NBD_CMD_FLAG_NO_HOLE, 0, 512),
            INVAL
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 512),
            INVAL
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, 0, 512),
            INVAL
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_CACHE, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
            INVAL
        );
        assert_eq!(
            verdict(&structured, NBD_CMD_FLUSH, NBD_CMD_FLAG_NO_HOLE, 0, 0),
            INVAL
        );
        // FUA is accepted on every command when advertised...
        for command in [
            NBD_CMD_READ,
            NBD_CMD_WRITE,
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
        ] {
            let served = verdict(&structured, command, NBD_CMD_FLAG_FUA, 0, 512);
            assert!(matches!(served, Verdict::Serve(_)), "command {command}");
        }
        // ...and refused when not.
        let ro = read_only();
        assert_eq!(verdict(&ro, NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 4096), INVAL);
    }

    /// nbdkit asserts (aborts) on FAST_ZERO when it was not advertised.
    #[test]
    fn fast_zero_without_advertisement_is_einval_and_never_panics() {
        let (mut export, mut session) = disk(ReplyStyle::Simple, false);
        export.caps.fast_zero = false;
        session.transmission_flags = export.transmission_flags(ReplyStyle::Simple);
        assert_eq!(session.transmission_flags & NBD_FLAG_SEND_FAST_ZERO, 0);
        let request = request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 4096);
        assert_eq!(validate(&request, &export, &session), INVAL);
        let ro = read_only();
        assert_eq!(
            verdict(&ro, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 4096),
            INVAL
        );
    }

    #[test]
    fn unadvertised_commands_are_invalid() {
        let (export, session) = contexts()
            .into_iter()
            .find(|(export, session)| {
                export.name.is_empty() && session.reply_style == ReplyStyle::Simple
            })
            .unwrap();
        let ctx = (export, session);
        for command in [
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
        ] {
            assert_eq!(
                verdict(&ctx, command, 0, 0, 512),
                INVAL,
                "command {command}"
            );
        }
        let mut no_flush = ctx.clone();
        no_flush.1.transmission_flags &= !NBD_FLAG_SEND_FLUSH;
        assert_eq!(verdict(&no_flush, NBD_CMD_FLUSH, 0, 0, 0), INVAL);
    }

    #[test]
    fn block_status_needs_structured_replies_and_a_context() {
        assert_eq!(
            verdict(
                &disk(ReplyStyle::Simple, false),
                NBD_CMD_BLOCK_STATUS,
                0,
                0,
                512
            ),
            INVAL
        );
        assert_eq!(
            verdict(
                &disk(ReplyStyle::Structured, false),
                NBD_CMD_BLOCK_STATUS,
                0,
                0,
                512
            ),
            INVAL
        );
        assert_eq!(
            verdict(
                &disk(ReplyStyle::Extended, false),
                NBD_CMD_BLOCK_STATUS,
                0,
                0,
                512
            ),
            INVAL
        );
        let served = verdict(
            &disk(ReplyStyle::Extended, true),
            NBD_CMD_BLOCK_STATUS,
            0,
            0,
            512,
        );
        assert!(matches!(
            served,
            Verdict::Serve(Command::BlockStatus { .. })
        ));
    }

    #[test]
    fn flush_with_offset_or_length_is_invalid() {
        let ctx = disk(ReplyStyle::Simple, false);
        assert_eq!(verdict(&ctx, NBD_CMD_FLUSH, 0, 512, 0), INVAL);
        assert_eq!(verdict(&ctx, NBD_CMD_FLUSH, 0, 0, 512), INVAL);
    }

    #[test]
    fn disconnect_is_always_a_soft_disconnect() {
        let ctx = disk(ReplyStyle::Extended, true);
        for (flags, offset, length) in [
            (0, 0, 0),
            (0xffff, 7, 9),
            (NBD_CMD_FLAG_PAYLOAD_LEN, 0, u64::MAX),
        ] {
            assert_eq!(
                verdict(&ctx, NBD_CMD_DISC, flags, offset, length),
                Verdict::Serve(Command::Disconnect)
            );
        }
    }

    /// The surveyed Go and Rust servers disconnect on unknown commands.
    #[test]
    fn unknown_commands_and_resize_are_einval() {
        let ctx = disk(ReplyStyle::Simple, false);
        for command in [NBD_CMD_RESIZE, 9, 0x100, u16::MAX] {
            assert_eq!(
                verdict(&ctx, command, 0, 0, 1 << 31),
                INVAL,
                "command {command}"
            );
        }
    }

    fn any_request(extended: bool) -> impl Strategy<Value = Request> {
        let length_max = if extended {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        let offsets = prop_oneof![
            any::<u64>(),
            (0u64..(1 << 21)).prop_map(|block| block * 512)
        ];
        let lengths = prop_oneof![
            0..=length_max,
            (0u64..(1 << 17)).prop_map(|block| block * 512)
        ];
        (any::<u16>(), 0u16..10, offsets, lengths).prop_map(|(flags, command, offset, length)| {
            Request {
                flags,
                command,
                cookie: 1,
                offset,
                length,
            }
        })
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_keeps_framing(
            selector in any::<u8>(),
            compact in any_request(false),
            extended in any_request(true),
        ) {
            let contexts = contexts();
            let (_, session) = &contexts[usize::from(selector) % contexts.len()];
            let is_extended = session.reply_style == ReplyStyle::Extended;
            let request = if is_extended { extended } else { compact };
            let mut data = vec![selector];
            let mut header = [0u8; EXTENDED_REQUEST_BYTES];
            let header_bytes = encode_request(&request, is_extended, &mut header);
            let expected = if is_extended { EXTENDED_REQUEST_BYTES } else { REQUEST_BYTES };
            prop_assert_eq!(header_bytes, expected);
            data.extend_from_slice(&header[..header_bytes]);
            data.resize(data.len() + 4096, 0);
            harness::check_one_input(&data);
        }

        #[test]
        fn arbitrary_streams_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            harness::check_one_input(&data);
        }
    }
}
