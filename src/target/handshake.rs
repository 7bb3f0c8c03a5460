//! Fixed-newstyle option negotiation as a bounded, pure state machine (sans-I/O).
//!
//! The caller sends [`Handshake::greeting`], then feeds every received byte it has not yet
//! seen consumed to [`Handshake::advance`], sends what `advance` appended to `out`, and acts
//! on the returned [`Event`].
//!
//! # Buffering contract
//!
//! * Options whose payload is parsed (`NBD_OPT_EXPORT_NAME`, `INFO`, `GO`,
//!   `LIST_META_CONTEXT`, `SET_META_CONTEXT`) are processed only once header and payload are
//!   all in `input`; until then `advance` returns [`Event::NeedMore`] without consuming the
//!   option. The caller's receive buffer must therefore hold [`HANDSHAKE_INPUT_BYTES_MAX`].
//! * Every other payload (unknown options, options that must not carry data) is consumed as it
//!   arrives, across `advance` calls, without being buffered; the reply goes out once the
//!   whole payload has been read, so the option stream stays in sync whatever its size.
//! * Parsed payloads larger than `OPTION_BYTES_MAX` are skipped the same way and answered
//!   `NBD_REP_ERR_TOO_BIG` (an `NBD_OPT_EXPORT_NAME` longer than `NAME_BYTES_MAX`, which
//!   cannot be answered with an error, closes the connection).
//! * More than `OPTIONS_COUNT_MAX` options close the connection.
//!
//! # Termination contract
//!
//! `Done` and `Close` are final: `out` then holds the last replies to flush. After `Done` the
//! bytes of `input` beyond the consumed count belong to the transmission phase. Calling
//! `advance` again after a final event is a programmer error and panics.
//!
//! # Policy choices
//!
//! * Oldstyle and non-fixed newstyle are refused: a client without `NBD_FLAG_C_FIXED_NEWSTYLE`
//!   is closed, as is one setting unknown client flags.
//! * `NBD_OPT_INFO`/`NBD_OPT_GO` always send `NBD_INFO_EXPORT` (the real size) and
//!   `NBD_INFO_BLOCK_SIZE` (the backend may use O_DIRECT, so clients should obey it), and
//!   `NBD_INFO_NAME`/`NBD_INFO_DESCRIPTION` when requested (the description only if non-empty).
//!   Unaligned requests of clients that did not ask are failed with EINVAL by `validate`.
//! * Repeating `NBD_OPT_STRUCTURED_REPLY` or `NBD_OPT_EXTENDED_HEADERS` is answered
//!   `NBD_REP_ERR_INVALID`; structured replies after extended headers get
//!   `NBD_REP_ERR_EXT_HEADER_REQD`; `NBD_OPT_EXPORT_NAME` after extended headers closes.
//! * `base:allocation` gets the stable context id [`BASE_ALLOCATION_CONTEXT_ID`] and is only
//!   offered for exports whose backend implements block status.

use crate::target::codec::ReplyStyle;
use crate::target::export::ExportInfo;
use crate::target::proto::{
    BASE_ALLOCATION, BASE_NAMESPACE, CLIENT_FLAGS_BYTES, EXPORT_NAME_ZEROES_BYTES, IHAVEOPT,
    META_CONTEXT_QUERIES_MAX, NAME_BYTES_MAX, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_EXTENDED_HEADERS,
    NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_EXT_HEADER_REQD,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBDMAGIC, OPTION_BYTES_MAX, OPTION_HEADER_BYTES,
    OPTION_REPLY_HEADER_BYTES, OPTIONS_COUNT_MAX,
};

/// Receive buffer the caller needs during the handshake: one option header plus the largest
/// option payload that is parsed (64 KiB), in bytes. A smaller buffer can stall a client whose
/// option fits this bound but not the buffer.
pub const HANDSHAKE_INPUT_BYTES_MAX: usize = OPTION_HEADER_BYTES + OPTION_BYTES_MAX;
/// Metadata context id of `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies and in
/// `NBD_CMD_BLOCK_STATUS` chunks. Stable for the life of the server.
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
/// Context id in `NBD_OPT_LIST_META_CONTEXT` replies (reserved by the spec; "SHOULD be 0").
const LIST_META_CONTEXT_ID: u32 = 0;
/// Handshake flags we offer.
const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
/// Client flags we understand.
const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

const _: () = assert!(BASE_ALLOCATION_CONTEXT_ID != LIST_META_CONTEXT_ID);
const _: () = assert!(CLIENT_FLAGS_BYTES == 4);
const _: () = assert!(HANDSHAKE_INPUT_BYTES_MAX == 64 * 1024);

/// TLS policy of the listener (the spec's three modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// NOTLS: `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// SELECTIVETLS: STARTTLS is offered; exports the [`Gate`] marks TLS-only need it.
    On,
    /// FORCEDTLS: every option but STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up; `NBD_OPT_EXPORT_NAME` before it closes the connection.
    Require,
}

/// Whether this client may use one export: decided by the caller (access rules, TLS state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Listed and usable.
    Allowed,
    /// Hidden from LIST; INFO/GO answer `NBD_REP_ERR_TLS_REQD` (the client is not on TLS).
    TlsRequired,
    /// Hidden from LIST; INFO/GO answer `NBD_REP_ERR_POLICY` with this reason.
    Forbidden(&'static str),
}

/// The caller's admission decisions, asked during negotiation (sans-I/O: the handshake never
/// looks at addresses, certificates or counters itself).
pub trait Gate {
    /// May this client see and use `export`? `tls` is true once STARTTLS has completed.
    fn access(&self, export: &ExportInfo, tls: bool) -> Access;
    /// The client chose `export` (GO or EXPORT_NAME) and may use it: take a connection slot.
    /// An error (for example a full per-export connection limit) refuses the GO with
    /// `NBD_REP_ERR_POLICY` and this reason. A successful claim is followed by `Done`.
    fn claim(&mut self, export: &ExportInfo) -> Result<(), &'static str>;
    /// INFO, GO, EXPORT_NAME or a meta context option named `export` and was refused by
    /// [`Gate::access`] (for the caller's logs; LIST filtering does not call this).
    fn refused(&mut self, _export: &ExportInfo, _tls: bool) {}
}

/// A gate that admits everyone to everything (tests, fuzzing, the default listener).
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenGate;

impl Gate for OpenGate {
    fn access(&self, _export: &ExportInfo, _tls: bool) -> Access {
        Access::Allowed
    }

    fn claim(&mut self, _export: &ExportInfo) -> Result<(), &'static str> {
        Ok(())
    }
}

/// Per-listener handshake settings.
#[derive(Debug, Clone, Default)]
pub struct HandshakeConfig {
    /// TLS mode.
    pub tls: TlsPolicy,
}

/// What the data plane needs after negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `ExportInfo::id` of the chosen export.
    pub export_id: usize,
    /// Reply framing: simple, structured or extended.
    pub reply_style: ReplyStyle,
    /// Negotiated `base:allocation` context id, if `NBD_CMD_BLOCK_STATUS` may be used.
    pub base_allocation: Option<u32>,
    /// Transmission flags sent to the client (what `validate` treats as advertised).
    pub transmission_flags: u16,
}

/// Result of [`Handshake::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Call again with more input (keeping the unconsumed bytes).
    NeedMore,
    /// Negotiation succeeded: flush `out`, then switch to transmission with this session.
    Done(Session),
    /// Flush `out`, then close the connection; the reason is for logs.
    Close(&'static str),
    /// `NBD_OPT_STARTTLS` was accepted: flush `out` (the ACK, in plaintext), then run a TLS
    /// server handshake on the connection. The bytes of `input` beyond the consumed count are
    /// TLS records; once TLS is up, call `advance` again with the decrypted bytes.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 4-byte client flags.
    ClientFlags,
    /// Waiting for an option header (and, for parsed options, its payload).
    Options,
    /// Discarding `remaining` payload bytes of `option`, then replying `reply`.
    Skipping {
        option: u32,
        remaining: u32,
        reply: u32,
        message: &'static str,
    },
    /// `Done` or `Close` was returned.
    Finished,
}

/// One step of the state machine: bytes consumed, and an event to return (or `None` to keep
/// going).
struct Step {
    consumed: usize,
    event: Option<Event>,
}

impl Step {
    fn next(consumed: usize) -> Step {
        Step {
            consumed,
            event: None,
        }
    }

    fn stop(consumed: usize, event: Event) -> Step {
        Step {
            consumed,
            event: Some(event),
        }
    }
}

/// The negotiation state of one connection.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    phase: Phase,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    shutting_down: bool,
    /// `ExportInfo::id` of the export whose `base:allocation` context is selected.
    meta_export_id: Option<usize>,
    options_count: u32,
    /// STARTTLS succeeded: everything since is encrypted.
    tls: bool,
}

impl Handshake {
    /// A handshake waiting for the client flags.
    pub fn new(config: HandshakeConfig) -> Handshake {
        Handshake {
            config,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            extended: false,
            shutting_down: false,
            meta_export_id: None,
            options_count: 0,
            tls: false,
        }
    }

    /// Appends the server greeting: NBDMAGIC, IHAVEOPT, handshake flags
    /// `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    }

    /// The server is shutting down: every further option except `NBD_OPT_ABORT` is answered
    /// `NBD_REP_ERR_SHUTDOWN` (`NBD_OPT_EXPORT_NAME`, which cannot fail, closes).
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Feeds everything received and not yet consumed; appends any bytes to send to `out`.
    /// Returns the bytes of `input` consumed and what to do next (see the module docs).
    ///
    /// # Panics
    ///
    /// If called after `Done` or `Close` was returned.
    pub fn advance(
        &mut self,
        input: &[u8],
        exports: &[ExportInfo],
        out: &mut Vec<u8>,
    ) -> (usize, Event) {
        self.advance_gated(input, exports, &mut OpenGate, out)
    }

    /// [`Handshake::advance`] with the caller's admission decisions.
    ///
    /// # Panics
    ///
    /// If called after `Done` or `Close` was returned.
    pub fn advance_gated(
        &mut self,
        input: &[u8],
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> (usize, Event) {
        assert!(
            self.phase != Phase::Finished,
            "Handshake::advance after Done or Close"
        );
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            let step = match self.phase {
                Phase::ClientFlags => self.client_flags(rest),
                Phase::Options => self.option(rest, exports, gate, out),
                Phase::Skipping { .. } => self.skip(rest, out),
                Phase::Finished => unreachable!("checked above"),
            };
            assert!(step.consumed <= rest.len(), "consumed more than the input");
            consumed += step.consumed;
            if let Some(event) = step.event {
                if !matches!(event, Event::NeedMore | Event::StartTls) {
                    self.phase = Phase::Finished;
                }
                return (consumed, event);
            }
        }
    }

    /// FORCEDTLS and TLS is not up yet.
    fn tls_missing(&self) -> bool {
        self.config.tls == TlsPolicy::Require && !self.tls
    }

    /// The spec: state negotiated before STARTTLS MUST be dropped (structured replies,
    /// extended headers, meta contexts); options are counted across it.
    fn start_tls(&mut self) {
        self.tls = true;
        self.structured = false;
        self.extended = false;
        self.meta_export_id = None;
    }

    /// The export named `name` as this client may see it: `Err` holds the option reply and
    /// message for an unknown, TLS-only or forbidden export.
    fn lookup<'a>(
        &self,
        exports: &'a [ExportInfo],
        gate: &mut dyn Gate,
        name: &[u8],
    ) -> Result<&'a ExportInfo, (u32, &'static str)> {
        let Some(export) = find_export(exports, name) else {
            return Err((NBD_REP_ERR_UNKNOWN, "unknown export"));
        };
        let access = gate.access(export, self.tls);
        let refusal = match access {
            Access::Allowed => return Ok(export),
            Access::TlsRequired => (NBD_REP_ERR_TLS_REQD, "export requires TLS"),
            Access::Forbidden(reason) => (NBD_REP_ERR_POLICY, reason),
        };
        gate.refused(export, self.tls);
        Err(refusal)
    }

    fn reply_style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }

    fn client_flags(&mut self, input: &[u8]) -> Step {
        let Some(flags) = read_u32(input, 0) else {
            return Step::stop(0, Event::NeedMore);
        };
        if flags & !CLIENT_FLAGS_KNOWN != 0 {
            return Step::stop(CLIENT_FLAGS_BYTES, Event::Close("unknown client flags"));
        }
        if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
            return Step::stop(
                CLIENT_FLAGS_BYTES,
                Event::Close("client does not speak fixed newstyle"),
            );
        }
        self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
        Step::next(CLIENT_FLAGS_BYTES)
    }

    /// Parses one option header and dispatches on the option.
    fn option(
        &mut self,
        input: &[u8],
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> Step {
        if input.len() < OPTION_HEADER_BYTES {
            return Step::stop(0, Event::NeedMore);
        }
        if read_u64(input, 0) != Some(IHAVEOPT) {
            return Step::stop(0, Event::Close("bad option magic"));
        }
        let option = read_u32(input, 8).expect("header length checked");
        let length = read_u32(input, 12).expect("header length checked");
        if self.options_count >= OPTIONS_COUNT_MAX {
            return Step::stop(0, Event::Close("too many options"));
        }
        match option {
            NBD_OPT_ABORT => {
                self.options_count += 1;
                // Any payload is ignored: the connection closes right after the ACK.
                write_reply(out, option, NBD_REP_ACK, &[]);
                Step::stop(
                    OPTION_HEADER_BYTES,
                    Event::Close("client sent NBD_OPT_ABORT"),
                )
            }
            NBD_OPT_EXPORT_NAME if self.shutting_down => {
                Step::stop(0, Event::Close("NBD_OPT_EXPORT_NAME while shutting down"))
            }
            _ if self.shutting_down => {
                self.skip_then_reply(option, length, NBD_REP_ERR_SHUTDOWN, "server shutting down")
            }
            NBD_OPT_EXPORT_NAME if self.tls_missing() => Step::stop(
                0,
                Event::Close("NBD_OPT_EXPORT_NAME before the required TLS"),
            ),
            NBD_OPT_STARTTLS => self.unparsed_option(option, length, exports, gate, out),
            _ if self.tls_missing() => {
                self.skip_then_reply(option, length, NBD_REP_ERR_TLS_REQD, "TLS is required")
            }
            NBD_OPT_EXPORT_NAME
            | NBD_OPT_INFO
            | NBD_OPT_GO
            | NBD_OPT_LIST_META_CONTEXT
            | NBD_OPT_SET_META_CONTEXT => {
                self.parsed_option(input, option, length, exports, gate, out)
            }
            _ => self.unparsed_option(option, length, exports, gate, out),
        }
    }

    /// Options whose payload is never parsed: the reply is decided now, sent once the payload
    /// has been skipped.
    fn unparsed_option(
        &mut self,
        option: u32,
        length: u32,
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> Step {
        let has_data = length > 0;
        let (reply, message) = match option {
            NBD_OPT_LIST
            | NBD_OPT_STARTTLS
            | NBD_OPT_STRUCTURED_REPLY
            | NBD_OPT_EXTENDED_HEADERS
                if has_data =>
            {
                (NBD_REP_ERR_INVALID, "option does not take data")
            }
            NBD_OPT_LIST => {
                self.options_count += 1;
                self.list(exports, gate, out);
                return Step::next(OPTION_HEADER_BYTES);
            }
            NBD_OPT_STARTTLS if self.config.tls == TlsPolicy::Off => {
                (NBD_REP_ERR_POLICY, "TLS is not enabled on this server")
            }
            NBD_OPT_STARTTLS if self.tls => (NBD_REP_ERR_INVALID, "TLS already negotiated"),
            NBD_OPT_STARTTLS => {
                self.options_count += 1;
                write_reply(out, option, NBD_REP_ACK, &[]);
                self.start_tls();
                return Step::stop(OPTION_HEADER_BYTES, Event::StartTls);
            }
            NBD_OPT_STRUCTURED_REPLY if self.extended => (
                NBD_REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated",
            ),
            NBD_OPT_STRUCTURED_REPLY if self.structured => {
                (NBD_REP_ERR_INVALID, "structured replies already negotiated")
            }
            NBD_OPT_STRUCTURED_REPLY => {
                self.structured = true;
                (NBD_REP_ACK, "")
            }
            NBD_OPT_EXTENDED_HEADERS if self.extended => {
                (NBD_REP_ERR_INVALID, "extended headers already negotiated")
            }
            NBD_OPT_EXTENDED_HEADERS => {
                self.extended = true;
                (NBD_REP_ACK, "")
            }
            _ => (NBD_REP_ERR_UNSUP, "option not supported"),
        };
        self.skip_then_reply(option, length, reply, message)
    }

    /// Counts the option and enters the skipping phase (the reply goes out once `length`
    /// payload bytes have been consumed, possibly right away).
    fn skip_then_reply(
        &mut self,
        option: u32,
        length: u32,
        reply: u32,
        message: &'static str,
    ) -> Step {
        self.options_count += 1;
        self.phase = Phase::Skipping {
            option,
            remaining: length,
            reply,
            message,
        };
        Step::next(OPTION_HEADER_BYTES)
    }

    fn skip(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        let Phase::Skipping {
            option,
            remaining,
            reply,
            message,
        } = self.phase
        else {
            unreachable!("skip outside Phase::Skipping");
        };
        let take = input.len().min(remaining as usize);
        let remaining = remaining - u32::try_from(take).expect("take <= remaining");
        if remaining > 0 {
            self.phase = Phase::Skipping {
                option,
                remaining,
                reply,
                message,
            };
            return Step::stop(take, Event::NeedMore);
        }
        write_reply(out, option, reply, &[message.as_bytes()]);
        self.phase = Phase::Options;
        Step::next(take)
    }

    /// Options whose payload is buffered whole and parsed.
    fn parsed_option(
        &mut self,
        input: &[u8],
        option: u32,
        length: u32,
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> Step {
        let length = length as usize;
        if option == NBD_OPT_SET_META_CONTEXT {
            // SET replaces the selection even when it fails.
            self.meta_export_id = None;
        }
        if option == NBD_OPT_EXPORT_NAME {
            if self.extended {
                let reason = "NBD_OPT_EXPORT_NAME after extended headers";
                return Step::stop(0, Event::Close(reason));
            }
            if length > NAME_BYTES_MAX {
                return Step::stop(0, Event::Close("NBD_OPT_EXPORT_NAME name too long"));
            }
        }
        if length > OPTION_BYTES_MAX {
            let length = u32::try_from(length).expect("option length came from a u32");
            return self.skip_then_reply(option, length, NBD_REP_ERR_TOO_BIG, "option too big");
        }
        let end = OPTION_HEADER_BYTES + length;
        if input.len() < end {
            return Step::stop(0, Event::NeedMore);
        }
        self.options_count += 1;
        let payload = &input[OPTION_HEADER_BYTES..end];
        let event = match option {
            NBD_OPT_EXPORT_NAME => Some(self.export_name(payload, exports, gate, out)),
            NBD_OPT_INFO | NBD_OPT_GO => self.info_or_go(option, payload, exports, gate, out),
            _ => {
                self.meta_context(option, payload, exports, gate, out);
                None
            }
        };
        Step {
            consumed: end,
            event,
        }
    }

    /// Lists the exports this client may use (TLS-only ones are hidden from plaintext
    /// clients, forbidden ones from everyone).
    fn list(&self, exports: &[ExportInfo], gate: &dyn Gate, out: &mut Vec<u8>) {
        let visible = exports
            .iter()
            .filter(|export| gate.access(export, self.tls) == Access::Allowed);
        for export in visible {
            assert!(export.name.len() <= NAME_BYTES_MAX, "export name too long");
            let name_bytes = u32::try_from(export.name.len()).expect("name fits u32");
            let description = wire_string(&export.description);
            write_reply(
                out,
                NBD_OPT_LIST,
                NBD_REP_SERVER,
                &[
                    &name_bytes.to_be_bytes(),
                    export.name.as_bytes(),
                    description,
                ],
            );
        }
        write_reply(out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
    }

    fn session(&self, export: &ExportInfo) -> Session {
        let reply_style = self.reply_style();
        let base_allocation = (self.meta_export_id == Some(export.id)
            && reply_style != ReplyStyle::Simple
            && export.caps.block_status)
            .then_some(BASE_ALLOCATION_CONTEXT_ID);
        Session {
            export_id: export.id,
            reply_style,
            base_allocation,
            transmission_flags: export.transmission_flags(reply_style),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: the whole payload is the name; no error reply is possible.
    fn export_name(
        &self,
        name: &[u8],
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> Event {
        let export = match self.lookup(exports, gate, name) {
            Ok(export) => export,
            Err((NBD_REP_ERR_UNKNOWN, _)) => {
                return Event::Close("NBD_OPT_EXPORT_NAME for an unknown export");
            }
            Err(_) => return Event::Close("NBD_OPT_EXPORT_NAME for an export it may not use"),
        };
        if let Err(reason) = gate.claim(export) {
            return Event::Close(reason);
        }
        let session = self.session(export);
        out.extend_from_slice(&export.size.to_be_bytes());
        out.extend_from_slice(&session.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES_BYTES]);
        }
        Event::Done(session)
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: u32 name length, name, u16 count, count × u16 info type.
    fn info_or_go(
        &self,
        option: u32,
        payload: &[u8],
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) -> Option<Event> {
        let Some(request) = parse_info_request(payload) else {
            let message = "malformed NBD_OPT_INFO/NBD_OPT_GO payload";
            write_reply(out, option, NBD_REP_ERR_INVALID, &[message.as_bytes()]);
            return None;
        };
        let export = match self.lookup(exports, gate, request.name) {
            Ok(export) => export,
            Err((reply, message)) => {
                write_reply(out, option, reply, &[message.as_bytes()]);
                return None;
            }
        };
        if option == NBD_OPT_GO
            && let Err(reason) = gate.claim(export)
        {
            write_reply(out, option, NBD_REP_ERR_POLICY, &[reason.as_bytes()]);
            return None;
        }
        let session = self.session(export);
        let block = &export.block_size;
        write_reply(
            out,
            option,
            NBD_REP_INFO,
            &[
                &NBD_INFO_EXPORT.to_be_bytes(),
                &export.size.to_be_bytes(),
                &session.transmission_flags.to_be_bytes(),
            ],
        );
        write_reply(
            out,
            option,
            NBD_REP_INFO,
            &[
                &NBD_INFO_BLOCK_SIZE.to_be_bytes(),
                &block.minimum.to_be_bytes(),
                &block.preferred.to_be_bytes(),
                &block.payload_bytes_max().to_be_bytes(),
            ],
        );
        if request.wants_name {
            assert!(export.name.len() <= NAME_BYTES_MAX, "export name too long");
            let name = export.name.as_bytes();
            write_reply(
                out,
                option,
                NBD_REP_INFO,
                &[&NBD_INFO_NAME.to_be_bytes(), name],
            );
        }
        if request.wants_description && !export.description.is_empty() {
            let description = wire_string(&export.description);
            let info = NBD_INFO_DESCRIPTION.to_be_bytes();
            write_reply(out, option, NBD_REP_INFO, &[&info, description]);
        }
        write_reply(out, option, NBD_REP_ACK, &[]);
        (option == NBD_OPT_GO).then_some(Event::Done(session))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` (the caller has already
    /// cleared the selection for SET).
    fn meta_context(
        &mut self,
        option: u32,
        payload: &[u8],
        exports: &[ExportInfo],
        gate: &mut dyn Gate,
        out: &mut Vec<u8>,
    ) {
        if !self.structured && !self.extended {
            let message = "negotiate structured replies or extended headers first";
            write_reply(out, option, NBD_REP_ERR_INVALID, &[message.as_bytes()]);
            return;
        }
        let request = match parse_meta_request(payload, option == NBD_OPT_LIST_META_CONTEXT) {
            Ok(request) => request,
            Err((reply, message)) => {
                write_reply(out, option, reply, &[message.as_bytes()]);
                return;
            }
        };
        let export = match self.lookup(exports, gate, request.name) {
            Ok(export) => export,
            Err((reply, message)) => {
                write_reply(out, option, reply, &[message.as_bytes()]);
                return;
            }
        };
        if request.base_allocation && export.caps.block_status {
            let id = if option == NBD_OPT_SET_META_CONTEXT {
                self.meta_export_id = Some(export.id);
                BASE_ALLOCATION_CONTEXT_ID
            } else {
                LIST_META_CONTEXT_ID
            };
            let context = [&id.to_be_bytes()[..], BASE_ALLOCATION.as_bytes()];
            write_reply(out, option, NBD_REP_META_CONTEXT, &context);
        }
        write_reply(out, option, NBD_REP_ACK, &[]);
    }
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
struct InfoRequest<'a> {
    name: &'a [u8],
    wants_name: bool,
    wants_description: bool,
}

fn parse_info_request(payload: &[u8]) -> Option<InfoRequest<'_>> {
    let name_bytes = read_u32(payload, 0)? as usize;
    // The spec: name length MUST be no larger than the option data length - 6.
    if name_bytes > payload.len().checked_sub(4 + 2)? || name_bytes > NAME_BYTES_MAX {
        return None;
    }
    let name = &payload[4..4 + name_bytes];
    let count_at = 4 + name_bytes;
    let count = usize::from(read_u16(payload, count_at)?);
    let requests = &payload[count_at + 2..];
    if requests.len() != count * 2 {
        return None;
    }
    let mut request = InfoRequest {
        name,
        wants_name: false,
        wants_description: false,
    };
    for info in requests.chunks_exact(2) {
        match u16::from_be_bytes([info[0], info[1]]) {
            NBD_INFO_NAME => request.wants_name = true,
            NBD_INFO_DESCRIPTION => request.wants_description = true,
            // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; unknown ones ignored.
            _ => {}
        }
    }
    Some(request)
}

/// A parsed meta context payload: the export name and whether a query selects
/// `base:allocation`.
struct MetaRequest<'a> {
    name: &'a [u8],
    base_allocation: bool,
}

/// Parses u32 name length, name, u32 query count, count × (u32 length, query). `list`
/// enables the LIST rules: no query lists everything, `base:` is a wildcard.
fn parse_meta_request(payload: &[u8], list: bool) -> Result<MetaRequest<'_>, (u32, &'static str)> {
    const MALFORMED: (u32, &str) = (NBD_REP_ERR_INVALID, "malformed meta context payload");
    let name_bytes = read_u32(payload, 0).ok_or(MALFORMED)? as usize;
    if name_bytes > NAME_BYTES_MAX {
        return Err((NBD_REP_ERR_INVALID, "export name too long"));
    }
    let name = payload.get(4..4 + name_bytes).ok_or(MALFORMED)?;
    let mut at = 4 + name_bytes;
    let count = read_u32(payload, at).ok_or(MALFORMED)? as usize;
    at += 4;
    if count > META_CONTEXT_QUERIES_MAX {
        return Err((NBD_REP_ERR_TOO_BIG, "too many meta context queries"));
    }
    let mut base_allocation = list && count == 0;
    for _ in 0..count {
        let query_bytes = read_u32(payload, at).ok_or(MALFORMED)? as usize;
        if query_bytes > NAME_BYTES_MAX {
            return Err((NBD_REP_ERR_INVALID, "meta context query too long"));
        }
        let query = payload.get(at + 4..at + 4 + query_bytes).ok_or(MALFORMED)?;
        at += 4 + query_bytes;
        let wildcard = list && query == BASE_NAMESPACE.as_bytes();
        // Unknown namespaces and unknown `base:` leaves are ignored, as the spec requires.
        base_allocation |= wildcard || query == BASE_ALLOCATION.as_bytes();
    }
    if at != payload.len() {
        return Err(MALFORMED);
    }
    Ok(MetaRequest {
        name,
        base_allocation,
    })
}

fn find_export<'a>(exports: &'a [ExportInfo], name: &[u8]) -> Option<&'a ExportInfo> {
    exports.iter().find(|export| export.name.as_bytes() == name)
}

/// `text` cut to at most `NAME_BYTES_MAX` bytes on a character boundary.
fn wire_string(text: &str) -> &[u8] {
    let mut end = text.len().min(NAME_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// Appends one option reply whose payload is the concatenation of `parts`.
fn write_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, parts: &[&[u8]]) {
    let payload_bytes: usize = parts.iter().map(|part| part.len()).sum();
    let payload_bytes = u32::try_from(payload_bytes).expect("option reply fits u32");
    out.reserve(OPTION_REPLY_HEADER_BYTES + payload_bytes as usize);
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&payload_bytes.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let word = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([word[0], word[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let high = u64::from(read_u32(bytes, at)?);
    let low = u64::from(read_u32(bytes, at.checked_add(4)?)?);
    Some(high << 32 | low)
}

/// The fuzz harness for the handshake, in the library so that `fuzz/` and the seed-replay
/// test run exactly the same invariant checks.
pub mod harness {
    use super::{Access, Event, Gate, Handshake, HandshakeConfig, Session, TlsPolicy};
    use crate::target::codec::ReplyStyle;
    use crate::target::export::{BlockSize, Capabilities, ExportInfo};
    use crate::target::proto::{
        EXPORT_NAME_ZEROES_BYTES, GREETING_BYTES, NBD_REP_MAGIC, OPTION_REPLY_HEADER_BYTES,
    };

    /// Output bytes one `advance` call may produce at most for [`exports`]: enough for a LIST
    /// of every export after a maximal run of small options.
    pub const OUTPUT_BYTES_MAX: usize = 1 << 20;

    /// A small fixed export list: a full-featured disk, a read-only image without block
    /// status, and the default export "" with byte granularity.
    pub fn exports() -> Vec<ExportInfo> {
        let all = Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            block_status: true,
            multi_conn: true,
            rotational: false,
        };
        let block = BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        };
        vec![
            ExportInfo {
                id: 0,
                name: "disk".into(),
                description: "a test disk".into(),
                size: 1 << 30,
                read_only: false,
                caps: all,
                block_size: block,
            },
            ExportInfo {
                id: 1,
                name: "ro".into(),
                description: String::new(),
                size: 1 << 20,
                read_only: true,
                caps: Capabilities {
                    flush: true,
                    ..Capabilities::default()
                },
                block_size: BlockSize {
                    minimum: 4096,
                    preferred: 4096,
                    maximum: 1 << 20,
                },
            },
            ExportInfo {
                id: 2,
                name: String::new(),
                description: "default".into(),
                size: 12345,
                read_only: false,
                caps: Capabilities {
                    flush: true,
                    fua: true,
                    ..Capabilities::default()
                },
                block_size: BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: u32::MAX,
                },
            },
        ]
    }

    /// Split seeds whose low byte is this run the handshake in shutdown mode.
    const SHUTDOWN_SEED_BYTE: u64 = 0xff;
    /// Low bytes selecting forced TLS, and selective TLS with a restrictive gate.
    const FORCED_TLS_SEED_BYTE: u64 = 0xfe;
    const SELECTIVE_TLS_SEED_BYTE: u64 = 0xfd;

    /// The gate of selective-TLS runs: "disk" is TLS-only, "ro" forbidden, one claim allowed.
    #[derive(Debug)]
    pub struct HarnessGate {
        restrictive: bool,
        claims: u32,
    }

    impl Gate for HarnessGate {
        fn access(&self, export: &ExportInfo, tls: bool) -> Access {
            match export.id {
                _ if !self.restrictive => Access::Allowed,
                0 if !tls => Access::TlsRequired,
                1 => Access::Forbidden("forbidden by the harness"),
                _ => Access::Allowed,
            }
        }

        fn claim(&mut self, _export: &ExportInfo) -> Result<(), &'static str> {
            if self.restrictive && self.claims > 0 {
                return Err("claim budget spent");
            }
            self.claims += 1;
            Ok(())
        }
    }

    fn new_handshake(split_seed: u64) -> (Handshake, HarnessGate) {
        let tls = match split_seed & 0xff {
            FORCED_TLS_SEED_BYTE => TlsPolicy::Require,
            SELECTIVE_TLS_SEED_BYTE => TlsPolicy::On,
            _ => TlsPolicy::Off,
        };
        let mut handshake = Handshake::new(HandshakeConfig { tls });
        if split_seed & 0xff == SHUTDOWN_SEED_BYTE {
            handshake.begin_shutdown();
        }
        let gate = HarnessGate {
            restrictive: tls == TlsPolicy::On,
            claims: 0,
        };
        (handshake, gate)
    }

    /// Feeds `input` in chunks whose sizes come from `split_seed` (whose low byte 0xff also
    /// selects shutdown mode, 0xfe forced TLS, 0xfd selective TLS with a restrictive gate);
    /// returns the output, the first event other than `NeedMore` and the bytes consumed up
    /// to it. Asserts the per-call invariants.
    pub fn run_chunked(input: &[u8], split_seed: u64) -> (Vec<u8>, Event, usize) {
        let exports = exports();
        let (mut handshake, mut gate) = new_handshake(split_seed);
        let mut out = Vec::new();
        handshake.greeting(&mut out);
        assert_eq!(out.len(), GREETING_BYTES);
        let mut seed = split_seed | 1;
        let (mut consumed, mut fed) = (0, 0);
        loop {
            // xorshift: chunk sizes from 0 to 63 bytes, mostly small.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            fed = (fed + (seed % 64) as usize).min(input.len());
            let before = out.len();
            let chunk = &input[consumed..fed];
            let (used, event) = handshake.advance_gated(chunk, &exports, &mut gate, &mut out);
            assert!(used <= fed - consumed, "consumed more than fed");
            assert!(out.len() - before <= OUTPUT_BYTES_MAX, "unbounded output");
            consumed += used;
            if event != Event::NeedMore || (fed == input.len() && used == 0) {
                return (out, event, consumed);
            }
        }
    }

    /// The fuzz entry point: the first 8 bytes seed the split points, the rest is client
    /// input. Chunked and whole-buffer feeding must agree, and the output must be well
    /// formed.
    pub fn check_one_input(data: &[u8]) {
        let (seed, input) = match data.split_first_chunk::<8>() {
            Some((seed, input)) => (u64::from_le_bytes(*seed), input),
            None => (0, data),
        };
        let (whole_out, whole_event, whole_consumed) = run_whole(input, seed);
        let (out, event, consumed) = run_chunked(input, seed);
        assert_eq!(event, whole_event, "chunking changed the event");
        assert_eq!(out, whole_out, "chunking changed the output");
        assert_eq!(consumed, whole_consumed, "chunking changed the consumption");
        check_output(&out[GREETING_BYTES..], &event);
        if let Event::Done(session) = &event {
            check_session(session);
            // No TLS ever comes up here: the gate's decisions must hold.
            match seed & 0xff {
                FORCED_TLS_SEED_BYTE => panic!("a session without the required TLS"),
                SELECTIVE_TLS_SEED_BYTE => assert_eq!(session.export_id, 2, "gate bypassed"),
                _ => {}
            }
        }
    }

    fn run_whole(input: &[u8], split_seed: u64) -> (Vec<u8>, Event, usize) {
        let exports = exports();
        let (mut handshake, mut gate) = new_handshake(split_seed);
        let mut out = Vec::new();
        handshake.greeting(&mut out);
        let (consumed, event) = handshake.advance_gated(input, &exports, &mut gate, &mut out);
        assert!(consumed <= input.len());
        (out, event, consumed)
    }

    /// Every reply is a well-formed option reply, except the `NBD_OPT_EXPORT_NAME` answer that
    /// may end a successful handshake.
    fn check_output(mut out: &[u8], event: &Event) {
        while !out.is_empty() {
            if out.len() >= OPTION_REPLY_HEADER_BYTES && out[..8] == NBD_REP_MAGIC.to_be_bytes() {
                let length = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
                assert!(
                    out.len() >= OPTION_REPLY_HEADER_BYTES + length,
                    "truncated reply"
                );
                out = &out[OPTION_REPLY_HEADER_BYTES + length..];
                continue;
            }
            let export_name_reply = [8 + 2, 8 + 2 + EXPORT_NAME_ZEROES_BYTES];
            assert!(matches!(event, Event::Done(_)), "garbage in the output");
            assert!(
                export_name_reply.contains(&out.len()),
                "bad NBD_OPT_EXPORT_NAME reply"
            );
            return;
        }
    }

    fn check_session(session: &Session) {
        let exports = exports();
        let export = &exports[session.export_id];
        assert_eq!(
            session.transmission_flags,
            export.transmission_flags(session.reply_style)
        );
        if session.base_allocation.is_some() {
            assert!(session.reply_style != ReplyStyle::Simple);
            assert!(export.caps.block_status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::harness::exports;
    use super::*;
    use crate::target::proto::{
        NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE,
        NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_OPT_PEEK_EXPORT,
    };
    use proptest::prelude::*;

    const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;
    const FIXED_NO_ZEROES: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

    fn opt(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn rep(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_reply(&mut bytes, option, reply_type, &[payload]);
        bytes
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut bytes = (name.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            bytes.extend_from_slice(&info.to_be_bytes());
        }
        bytes
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut bytes = (name.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for query in queries {
            bytes.extend_from_slice(&(query.len() as u32).to_be_bytes());
            bytes.extend_from_slice(query.as_bytes());
        }
        bytes
    }

    fn stream(client_flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = client_flags.to_be_bytes().to_vec();
        for option in options {
            bytes.extend_from_slice(option);
        }
        bytes
    }

    /// Runs a whole input through a fresh handshake; returns (output without greeting,
    /// consumed, event).
    fn run(input: &[u8]) -> (Vec<u8>, usize, Event) {
        let mut handshake = Handshake::new(HandshakeConfig::default());
        let mut out = Vec::new();
        let (consumed, event) = handshake.advance(input, &exports(), &mut out);
        (out, consumed, event)
    }

    fn info_export(option: u32, export: &ExportInfo, style: ReplyStyle) -> Vec<u8> {
        let mut payload = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        payload.extend_from_slice(&export.size.to_be_bytes());
        payload.extend_from_slice(&export.transmission_flags(style).to_be_bytes());
        rep(option, NBD_REP_INFO, &payload)
    }

    fn info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
        let mut payload = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for value in [minimum, preferred, maximum] {
            payload.extend_from_slice(&value.to_be_bytes());
        }
        rep(option, NBD_REP_INFO, &payload)
    }

    fn ack(option: u32) -> Vec<u8> {
        rep(option, NBD_REP_ACK, &[])
    }

    fn error_type(out: &[u8]) -> u32 {
        u32::from_be_bytes([out[12], out[13], out[14], out[15]])
    }

    fn session(export_id: usize, style: ReplyStyle, base_allocation: Option<u32>) -> Session {
        Session {
            export_id,
            reply_style: style,
            base_allocation,
            transmission_flags: exports()[export_id].transmission_flags(style),
        }
    }

    #[test]
    fn greeting_is_exact() {
        let mut out = Vec::new();
        Handshake::new(HandshakeConfig::default()).greeting(&mut out);
        assert_eq!(out, b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn client_flags_are_validated() {
        for flags in [0, NBD_FLAG_C_NO_ZEROES, FIXED | 4, 1 << 31] {
            let (out, consumed, event) = run(&flags.to_be_bytes());
            assert!(matches!(event, Event::Close(_)), "flags {flags:#x}");
            assert!(out.is_empty());
            assert_eq!(consumed, 4);
        }
        assert_eq!(run(&[0, 0, 0]), (Vec::new(), 0, Event::NeedMore));
        assert_eq!(run(&FIXED.to_be_bytes()), (Vec::new(), 4, Event::NeedMore));
    }

    #[test]
    fn export_name_replies_size_flags_and_zeroes() {
        let input = stream(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]);
        let (out, consumed, event) = run(&input);
        let export = &exports()[0];
        let mut expected = export.size.to_be_bytes().to_vec();
        expected.extend_from_slice(&export.transmission_flags(ReplyStyle::Simple).to_be_bytes());
        expected.extend_from_slice(&[0; 124]);
        assert_eq!(out, expected);
        assert_eq!(consumed, input.len());
        assert_eq!(event, Event::Done(session(0, ReplyStyle::Simple, None)));

        let input = stream(FIXED_NO_ZEROES, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]);
        let (out, _, _) = run(&input);
        assert_eq!(out, expected[..10]);
    }

    #[test]
    fn export_name_failures_close() {
        let unknown = stream(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"nope")]);
        let (out, _, event) = run(&unknown);
        assert!(out.is_empty());
        assert!(matches!(event, Event::Close(_)));

        let long_name = vec![b'a'; NAME_BYTES_MAX + 1];
        let too_long = stream(FIXED, &[opt(NBD_OPT_EXPORT_NAME, &long_name)]);
        assert!(
            matches!(run(&too_long[..40]).2, Event::Close(_)),
            "closes before buffering"
        );

        let after_extended = stream(
            FIXED,
            &[
                opt(NBD_OPT_EXTENDED_HEADERS, &[]),
                opt(NBD_OPT_EXPORT_NAME, b"disk"),
            ],
        );
        let (out, _, event) = run(&after_extended);
        assert_eq!(out, ack(NBD_OPT_EXTENDED_HEADERS));
        assert_eq!(
            event,
            Event::Close("NBD_OPT_EXPORT_NAME after extended headers")
        );
    }

    #[test]
    fn abort_is_acknowledged_even_with_data_then_closes() {
        for payload in [&b""[..], b"junk"] {
            let input = stream(FIXED, &[opt(NBD_OPT_ABORT, payload)]);
            let (out, consumed, event) = run(&input);
            assert_eq!(out, ack(NBD_OPT_ABORT));
            assert_eq!(
                consumed,
                4 + OPTION_HEADER_BYTES,
                "the payload is not waited for"
            );
            assert_eq!(event, Event::Close("client sent NBD_OPT_ABORT"));
        }
    }

    #[test]
    fn list_sends_one_server_reply_per_export_then_ack() {
        let (out, _, event) = run(&stream(FIXED, &[opt(NBD_OPT_LIST, &[])]));
        assert_eq!(event, Event::NeedMore);
        let mut expected = rep(NBD_OPT_LIST, NBD_REP_SERVER, b"\0\0\0\x04diska test disk");
        expected.extend(rep(NBD_OPT_LIST, NBD_REP_SERVER, b"\0\0\0\x02ro"));
        expected.extend(rep(NBD_OPT_LIST, NBD_REP_SERVER, b"\0\0\0\0default"));
        expected.extend(ack(NBD_OPT_LIST));
        assert_eq!(out, expected);
    }

    /// nbd-server sends ERR_INVALID and the list anyway and leaves the payload unread.
    #[test]
    fn list_with_data_is_invalid_and_the_stream_stays_in_sync() {
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_LIST, b"garbage!"),
                opt(NBD_OPT_GO, &info_payload("ro", &[])),
            ],
        );
        let (out, consumed, event) = run(&input);
        let mut expected = rep(
            NBD_OPT_LIST,
            NBD_REP_ERR_INVALID,
            b"option does not take data",
        );
        let ro = &exports()[1];
        expected.extend(info_export(NBD_OPT_GO, ro, ReplyStyle::Simple));
        expected.extend(info_block_size(NBD_OPT_GO, 4096, 4096, 1 << 20));
        expected.extend(ack(NBD_OPT_GO));
        assert_eq!(out, expected);
        assert_eq!(consumed, input.len());
        assert_eq!(event, Event::Done(session(1, ReplyStyle::Simple, None)));
    }

    /// nbd-server answers NBD_OPT_INFO with size 0.
    #[test]
    fn info_reports_the_real_size_and_block_sizes() {
        let input = stream(FIXED, &[opt(NBD_OPT_INFO, &info_payload("disk", &[]))]);
        let (out, consumed, event) = run(&input);
        let disk = &exports()[0];
        let mut expected = info_export(NBD_OPT_INFO, disk, ReplyStyle::Simple);
        expected.extend(info_block_size(NBD_OPT_INFO, 512, 4096, 32 << 20));
        expected.extend(ack(NBD_OPT_INFO));
        assert_eq!(out, expected);
        assert_eq!(
            &out[22..30],
            &(1u64 << 30).to_be_bytes(),
            "size is the real size"
        );
        assert_eq!((consumed, event), (input.len(), Event::NeedMore));
    }

    #[test]
    fn info_sends_name_and_description_only_when_asked() {
        let infos = [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 0x7777, NBD_INFO_EXPORT];
        let input = stream(FIXED, &[opt(NBD_OPT_INFO, &info_payload("", &infos))]);
        let (out, _, _) = run(&input);
        let default = &exports()[2];
        let mut expected = info_export(NBD_OPT_INFO, default, ReplyStyle::Simple);
        expected.extend(info_block_size(NBD_OPT_INFO, 1, 4096, 32 << 20));
        expected.extend(rep(
            NBD_OPT_INFO,
            NBD_REP_INFO,
            &NBD_INFO_NAME.to_be_bytes(),
        ));
        expected.extend(rep(NBD_OPT_INFO, NBD_REP_INFO, b"\0\x02default"));
        expected.extend(ack(NBD_OPT_INFO));
        assert_eq!(out, expected);

        let input = stream(FIXED, &[opt(NBD_OPT_INFO, &info_payload("ro", &infos))]);
        let (out, _, _) = run(&input);
        let ro = &exports()[1];
        let mut expected = info_export(NBD_OPT_INFO, ro, ReplyStyle::Simple);
        expected.extend(info_block_size(NBD_OPT_INFO, 4096, 4096, 1 << 20));
        expected.extend(rep(NBD_OPT_INFO, NBD_REP_INFO, b"\0\x01ro"));
        expected.extend(ack(NBD_OPT_INFO));
        assert_eq!(out, expected, "empty description is not sent");
    }

    #[test]
    fn info_then_go_give_the_same_information() {
        let payload = info_payload("disk", &[NBD_INFO_BLOCK_SIZE]);
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_INFO, &payload),
                opt(NBD_OPT_GO, &payload),
            ],
        );
        let (out, consumed, event) = run(&input);
        let rest = &out[ack(NBD_OPT_STRUCTURED_REPLY).len()..];
        let (info, go) = rest.split_at(rest.len() / 2);
        let as_go = |bytes: &[u8]| {
            let mut bytes = bytes.to_vec();
            let mut at = 0;
            while at < bytes.len() {
                bytes[at + 8..at + 12].copy_from_slice(&NBD_OPT_GO.to_be_bytes());
                let length = u32::from_be_bytes(bytes[at + 16..at + 20].try_into().unwrap());
                at += 20 + length as usize;
            }
            bytes
        };
        assert_eq!(as_go(info), go);
        assert_eq!(consumed, input.len());
        assert_eq!(event, Event::Done(session(0, ReplyStyle::Structured, None)));
    }

    /// nbd-server reads past the option when INFO's name length exceeds the option length.
    #[test]
    fn inner_name_length_beyond_the_option_is_invalid_and_stays_in_sync() {
        for name_length in [5u32, 100, u32::MAX] {
            let mut bad = name_length.to_be_bytes().to_vec();
            bad.extend_from_slice(b"ro\0\0");
            let input = stream(
                FIXED,
                &[opt(NBD_OPT_INFO, &bad), opt(NBD_OPT_EXPORT_NAME, b"ro")],
            );
            let (out, consumed, event) = run(&input);
            let invalid = rep(
                NBD_OPT_INFO,
                NBD_REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/NBD_OPT_GO payload",
            );
            assert_eq!(out[..invalid.len()], invalid);
            assert_eq!(
                out.len(),
                invalid.len() + 134,
                "EXPORT_NAME parsed after it"
            );
            assert_eq!(
                (consumed, event),
                (
                    input.len(),
                    Event::Done(session(1, ReplyStyle::Simple, None))
                )
            );
        }
    }

    #[test]
    fn info_with_inconsistent_request_count_is_invalid() {
        let mut bad = info_payload("disk", &[NBD_INFO_NAME]);
        bad.push(0);
        let (out, _, _) = run(&stream(FIXED, &[opt(NBD_OPT_GO, &bad)]));
        assert_eq!(error_type(&out), NBD_REP_ERR_INVALID);
        let (out, _, _) = run(&stream(FIXED, &[opt(NBD_OPT_GO, &[0, 0, 0, 0, 0])]));
        assert_eq!(error_type(&out), NBD_REP_ERR_INVALID);
    }

    #[test]
    fn unknown_export_in_info_and_go_is_err_unknown_without_info() {
        for option in [NBD_OPT_INFO, NBD_OPT_GO] {
            let input = stream(FIXED, &[opt(option, &info_payload("nope", &[]))]);
            let (out, consumed, event) = run(&input);
            assert_eq!(out, rep(option, NBD_REP_ERR_UNKNOWN, b"unknown export"));
            assert_eq!((consumed, event), (input.len(), Event::NeedMore));
        }
    }

    #[test]
    fn go_ends_with_ack_and_no_padding_in_every_style() {
        let cases = [
            (vec![], ReplyStyle::Simple),
            (
                vec![opt(NBD_OPT_STRUCTURED_REPLY, &[])],
                ReplyStyle::Structured,
            ),
            (
                vec![opt(NBD_OPT_EXTENDED_HEADERS, &[])],
                ReplyStyle::Extended,
            ),
            (
                vec![
                    opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                    opt(NBD_OPT_EXTENDED_HEADERS, &[]),
                ],
                ReplyStyle::Extended,
            ),
        ];
        for (mut options, style) in cases {
            options.push(opt(NBD_OPT_GO, &info_payload("disk", &[])));
            let input = stream(FIXED, &options);
            let (out, consumed, event) = run(&input);
            assert!(
                out.ends_with(&ack(NBD_OPT_GO)),
                "no zero padding after GO's ACK"
            );
            assert_eq!(consumed, input.len());
            assert_eq!(event, Event::Done(session(0, style, None)));
        }
    }

    #[test]
    fn starttls_is_refused_by_policy() {
        let input = stream(
            FIXED,
            &[opt(NBD_OPT_STARTTLS, &[]), opt(NBD_OPT_STARTTLS, b"x")],
        );
        let (out, _, event) = run(&input);
        let mut expected = rep(
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_POLICY,
            b"TLS is not enabled on this server",
        );
        expected.extend(rep(
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_INVALID,
            b"option does not take data",
        ));
        assert_eq!(out, expected);
        assert_eq!(event, Event::NeedMore);
    }

    /// A gate with fixed per-export decisions and a claim budget.
    struct TestGate {
        tls_only: Vec<usize>,
        forbidden: Vec<usize>,
        claims_left: u32,
        claimed: Vec<usize>,
    }

    impl TestGate {
        fn new() -> TestGate {
            TestGate {
                tls_only: Vec::new(),
                forbidden: Vec::new(),
                claims_left: u32::MAX,
                claimed: Vec::new(),
            }
        }
    }

    impl Gate for TestGate {
        fn access(&self, export: &ExportInfo, tls: bool) -> Access {
            if self.forbidden.contains(&export.id) {
                Access::Forbidden("not for you")
            } else if self.tls_only.contains(&export.id) && !tls {
                Access::TlsRequired
            } else {
                Access::Allowed
            }
        }

        fn claim(&mut self, export: &ExportInfo) -> Result<(), &'static str> {
            if self.claims_left == 0 {
                return Err("export connection limit reached");
            }
            self.claims_left -= 1;
            self.claimed.push(export.id);
            Ok(())
        }
    }

    /// Runs `input` with a TLS policy and gate; returns (output, consumed, event).
    fn run_gated(tls: TlsPolicy, gate: &mut TestGate, input: &[u8]) -> (Vec<u8>, usize, Event) {
        let mut handshake = Handshake::new(HandshakeConfig { tls });
        let mut out = Vec::new();
        let (consumed, event) = handshake.advance_gated(input, &exports(), gate, &mut out);
        (out, consumed, event)
    }

    fn list_entry(name: &str, description: &str) -> Vec<u8> {
        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(description.as_bytes());
        rep(NBD_OPT_LIST, NBD_REP_SERVER, &payload)
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let mut gate = TestGate::new();
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_LIST, &[]),
                opt(NBD_OPT_INFO, &info_payload("disk", &[])),
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_PEEK_EXPORT, b"ignored payload"),
                opt(NBD_OPT_ABORT, &[]),
            ],
        );
        let (out, consumed, event) = run_gated(TlsPolicy::Require, &mut gate, &input);
        let mut expected = Vec::new();
        for option in [
            NBD_OPT_LIST,
            NBD_OPT_INFO,
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_PEEK_EXPORT,
        ] {
            expected.extend(rep(option, NBD_REP_ERR_TLS_REQD, b"TLS is required"));
        }
        expected.extend(rep(NBD_OPT_ABORT, NBD_REP_ACK, &[]));
        assert_eq!(out, expected);
        assert_eq!(consumed, input.len());
        assert_eq!(event, Event::Close("client sent NBD_OPT_ABORT"));
        assert!(gate.claimed.is_empty());

        let input = stream(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]);
        let (out, _, event) = run_gated(TlsPolicy::Require, &mut gate, &input);
        assert!(out.is_empty(), "no export data before TLS");
        assert_eq!(
            event,
            Event::Close("NBD_OPT_EXPORT_NAME before the required TLS")
        );
    }

    #[test]
    fn starttls_acks_then_hands_over_and_drops_negotiated_state() {
        let mut gate = TestGate::new();
        let mut handshake = Handshake::new(HandshakeConfig {
            tls: TlsPolicy::Require,
        });
        let exports = exports();
        let mut out = Vec::new();
        // Structured replies may not be negotiated before TLS in forced mode; in selective
        // mode they may, and STARTTLS must drop them (checked below with TlsPolicy::On).
        let mut input = stream(FIXED, &[opt(NBD_OPT_STARTTLS, &[])]);
        input.extend_from_slice(b"\x16\x03\x01 client hello bytes");
        let (consumed, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        assert_eq!(event, Event::StartTls);
        assert_eq!(consumed, CLIENT_FLAGS_BYTES + OPTION_HEADER_BYTES);
        assert_eq!(out, rep(NBD_OPT_STARTTLS, NBD_REP_ACK, &[]));

        // Now "decrypted" options follow: everything works, a second STARTTLS is invalid.
        out.clear();
        let input = [
            opt(NBD_OPT_STARTTLS, &[]),
            opt(NBD_OPT_GO, &info_payload("ro", &[])),
        ]
        .concat();
        let (consumed, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        assert_eq!(consumed, input.len());
        let Event::Done(session) = event else {
            panic!("expected Done, got {event:?}");
        };
        assert_eq!(session.export_id, 1);
        assert!(out.starts_with(&rep(
            NBD_OPT_STARTTLS,
            NBD_REP_ERR_INVALID,
            b"TLS already negotiated"
        )));
        assert_eq!(gate.claimed, vec![1]);

        // Selective mode: structured replies negotiated in plaintext are dropped by STARTTLS.
        let mut handshake = Handshake::new(HandshakeConfig { tls: TlsPolicy::On });
        let mut out = Vec::new();
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_STARTTLS, &[]),
            ],
        );
        let (_, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        assert_eq!(event, Event::StartTls);
        let input = opt(NBD_OPT_GO, &info_payload("disk", &[]));
        let (_, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        let Event::Done(session) = event else {
            panic!("expected Done, got {event:?}");
        };
        assert_eq!(session.reply_style, ReplyStyle::Simple);
    }

    #[test]
    fn starttls_with_data_is_invalid_even_when_tls_is_on() {
        let mut gate = TestGate::new();
        let input = stream(FIXED, &[opt(NBD_OPT_STARTTLS, b"x")]);
        let (out, _, event) = run_gated(TlsPolicy::On, &mut gate, &input);
        assert_eq!(
            out,
            rep(
                NBD_OPT_STARTTLS,
                NBD_REP_ERR_INVALID,
                b"option does not take data"
            )
        );
        assert_eq!(event, Event::NeedMore);
    }

    #[test]
    fn tls_only_exports_are_hidden_and_refused_in_plaintext() {
        let mut gate = TestGate::new();
        gate.tls_only = vec![0];
        let mut handshake = Handshake::new(HandshakeConfig { tls: TlsPolicy::On });
        let exports = exports();
        let mut out = Vec::new();
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_LIST, &[]),
                opt(NBD_OPT_INFO, &info_payload("disk", &[])),
                opt(NBD_OPT_GO, &info_payload("disk", &[])),
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])),
                opt(NBD_OPT_STARTTLS, &[]),
            ],
        );
        let (_, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        assert_eq!(event, Event::StartTls);
        let mut expected = [list_entry("ro", ""), list_entry("", "default")].concat();
        expected.extend(rep(NBD_OPT_LIST, NBD_REP_ACK, &[]));
        for option in [NBD_OPT_INFO, NBD_OPT_GO] {
            expected.extend(rep(option, NBD_REP_ERR_TLS_REQD, b"export requires TLS"));
        }
        expected.extend(rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        expected.extend(rep(
            NBD_OPT_LIST_META_CONTEXT,
            NBD_REP_ERR_TLS_REQD,
            b"export requires TLS",
        ));
        expected.extend(rep(NBD_OPT_STARTTLS, NBD_REP_ACK, &[]));
        assert_eq!(out, expected);
        assert!(gate.claimed.is_empty());

        // Over TLS the export is listed and usable.
        out.clear();
        let input = [
            opt(NBD_OPT_LIST, &[]),
            opt(NBD_OPT_GO, &info_payload("disk", &[])),
        ]
        .concat();
        let (_, event) = handshake.advance_gated(&input, &exports, &mut gate, &mut out);
        assert!(out.starts_with(&list_entry("disk", "a test disk")));
        assert!(matches!(event, Event::Done(Session { export_id: 0, .. })));
        assert_eq!(gate.claimed, vec![0]);
    }

    #[test]
    fn forbidden_exports_get_policy_errors_and_a_full_claim_refuses_go_only() {
        let mut gate = TestGate::new();
        gate.forbidden = vec![1];
        gate.claims_left = 0;
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_LIST, &[]),
                opt(NBD_OPT_GO, &info_payload("ro", &[])),
                opt(NBD_OPT_INFO, &info_payload("disk", &[])),
                opt(NBD_OPT_GO, &info_payload("disk", &[])),
            ],
        );
        let (out, consumed, event) = run_gated(TlsPolicy::Off, &mut gate, &input);
        assert_eq!(consumed, input.len());
        assert_eq!(event, Event::NeedMore);
        let mut expected = [list_entry("disk", "a test disk"), list_entry("", "default")].concat();
        expected.extend(rep(NBD_OPT_LIST, NBD_REP_ACK, &[]));
        expected.extend(rep(NBD_OPT_GO, NBD_REP_ERR_POLICY, b"not for you"));
        assert!(out.starts_with(&expected), "LIST and forbidden GO");
        let rest = &out[expected.len()..];
        // INFO does not claim a slot: it succeeds and ends with an ACK.
        let info_ack = rep(NBD_OPT_INFO, NBD_REP_ACK, &[]);
        let at = rest
            .windows(info_ack.len())
            .position(|window| window == info_ack.as_slice())
            .expect("INFO succeeded");
        assert_eq!(
            &rest[at + info_ack.len()..],
            rep(
                NBD_OPT_GO,
                NBD_REP_ERR_POLICY,
                b"export connection limit reached"
            )
        );

        let input = stream(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]);
        let (out, _, event) = run_gated(TlsPolicy::Off, &mut gate, &input);
        assert!(out.is_empty());
        assert_eq!(event, Event::Close("export connection limit reached"));
    }

    #[test]
    fn structured_reply_negotiation() {
        let sr = || opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        let (out, _, _) = run(&stream(
            FIXED,
            &[opt(NBD_OPT_STRUCTURED_REPLY, b"x"), sr(), sr()],
        ));
        let mut expected = rep(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_INVALID,
            b"option does not take data",
        );
        expected.extend(ack(NBD_OPT_STRUCTURED_REPLY));
        expected.extend(rep(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_INVALID,
            b"structured replies already negotiated",
        ));
        assert_eq!(out, expected);

        let input = stream(FIXED, &[opt(NBD_OPT_EXTENDED_HEADERS, &[]), sr()]);
        let (out, _, _) = run(&input);
        let mut expected = ack(NBD_OPT_EXTENDED_HEADERS);
        expected.extend(rep(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_EXT_HEADER_REQD,
            b"extended headers already negotiated",
        ));
        assert_eq!(out, expected);
    }

    #[test]
    fn extended_headers_negotiation() {
        let eh = || opt(NBD_OPT_EXTENDED_HEADERS, &[]);
        let input = stream(FIXED, &[opt(NBD_OPT_EXTENDED_HEADERS, b"data"), eh(), eh()]);
        let (out, _, _) = run(&input);
        let mut expected = rep(
            NBD_OPT_EXTENDED_HEADERS,
            NBD_REP_ERR_INVALID,
            b"option does not take data",
        );
        expected.extend(ack(NBD_OPT_EXTENDED_HEADERS));
        expected.extend(rep(
            NBD_OPT_EXTENDED_HEADERS,
            NBD_REP_ERR_INVALID,
            b"extended headers already negotiated",
        ));
        assert_eq!(out, expected);
    }

    fn meta_reply(option: u32, id: u32) -> Vec<u8> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(b"base:allocation");
        rep(option, NBD_REP_META_CONTEXT, &payload)
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        for option in [NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT] {
            let input = stream(FIXED, &[opt(option, &meta_payload("disk", &[]))]);
            let (out, consumed, _) = run(&input);
            assert_eq!(error_type(&out), NBD_REP_ERR_INVALID);
            assert_eq!(consumed, input.len());
        }
    }

    #[test]
    fn list_meta_context_lists_base_allocation() {
        let cases: [(&str, &[&str], bool); 7] = [
            ("disk", &[], true),
            ("disk", &["base:"], true),
            ("disk", &["base:allocation", "base:"], true),
            (
                "disk",
                &["qemu:dirty-bitmap:x", "base:nope", "nocolon"],
                false,
            ),
            ("disk", &["x-foo:"], false),
            ("ro", &[], false),
            ("ro", &["base:allocation"], false),
        ];
        for (name, queries, listed) in cases {
            let option = NBD_OPT_LIST_META_CONTEXT;
            let input = stream(
                FIXED,
                &[
                    opt(NBD_OPT_EXTENDED_HEADERS, &[]),
                    opt(option, &meta_payload(name, queries)),
                ],
            );
            let (out, consumed, event) = run(&input);
            let mut expected = ack(NBD_OPT_EXTENDED_HEADERS);
            if listed {
                expected.extend(meta_reply(option, 0));
            }
            expected.extend(ack(option));
            assert_eq!(out, expected, "{name} {queries:?}");
            assert_eq!((consumed, event), (input.len(), Event::NeedMore));
        }
    }

    #[test]
    fn meta_context_payload_errors() {
        let sr = opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        let mut truncated = meta_payload("disk", &["base:allocation"]);
        truncated.pop();
        let mut trailing = meta_payload("disk", &["base:allocation"]);
        trailing.push(0);
        let mut huge_query = meta_payload("disk", &[]);
        huge_query[8..12].copy_from_slice(&1u32.to_be_bytes());
        huge_query.extend_from_slice(&u32::MAX.to_be_bytes());
        let many: Vec<&str> = vec!["base:"; META_CONTEXT_QUERIES_MAX + 1];
        let cases = [
            (truncated, NBD_REP_ERR_INVALID),
            (trailing, NBD_REP_ERR_INVALID),
            (huge_query, NBD_REP_ERR_INVALID),
            (meta_payload("disk", &many), NBD_REP_ERR_TOO_BIG),
            (meta_payload("nope", &[]), NBD_REP_ERR_UNKNOWN),
            (vec![0, 0], NBD_REP_ERR_INVALID),
        ];
        for (payload, reply) in cases {
            for option in [NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT] {
                let input = stream(
                    FIXED,
                    &[sr.clone(), opt(option, &payload), opt(NBD_OPT_ABORT, &[])],
                );
                let (out, consumed, event) = run(&input);
                let out = &out[ack(NBD_OPT_STRUCTURED_REPLY).len()..];
                assert_eq!(error_type(out), reply);
                assert!(out.ends_with(&ack(NBD_OPT_ABORT)), "still in sync");
                assert_eq!(consumed, input.len());
                assert!(matches!(event, Event::Close(_)));
            }
        }
    }

    fn negotiate(options: &[Vec<u8>]) -> (Vec<u8>, Event) {
        let (out, consumed, event) = run(&stream(FIXED, options));
        assert_eq!(consumed, stream(FIXED, options).len());
        (out, event)
    }

    #[test]
    fn set_meta_context_selects_base_allocation_for_go() {
        let set = NBD_OPT_SET_META_CONTEXT;
        let (out, event) = negotiate(&[
            opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            opt(
                set,
                &meta_payload("disk", &["base:allocation", "base:allocation"]),
            ),
            opt(NBD_OPT_GO, &info_payload("disk", &[])),
        ]);
        let mut expected = ack(NBD_OPT_STRUCTURED_REPLY);
        expected.extend(meta_reply(set, BASE_ALLOCATION_CONTEXT_ID));
        expected.extend(ack(set));
        assert_eq!(out[..expected.len()], expected);
        let id = Some(BASE_ALLOCATION_CONTEXT_ID);
        assert_eq!(event, Event::Done(session(0, ReplyStyle::Structured, id)));

        let (_, event) = negotiate(&[
            opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            opt(set, &meta_payload("disk", &["base:allocation"])),
            opt(NBD_OPT_EXTENDED_HEADERS, &[]),
            opt(NBD_OPT_GO, &info_payload("disk", &[])),
        ]);
        assert_eq!(event, Event::Done(session(0, ReplyStyle::Extended, id)));
    }

    #[test]
    fn set_meta_context_selection_rules() {
        let set = NBD_OPT_SET_META_CONTEXT;
        let sr = || opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        let good = || opt(set, &meta_payload("disk", &["base:allocation"]));
        let go = |name: &str| opt(NBD_OPT_GO, &info_payload(name, &[]));
        let none = |export_id| Event::Done(session(export_id, ReplyStyle::Structured, None));
        // "base:" is ignored in SET; no query selects nothing.
        let (out, event) = negotiate(&[
            sr(),
            opt(set, &meta_payload("disk", &["base:"])),
            go("disk"),
        ]);
        assert_eq!(out[ack(NBD_OPT_STRUCTURED_REPLY).len()..][..20], ack(set));
        assert_eq!(event, none(0));
        assert_eq!(
            negotiate(&[sr(), opt(set, &meta_payload("disk", &[])), go("disk")]).1,
            none(0)
        );
        // A later SET replaces the selection, even when it fails.
        let failing = opt(set, &meta_payload("nope", &["base:allocation"]));
        assert_eq!(negotiate(&[sr(), good(), failing, go("disk")]).1, none(0));
        let empty = opt(set, &meta_payload("disk", &["base:nothing"]));
        assert_eq!(negotiate(&[sr(), good(), empty, go("disk")]).1, none(0));
        // The selection only applies to the export it named.
        assert_eq!(negotiate(&[sr(), good(), go("")]).1, none(2));
        // An export without block status offers nothing.
        let ro = opt(set, &meta_payload("ro", &["base:allocation"]));
        let (out, event) = negotiate(&[sr(), ro, go("ro")]);
        assert!(!out.windows(15).any(|window| window == b"base:allocation"));
        assert_eq!(event, none(1));
    }

    #[test]
    fn unknown_options_are_unsupported_and_parsing_continues() {
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_PEEK_EXPORT, b"x"),
                opt(0xdead_beef, &[7; 100]),
                opt(NBD_OPT_LIST, &[]),
            ],
        );
        let (out, consumed, event) = run(&input);
        let mut expected = rep(
            NBD_OPT_PEEK_EXPORT,
            NBD_REP_ERR_UNSUP,
            b"option not supported",
        );
        expected.extend(rep(0xdead_beef, NBD_REP_ERR_UNSUP, b"option not supported"));
        assert_eq!(out[..expected.len()], expected);
        assert!(out.ends_with(&ack(NBD_OPT_LIST)));
        assert_eq!((consumed, event), (input.len(), Event::NeedMore));
    }

    #[test]
    fn huge_payloads_are_skipped_without_buffering() {
        let huge = OPTION_BYTES_MAX + 1;
        for (option, reply) in [
            (0x1234, NBD_REP_ERR_UNSUP),
            (NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG),
            (NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_TOO_BIG),
            (NBD_OPT_LIST, NBD_REP_ERR_INVALID),
        ] {
            let mut handshake = Handshake::new(HandshakeConfig::default());
            let mut out = Vec::new();
            let mut header = stream(FIXED, &[]);
            header.extend_from_slice(&IHAVEOPT.to_be_bytes());
            header.extend_from_slice(&option.to_be_bytes());
            header.extend_from_slice(&(huge as u32).to_be_bytes());
            let (consumed, event) = handshake.advance(&header, &exports(), &mut out);
            assert_eq!((consumed, event), (header.len(), Event::NeedMore));
            let chunk = [0xa5u8; 4096];
            let mut left = huge;
            while left > 0 {
                let take = left.min(chunk.len());
                let (consumed, event) = handshake.advance(&chunk[..take], &exports(), &mut out);
                assert_eq!(consumed, take, "consumed as it arrives");
                assert_eq!(event, Event::NeedMore);
                left -= take;
                assert_eq!(
                    out.is_empty(),
                    left > 0,
                    "reply only after the whole payload"
                );
            }
            assert_eq!(error_type(&out), reply);
            let go = opt(NBD_OPT_GO, &info_payload("disk", &[]));
            let (consumed, event) = handshake.advance(&go, &exports(), &mut out);
            assert_eq!(consumed, go.len());
            assert!(matches!(event, Event::Done(_)), "in sync after the skip");
        }
    }

    #[test]
    fn an_option_of_exactly_option_bytes_max_is_parsed_within_the_input_bound() {
        // 16 queries: 12 + 16 * 4 + 15 * 4096 + 4004 == OPTION_BYTES_MAX.
        let long = format!("x-pad:{}", "a".repeat(NAME_BYTES_MAX - 6));
        let last = format!("x-pad:{}", "a".repeat(4004 - 6));
        let mut queries: Vec<&str> = vec![&long; 15];
        queries.push(&last);
        let payload = meta_payload("disk", &queries);
        assert_eq!(payload.len(), OPTION_BYTES_MAX);
        let option = opt(NBD_OPT_LIST_META_CONTEXT, &payload);
        assert_eq!(option.len(), HANDSHAKE_INPUT_BYTES_MAX);
        let mut handshake = Handshake::new(HandshakeConfig::default());
        let mut out = Vec::new();
        let start = stream(FIXED, &[opt(NBD_OPT_STRUCTURED_REPLY, &[])]);
        let (consumed, _) = handshake.advance(&start, &exports(), &mut out);
        assert_eq!(consumed, start.len());
        out.clear();
        let (consumed, event) = handshake.advance(&option, &exports(), &mut out);
        assert_eq!((consumed, event), (option.len(), Event::NeedMore));
        assert_eq!(out, ack(NBD_OPT_LIST_META_CONTEXT));
    }

    #[test]
    fn parsed_options_wait_for_their_whole_payload() {
        let go = stream(FIXED, &[opt(NBD_OPT_GO, &info_payload("disk", &[]))]);
        for cut in 4..go.len() {
            let (out, consumed, event) = run(&go[..cut]);
            assert_eq!(
                (out.len(), consumed, event),
                (0, 4, Event::NeedMore),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn too_many_options_close() {
        let options: Vec<Vec<u8>> = (0..OPTIONS_COUNT_MAX).map(|_| opt(0x99, &[])).collect();
        let (out, _, event) = run(&stream(FIXED, &options));
        assert_eq!(event, Event::NeedMore);
        assert_eq!(out.len(), OPTIONS_COUNT_MAX as usize * (20 + 20));
        let mut options = options;
        options.push(opt(NBD_OPT_GO, &info_payload("disk", &[])));
        let (_, _, event) = run(&stream(FIXED, &options));
        assert_eq!(event, Event::Close("too many options"));
    }

    #[test]
    fn bad_option_magic_closes() {
        let mut input = stream(FIXED, &[opt(NBD_OPT_LIST, &[])]);
        input[4] ^= 1;
        assert_eq!(
            run(&input),
            (Vec::new(), 4, Event::Close("bad option magic"))
        );
    }

    #[test]
    fn shutdown_errors_options_but_acknowledges_abort() {
        let mut handshake = Handshake::new(HandshakeConfig::default());
        handshake.begin_shutdown();
        let input = stream(
            FIXED,
            &[
                opt(NBD_OPT_GO, &info_payload("disk", &[])),
                opt(NBD_OPT_ABORT, &[]),
            ],
        );
        let mut out = Vec::new();
        let (consumed, event) = handshake.advance(&input, &exports(), &mut out);
        let mut expected = rep(NBD_OPT_GO, NBD_REP_ERR_SHUTDOWN, b"server shutting down");
        expected.extend(ack(NBD_OPT_ABORT));
        assert_eq!(out, expected);
        assert_eq!(
            (consumed, event),
            (input.len(), Event::Close("client sent NBD_OPT_ABORT"))
        );
    }

    #[test]
    #[should_panic(expected = "after Done or Close")]
    fn advance_after_a_final_event_panics() {
        let mut handshake = Handshake::new(HandshakeConfig::default());
        let mut out = Vec::new();
        let _ = handshake.advance(&0u32.to_be_bytes(), &exports(), &mut out);
        let _ = handshake.advance(&[], &exports(), &mut out);
    }

    #[test]
    fn transmission_flags_follow_caps_and_style() {
        let [disk, ro, default]: [ExportInfo; 3] = exports().try_into().unwrap();
        let all_disk = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN
            | NBD_FLAG_SEND_CACHE
            | NBD_FLAG_SEND_FAST_ZERO;
        assert_eq!(disk.transmission_flags(ReplyStyle::Simple), all_disk);
        assert_eq!(
            disk.transmission_flags(ReplyStyle::Structured),
            all_disk | NBD_FLAG_SEND_DF
        );
        assert_eq!(
            disk.transmission_flags(ReplyStyle::Extended),
            all_disk | NBD_FLAG_SEND_DF
        );
        let ro_flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH;
        assert_eq!(ro.transmission_flags(ReplyStyle::Simple), ro_flags);
        let mut ro_all = disk.clone();
        ro_all.read_only = true;
        let flags = ro_all.transmission_flags(ReplyStyle::Simple);
        assert_eq!(flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(flags & NBD_FLAG_SEND_FAST_ZERO, 0);
        let mut fast_only = default.clone();
        fast_only.caps.fast_zero = true;
        assert_eq!(
            fast_only.transmission_flags(ReplyStyle::Structured) & NBD_FLAG_SEND_FAST_ZERO,
            0
        );
        for export in [&disk, &ro, &default] {
            assert_eq!(export.check(), Ok(()));
            let flags = export.transmission_flags(ReplyStyle::Extended);
            assert_eq!(
                flags & (1 << 9 | 1 << 12),
                0,
                "never RESIZE nor BLOCK_STATUS_PAYLOAD"
            );
        }
    }

    #[test]
    fn export_check_rejects_bad_configurations() {
        let disk = exports()[0].clone();
        let mut bad = disk.clone();
        bad.block_size.minimum = 3;
        assert!(bad.check().is_err());
        let mut bad = disk.clone();
        bad.block_size.preferred = 256;
        assert!(bad.check().is_err());
        let mut bad = disk.clone();
        bad.block_size.maximum = 64 << 20;
        assert!(bad.check().is_err());
        let mut bad = disk.clone();
        bad.size += 1;
        assert!(bad.check().is_err());
        let mut bad = disk;
        bad.name = "a".repeat(NAME_BYTES_MAX + 1);
        assert!(bad.check().is_err());
    }

    /// A valid option stream touching every option, for the chunking property.
    fn valid_stream() -> Vec<u8> {
        stream(
            FIXED_NO_ZEROES,
            &[
                opt(NBD_OPT_LIST, &[]),
                opt(NBD_OPT_LIST, b"junk"),
                opt(NBD_OPT_STARTTLS, &[]),
                opt(0x4242, &[1; 300]),
                opt(NBD_OPT_INFO, &info_payload("ro", &[NBD_INFO_NAME])),
                opt(NBD_OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])),
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_LIST_META_CONTEXT, &meta_payload("disk", &["base:"])),
                opt(
                    NBD_OPT_SET_META_CONTEXT,
                    &meta_payload("disk", &["base:allocation"]),
                ),
                opt(NBD_OPT_EXTENDED_HEADERS, &[]),
                opt(NBD_OPT_INFO, &info_payload("nope", &[])),
                opt(NBD_OPT_GO, &info_payload("disk", &[NBD_INFO_DESCRIPTION])),
                b"trailing transmission bytes".to_vec(),
            ],
        )
    }

    #[test]
    fn the_valid_stream_ends_in_a_done_session() {
        let input = valid_stream();
        let (out, event, consumed) = harness::run_chunked(&input, 1);
        let id = Some(BASE_ALLOCATION_CONTEXT_ID);
        assert_eq!(event, Event::Done(session(0, ReplyStyle::Extended, id)));
        assert_eq!(consumed, input.len() - b"trailing transmission bytes".len());
        assert!(out.ends_with(&ack(NBD_OPT_GO)));
        harness::check_one_input(&input);
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_outcome(seed in any::<u64>()) {
            let input = valid_stream();
            let mut data = seed.to_le_bytes().to_vec();
            data.extend_from_slice(&input);
            harness::check_one_input(&data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            harness::check_one_input(&data);
        }

        #[test]
        fn arbitrary_options_never_panic(
            seed in any::<u64>(),
            options in prop::collection::vec(
                (0u32..14, prop::collection::vec(any::<u8>(), 0..64)),
                0..12,
            ),
        ) {
            let options: Vec<Vec<u8>> =
                options.iter().map(|(option, payload)| opt(*option, payload)).collect();
            let mut data = seed.to_le_bytes().to_vec();
            data.extend(stream(FIXED, &options));
            harness::check_one_input(&data);
        }
    }
}
