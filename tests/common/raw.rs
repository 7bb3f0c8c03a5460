//! A tiny byte-level NBD client, written from `doc/proto.md` and independent of the server's
//! codec on purpose: a shared misunderstanding of the wire format must not make both sides
//! agree. It can misbehave on demand (raw bytes, half messages, resets).
//!
//! # Contract
//!
//! * Every socket has read and write timeouts ([`IO_TIMEOUT`]): a server that hangs makes the
//!   test fail with `WouldBlock`/`TimedOut` instead of hanging the suite.
//! * Replies are bounded: an option reply or chunk longer than [`REPLY_BYTES_MAX`] is a test
//!   failure, never an allocation of whatever the server claims.
#![allow(unsafe_code)] // direct libc calls (signals, descriptors), each commented
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Read/write timeout on raw sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest option reply or reply chunk this client accepts (READ data is 32 MiB max + header).
pub const REPLY_BYTES_MAX: u64 = 64 << 20;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptionReply {
    /// Option the reply answers.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Reply payload.
    pub data: Vec<u8>,
}

/// What GO or INFO reported.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// (minimum, preferred, maximum) if NBD_INFO_BLOCK_SIZE was sent.
    pub block_size: Option<(u32, u32, u32)>,
    /// Number of NBD_INFO_EXPORT replies seen.
    pub export_infos: usize,
}

/// One reply message (simple reply or one structured chunk).
#[derive(Debug, Clone)]
pub struct Reply {
    /// Cookie (handle) echoed by the server.
    pub cookie: u64,
    /// Simple reply: the error; structured: `None`.
    pub simple_error: Option<u32>,
    /// Structured chunk flags.
    pub flags: u16,
    /// Structured chunk type.
    pub chunk_type: u16,
    /// Extended header offset field (zero otherwise).
    pub offset: u64,
    /// Payload (simple READ data or the chunk payload).
    pub payload: Vec<u8>,
}

impl Reply {
    /// True for the last message of a request.
    pub fn is_final(&self) -> bool {
        self.simple_error.is_some() || self.flags & REPLY_FLAG_DONE != 0
    }
}

/// The outcome of one command, assembled from its replies.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The first error reported (NBD errno), if any.
    pub error: Option<u32>,
    /// READ data (holes filled with zeroes).
    pub data: Vec<u8>,
    /// Block status descriptors: (context id, length, flags).
    pub extents: Vec<(u32, u64, u64)>,
    /// Number of OFFSET_DATA/OFFSET_HOLE chunks.
    pub content_chunks: usize,
}

/// A unix or TCP socket.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain socket.
    Unix(UnixStream),
    /// TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }

    /// A second handle on the same socket (for a writer thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// `write_all`, giving up silently on the first error (the peer may hang up on purpose).
    pub fn write_all_ignoring_errors(&mut self, bytes: &[u8]) {
        let _ = self.write_all(bytes);
    }

    /// Shuts down the write side (the server sees EOF, replies can still arrive).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Address<'a> {
    /// Unix socket path.
    Unix(&'a Path),
    /// TCP address.
    Tcp(SocketAddr),
}

impl<'a> From<&'a Path> for Address<'a> {
    fn from(path: &'a Path) -> Self {
        Address::Unix(path)
    }
}

impl<'a> From<&'a std::path::PathBuf> for Address<'a> {
    fn from(path: &'a std::path::PathBuf) -> Self {
        Address::Unix(path)
    }
}

impl From<SocketAddr> for Address<'_> {
    fn from(address: SocketAddr) -> Self {
        Address::Tcp(address)
    }
}

/// A raw NBD client.
#[derive(Debug)]
pub struct RawClient {
    /// The socket (public so tests can misbehave).
    pub stream: Stream,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    /// Server handshake flags.
    pub handshake_flags: u16,
    next_cookie: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Builds the payload of INFO/GO: name and requested info types.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        p.extend_from_slice(&info.to_be_bytes());
    }
    p
}

/// Builds the payload of LIST_META_CONTEXT/SET_META_CONTEXT.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

impl RawClient {
    /// A second handle on the socket, for writing from another thread.
    pub fn stream_clone(&self) -> Stream {
        self.stream.try_clone().expect("clone socket")
    }

    /// Connects without reading anything.
    pub fn connect<'a>(address: impl Into<Address<'a>>) -> io::Result<RawClient> {
        let stream = match address.into() {
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Address::Tcp(address) => Stream::Tcp(TcpStream::connect(address)?),
        };
        stream.set_timeouts(IO_TIMEOUT)?;
        Ok(RawClient {
            stream,
            structured: false,
            extended: false,
            handshake_flags: 0,
            next_cookie: 1,
        })
    }

    /// Connects, reads the newstyle greeting, sends client flags (fixed newstyle + no zeroes).
    pub fn handshake<'a>(address: impl Into<Address<'a>>) -> io::Result<RawClient> {
        let mut client = Self::connect(address)?;
        let hflags = client.read_greeting()?;
        assert!(
            hflags & FLAG_FIXED_NEWSTYLE != 0,
            "server must offer fixed newstyle"
        );
        assert_eq!(
            hflags & !3,
            0,
            "server set unknown handshake flags {hflags:#x}"
        );
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        client.write_all(&cflags.to_be_bytes())?;
        Ok(client)
    }

    /// Handshake, structured replies, `base:allocation`, GO on `export`.
    pub fn ready<'a>(
        address: impl Into<Address<'a>>,
        export: &str,
    ) -> io::Result<(RawClient, ExportInfo)> {
        let mut client = Self::handshake(address)?;
        let rep = client.option(OPT_STRUCTURED_REPLY, &[])?;
        assert_eq!(rep.reply_type, REP_ACK, "STRUCTURED_REPLY refused: {rep:?}");
        client.structured = true;
        client.set_meta_context(export, &["base:allocation"])?;
        let info = client
            .go(export, &[INFO_BLOCK_SIZE])?
            .unwrap_or_else(|rep| panic!("GO {export:?} failed: {rep:?}"));
        Ok((client, info))
    }

    /// Handshake and GO without structured replies (simple replies only).
    pub fn ready_simple<'a>(
        address: impl Into<Address<'a>>,
        export: &str,
    ) -> io::Result<(RawClient, ExportInfo)> {
        let mut client = Self::handshake(address)?;
        let info = client
            .go(export, &[INFO_BLOCK_SIZE])?
            .unwrap_or_else(|rep| panic!("GO {export:?} failed: {rep:?}"));
        Ok((client, info))
    }

    /// Reads the 18-byte greeting and returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let mut buf = [0u8; 18];
        self.read_exact(&mut buf)?;
        assert_eq!(be64(&buf[0..]), NBDMAGIC, "bad NBDMAGIC in greeting");
        assert_eq!(
            be64(&buf[8..]),
            IHAVEOPT,
            "bad IHAVEOPT in greeting (oldstyle?)"
        );
        self.handshake_flags = be16(&buf[16..]);
        Ok(self.handshake_flags)
    }

    /// `write_all` on the socket.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// `read_exact` on the socket.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.stream.read_exact(buf)
    }

    /// Sends an option header with an arbitrary (possibly lying) length, and no data.
    pub fn send_option_header(&mut self, option: u32, len: u32) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16);
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        self.write_all(&msg)
    }

    /// Sends an option with its data.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).expect("option data fits u32");
        self.send_option_header(option, len)?;
        self.write_all(data)
    }

    /// Reads one option reply (bounded).
    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let mut header = [0u8; 20];
        self.read_exact(&mut header)?;
        assert_eq!(
            be64(&header),
            OPTION_REPLY_MAGIC,
            "bad option reply magic: {header:02x?}"
        );
        let len = u64::from(be32(&header[16..]));
        assert!(len <= REPLY_BYTES_MAX, "absurd option reply length {len}");
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok(OptionReply {
            option: be32(&header[8..]),
            reply_type: be32(&header[12..]),
            data,
        })
    }

    /// Sends an option and reads one reply, asserting it answers that option.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<OptionReply> {
        self.send_option(option, data)?;
        let reply = self.read_option_reply()?;
        assert_eq!(
            reply.option, option,
            "reply for the wrong option: {reply:?}"
        );
        Ok(reply)
    }

    /// Reads replies to `option` until ACK or an error; returns all of them (last one final).
    pub fn replies_until_final(&mut self, option: u32) -> io::Result<Vec<OptionReply>> {
        let mut replies = Vec::new();
        for _ in 0..10_000 {
            let reply = self.read_option_reply()?;
            assert_eq!(
                reply.option, option,
                "reply for the wrong option: {reply:?}"
            );
            let last = reply.reply_type == REP_ACK || reply.reply_type & 0x8000_0000 != 0;
            replies.push(reply);
            if last {
                return Ok(replies);
            }
        }
        panic!("more than 10000 replies to option {option}");
    }

    /// NBD_OPT_LIST: export names.
    pub fn list(&mut self) -> io::Result<Vec<String>> {
        self.send_option(OPT_LIST, &[])?;
        let replies = self.replies_until_final(OPT_LIST)?;
        let (last, servers) = replies.split_last().expect("at least one reply");
        assert_eq!(last.reply_type, REP_ACK, "LIST failed: {last:?}");
        Ok(servers
            .iter()
            .map(|rep| {
                assert_eq!(rep.reply_type, REP_SERVER, "unexpected LIST reply {rep:?}");
                let len = be32(&rep.data) as usize;
                assert!(
                    4 + len <= rep.data.len(),
                    "SERVER reply name overruns: {rep:?}"
                );
                String::from_utf8(rep.data[4..4 + len].to_vec()).expect("UTF-8 name")
            })
            .collect())
    }

    /// NBD_OPT_SET_META_CONTEXT; returns (id, name) pairs.
    pub fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Vec<(u32, String)>> {
        self.send_option(OPT_SET_META_CONTEXT, &meta_payload(export, queries))?;
        let replies = self.replies_until_final(OPT_SET_META_CONTEXT)?;
        let (last, contexts) = replies.split_last().expect("at least one reply");
        assert_eq!(
            last.reply_type, REP_ACK,
            "SET_META_CONTEXT failed: {last:?}"
        );
        Ok(contexts
            .iter()
            .map(|rep| {
                assert_eq!(rep.reply_type, REP_META_CONTEXT, "unexpected reply {rep:?}");
                let name = String::from_utf8(rep.data[4..].to_vec()).expect("UTF-8 context");
                (be32(&rep.data), name)
            })
            .collect())
    }

    /// NBD_OPT_INFO or NBD_OPT_GO. `Ok(Err(reply))` is the server's error reply.
    pub fn info_or_go(
        &mut self,
        option: u32,
        export: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptionReply>> {
        self.send_option(option, &info_payload(export, infos))?;
        let mut info = ExportInfo::default();
        for reply in self.replies_until_final(option)? {
            match reply.reply_type {
                REP_ACK => {
                    assert!(info.export_infos > 0, "ACK without NBD_INFO_EXPORT");
                    return Ok(Ok(info));
                }
                REP_INFO => parse_info(&reply.data, &mut info),
                t if t & 0x8000_0000 != 0 => return Ok(Err(reply)),
                _ => panic!("unexpected reply to INFO/GO: {reply:?}"),
            }
        }
        unreachable!("replies_until_final ends with a final reply")
    }

    /// NBD_OPT_GO; enters transmission on success.
    pub fn go(
        &mut self,
        export: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptionReply>> {
        self.info_or_go(OPT_GO, export, infos)
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Encodes a request header (compact or extended).
    pub fn request_bytes(
        &self,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> Vec<u8> {
        let mut msg = Vec::with_capacity(32);
        if self.extended {
            msg.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&ty.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            msg.extend_from_slice(&len.to_be_bytes());
        } else {
            let len = u32::try_from(len).expect("compact requests carry a u32 length");
            msg.extend_from_slice(&len.to_be_bytes());
        }
        msg
    }

    /// Sends a request header plus payload; returns the cookie.
    pub fn send_request(
        &mut self,
        flags: u16,
        ty: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie();
        let mut msg = self.request_bytes(flags, ty, cookie, offset, len);
        msg.extend_from_slice(payload);
        self.write_all(&msg)?;
        Ok(cookie)
    }

    /// Reads one reply. `simple_len` gives the data length of a successful simple reply.
    pub fn read_reply(&mut self, simple_len: impl FnOnce(u64) -> u64) -> io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic)?;
        let magic = be32(&magic);
        if self.extended {
            assert_eq!(
                magic, EXTENDED_REPLY_MAGIC,
                "compact reply under extended headers"
            );
        } else {
            assert_ne!(
                magic, EXTENDED_REPLY_MAGIC,
                "extended reply without negotiation"
            );
        }
        if !self.structured && !self.extended {
            assert_eq!(
                magic, SIMPLE_REPLY_MAGIC,
                "structured reply without negotiation"
            );
        }
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.read_exact(&mut rest)?;
                let (error, cookie) = (be32(&rest), be64(&rest[4..]));
                let len = if error == 0 { simple_len(cookie) } else { 0 };
                assert!(len <= REPLY_BYTES_MAX);
                let mut payload = vec![0u8; len as usize];
                self.read_exact(&mut payload)?;
                Ok(Reply {
                    cookie,
                    simple_error: Some(error),
                    flags: 0,
                    chunk_type: 0,
                    offset: 0,
                    payload,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.read_exact(&mut rest)?;
                self.read_chunk(
                    be16(&rest),
                    be16(&rest[2..]),
                    be64(&rest[4..]),
                    0,
                    be32(&rest[12..]).into(),
                )
            }
            EXTENDED_REPLY_MAGIC => {
                let mut rest = [0u8; 28];
                self.read_exact(&mut rest)?;
                let (flags, ty, cookie) = (be16(&rest), be16(&rest[2..]), be64(&rest[4..]));
                self.read_chunk(flags, ty, cookie, be64(&rest[12..]), be64(&rest[20..]))
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
    }

    fn read_chunk(
        &mut self,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<Reply> {
        assert!(len <= REPLY_BYTES_MAX, "absurd chunk length {len}");
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload)?;
        Ok(Reply {
            cookie,
            simple_error: None,
            flags,
            chunk_type,
            offset,
            payload,
        })
    }

    /// Reads replies until `cookie` is complete; other cookies are an error.
    /// `offset`/`len` describe the request (for READ reassembly).
    pub fn wait(
        &mut self,
        cookie: u64,
        is_read: bool,
        offset: u64,
        len: u64,
    ) -> io::Result<Outcome> {
        let mut pending = HashMap::new();
        pending.insert(cookie, (is_read, offset, len, Outcome::default()));
        loop {
            if let Some((c, outcome)) = self.pump(&mut pending)? {
                assert_eq!(c, cookie, "reply for an unknown cookie");
                return Ok(outcome);
            }
        }
    }

    /// Reads one reply and folds it into `pending` (cookie -> (is_read, offset, len, outcome)).
    /// Returns a finished command.
    pub fn pump(
        &mut self,
        pending: &mut HashMap<u64, (bool, u64, u64, Outcome)>,
    ) -> io::Result<Option<(u64, Outcome)>> {
        let structured = self.structured || self.extended;
        let reply = self.read_reply(|cookie| match pending.get(&cookie) {
            Some((true, _, len, _)) if !structured => *len,
            _ => 0,
        })?;
        let cookie = reply.cookie;
        let entry = pending
            .get_mut(&cookie)
            .unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}: {reply:?}"));
        assert!(
            !(structured && entry.0 && reply.simple_error.is_some()),
            "simple reply to a READ after structured replies were negotiated: {reply:?}"
        );
        fold_reply(entry, &reply, self.extended);
        if reply.is_final() {
            let (_, _, _, outcome) = pending.remove(&cookie).expect("pending entry");
            return Ok(Some((cookie, outcome)));
        }
        Ok(None)
    }

    /// Sends a command and waits for its outcome (nothing else may be in flight).
    pub fn command(
        &mut self,
        flags: u16,
        ty: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Outcome> {
        // Extended headers: a WRITE's length is its payload length and says so.
        let flags = if self.extended && ty == CMD_WRITE {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        let cookie = self.send_request(flags, ty, offset, len, payload)?;
        self.wait(cookie, ty == CMD_READ, offset, len)
    }

    /// READ; `Err(errno)` on a server error.
    pub fn read(&mut self, offset: u64, len: u64) -> io::Result<Result<Vec<u8>, u32>> {
        let outcome = self.command(0, CMD_READ, offset, len, &[])?;
        Ok(match outcome.error {
            Some(e) => Err(e),
            None => Ok(outcome.data),
        })
    }

    /// WRITE with `flags`; `Err(errno)` on a server error.
    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> io::Result<Result<(), u32>> {
        let outcome = self.command(flags, CMD_WRITE, offset, data.len() as u64, data)?;
        Ok(outcome.error.map_or(Ok(()), Err))
    }

    /// A command without payload; `Err(errno)` on a server error.
    pub fn simple(
        &mut self,
        flags: u16,
        ty: u16,
        offset: u64,
        len: u64,
    ) -> io::Result<Result<(), u32>> {
        let outcome = self.command(flags, ty, offset, len, &[])?;
        Ok(outcome.error.map_or(Ok(()), Err))
    }

    /// NBD_CMD_DISC, then waits (bounded) for the server to close.
    pub fn disconnect(mut self) -> io::Result<()> {
        let cookie = self.cookie();
        let msg = self.request_bytes(0, CMD_DISC, cookie, 0, 0);
        self.write_all(&msg)?;
        let mut buf = [0u8; 1];
        match self.stream.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(_) => panic!("server sent data after NBD_CMD_DISC"),
            Err(e) => Err(e),
        }
    }

    /// True if the server closed the connection (EOF or reset) within [`IO_TIMEOUT`].
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Sets SO_LINGER {on, 0}: `close` then sends RST instead of FIN.
    pub fn set_linger_zero(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid, live `linger`.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt(SO_LINGER): {}",
            io::Error::last_os_error()
        );
    }
}

fn parse_info(data: &[u8], info: &mut ExportInfo) {
    assert!(data.len() >= 2, "short NBD_REP_INFO");
    match be16(data) {
        INFO_EXPORT => {
            assert_eq!(data.len(), 12, "NBD_INFO_EXPORT must be 12 bytes");
            info.size = be64(&data[2..]);
            info.flags = be16(&data[10..]);
            info.export_infos += 1;
        }
        INFO_BLOCK_SIZE => {
            assert_eq!(data.len(), 14, "NBD_INFO_BLOCK_SIZE must be 14 bytes");
            info.block_size = Some((be32(&data[2..]), be32(&data[6..]), be32(&data[10..])));
        }
        _ => {}
    }
}

fn fold_reply(entry: &mut (bool, u64, u64, Outcome), reply: &Reply, extended: bool) {
    let (is_read, req_offset, req_len, outcome) = entry;
    if *is_read && outcome.data.is_empty() && *req_len > 0 {
        outcome.data = vec![0u8; *req_len as usize];
    }
    if let Some(error) = reply.simple_error {
        if error != 0 {
            outcome.error.get_or_insert(error);
        } else if *is_read {
            outcome.data.copy_from_slice(&reply.payload);
        }
        return;
    }
    let p = &reply.payload;
    match reply.chunk_type {
        REPLY_TYPE_NONE => assert!(p.is_empty(), "NONE chunk with payload"),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            fold_content(outcome, *req_offset, *req_len, reply.chunk_type, p);
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            fold_block_status(outcome, reply.chunk_type, p, extended);
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            assert!(p.len() >= 6, "short error chunk");
            let error = be32(p);
            assert_ne!(error, 0, "error chunk with error 0");
            let offset_len = if reply.chunk_type == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            let want = 6 + usize::from(be16(&p[4..])) + offset_len;
            assert_eq!(
                p.len(),
                want,
                "error chunk length does not match its message length"
            );
            outcome.error.get_or_insert(error);
        }
        other => panic!("unknown chunk type {other:#x}: {reply:?}"),
    }
}

/// OFFSET_DATA / OFFSET_HOLE: must lie inside the request; copied (or zeroed) into place.
fn fold_content(outcome: &mut Outcome, req_offset: u64, req_len: u64, chunk_type: u16, p: &[u8]) {
    let (at, len) = if chunk_type == REPLY_TYPE_OFFSET_DATA {
        assert!(p.len() > 8, "OFFSET_DATA needs an offset and data");
        (be64(p), (p.len() - 8) as u64)
    } else {
        assert_eq!(p.len(), 12, "OFFSET_HOLE is 12 bytes");
        let size = u64::from(be32(&p[8..]));
        assert!(size > 0, "OFFSET_HOLE of size 0");
        (be64(p), size)
    };
    assert!(
        at >= req_offset && at + len <= req_offset + req_len,
        "chunk {at}+{len} outside request {req_offset}+{req_len}"
    );
    outcome.content_chunks += 1;
    let range = (at - req_offset) as usize..(at - req_offset + len) as usize;
    if chunk_type == REPLY_TYPE_OFFSET_DATA {
        outcome.data[range].copy_from_slice(&p[8..]);
    } else {
        outcome.data[range].fill(0);
    }
}

/// BLOCK_STATUS (compact headers only) and BLOCK_STATUS_EXT descriptors.
fn fold_block_status(outcome: &mut Outcome, chunk_type: u16, p: &[u8], extended: bool) {
    if chunk_type == REPLY_TYPE_BLOCK_STATUS {
        assert!(
            !extended,
            "compact BLOCK_STATUS chunk under extended headers"
        );
        assert!(
            p.len() >= 12 && (p.len() - 4).is_multiple_of(8),
            "bad BLOCK_STATUS length"
        );
        let id = be32(p);
        for d in p[4..].chunks(8) {
            outcome
                .extents
                .push((id, be32(d).into(), be32(&d[4..]).into()));
        }
    } else {
        assert!(
            p.len() >= 24 && (p.len() - 8).is_multiple_of(16),
            "bad BLOCK_STATUS_EXT length"
        );
        let (id, count) = (be32(p), be32(&p[4..]) as usize);
        assert_eq!(count, (p.len() - 8) / 16, "BLOCK_STATUS_EXT count mismatch");
        for d in p[8..].chunks(16) {
            outcome.extents.push((id, be64(d), be64(&d[8..])));
        }
    }
}
