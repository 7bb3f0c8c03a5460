//! Protocol conformance over raw sockets (`common::raw`): negotiation variants, extended
//! headers, simple replies, meta contexts, and unaligned I/O checked against a model.

mod common;

use std::collections::HashMap;
use std::fs;

use common::raw::*;
use common::{ServerSpec, pattern, sparse_file, tempdir};

const MIB: u64 = 1 << 20;

/// xorshift64*: a tiny deterministic generator (seeded, so failures replay).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn extended_headers_read_write_and_block_status() {
    let server = ServerSpec::new("memory:16M").start();
    let mut c = RawClient::handshake(server.socket()).unwrap();
    let reply = c.option(OPT_EXTENDED_HEADERS, &[]).unwrap();
    assert_eq!(
        reply.reply_type, REP_ACK,
        "extended headers are advertised: {reply:?}"
    );
    c.extended = true;
    let contexts = c.set_meta_context("", &["base:allocation"]).unwrap();
    assert_eq!(contexts.len(), 1);
    let info = c.go("", &[INFO_BLOCK_SIZE]).unwrap().expect("GO");
    assert_eq!(info.size, 16 * MIB);
    let data = pattern(MIB, 65536, 5);
    c.write(CMD_FLAG_FUA, MIB, &data)
        .unwrap()
        .expect("extended WRITE");
    assert_eq!(c.read(MIB, 65536).unwrap().expect("extended READ"), data);
    // Reads above 4 GiB are representable now; out of range must still be EINVAL.
    assert_eq!(c.read(1 << 40, 4096).unwrap(), Err(EINVAL));
    let outcome = c.command(0, CMD_BLOCK_STATUS, 0, 4 * MIB, &[]).unwrap();
    assert_eq!(outcome.error, None);
    assert!(
        !outcome.extents.is_empty(),
        "BLOCK_STATUS_EXT without descriptors"
    );
    assert!(
        outcome
            .extents
            .iter()
            .all(|&(id, len, _)| id == contexts[0].0 && len > 0)
    );
    assert_eq!(c.read(MIB, 4096).unwrap().unwrap(), data[..4096]);
    c.disconnect().unwrap();
}

#[test]
fn simple_replies_without_structured_negotiation() {
    let server = ServerSpec::new("memory:16M").start();
    let (mut c, info) = RawClient::ready_simple(server.socket(), "").unwrap();
    assert_eq!(
        info.flags & FLAG_SEND_DF,
        0,
        "SEND_DF must be clear without structured replies"
    );
    let data = pattern(4096, 8192, 1);
    c.write(0, 4096, &data).unwrap().expect("write");
    assert_eq!(c.read(4096, 8192).unwrap().expect("read"), data);
    assert_eq!(
        c.read(16 * MIB, 4096).unwrap(),
        Err(EINVAL),
        "simple error reply"
    );
    assert_eq!(
        c.read(0, 4096).unwrap().expect("in sync after error").len(),
        4096
    );
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0).unwrap(), Ok(()));
    // BLOCK_STATUS needs structured replies: an error, not a broken stream.
    assert!(c.simple(0, CMD_BLOCK_STATUS, 0, 4096).unwrap().is_err());
    assert_eq!(c.read(4096, 8192).unwrap().expect("read"), data);
    c.disconnect().unwrap();
}

#[test]
fn export_name_option_still_works() {
    let server = ServerSpec::new("memory:2M")
        .export("named=memory:3M")
        .start();
    for (name, size) in [("", 2 * MIB), ("named", 3 * MIB)] {
        let mut c = RawClient::handshake(server.socket()).unwrap();
        assert!(c.handshake_flags & FLAG_NO_ZEROES != 0, "NO_ZEROES offered");
        c.send_option(OPT_EXPORT_NAME, name.as_bytes()).unwrap();
        let mut reply = [0u8; 10];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), size);
        let flags = u16::from_be_bytes(reply[8..].try_into().unwrap());
        assert!(flags & FLAG_HAS_FLAGS != 0);
        assert_eq!(
            flags & FLAG_SEND_DF,
            0,
            "no structured replies via EXPORT_NAME"
        );
        assert_eq!(c.read(0, 512).unwrap().expect("read").len(), 512);
        c.disconnect().unwrap();
    }
    // Unknown export: the server must terminate the session (it cannot reply an error).
    let mut c = RawClient::handshake(server.socket()).unwrap();
    c.send_option(OPT_EXPORT_NAME, b"missing").unwrap();
    assert!(
        c.closed_by_server(),
        "EXPORT_NAME for an unknown export must close"
    );
}

#[test]
fn meta_context_list_and_set() {
    let server = ServerSpec::new("memory:4M").start();
    let mut c = RawClient::handshake(server.socket()).unwrap();
    assert_eq!(
        c.option(OPT_STRUCTURED_REPLY, &[]).unwrap().reply_type,
        REP_ACK
    );
    for queries in [&["base:"][..], &[][..]] {
        c.send_option(OPT_LIST_META_CONTEXT, &meta_payload("", queries))
            .unwrap();
        let replies = c.replies_until_final(OPT_LIST_META_CONTEXT).unwrap();
        let (last, contexts) = replies.split_last().unwrap();
        assert_eq!(last.reply_type, REP_ACK);
        let names: Vec<_> = contexts
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data[4..]))
            .collect();
        assert!(
            names.iter().any(|n| n == "base:allocation"),
            "LIST {queries:?}: {names:?}"
        );
    }
    // Unknown namespaces and leaves are ignored, not errors.
    let contexts = c
        .set_meta_context("", &["nosuch:thing", "base:nosuch"])
        .unwrap();
    assert!(
        contexts.is_empty(),
        "unknown contexts selected: {contexts:?}"
    );
    let contexts = c
        .set_meta_context("", &["base:allocation", "nosuch:x"])
        .unwrap();
    assert_eq!(contexts.len(), 1);
    assert_eq!(contexts[0].1, "base:allocation");
    // Bad inner lengths: ERR_INVALID, stream stays in sync.
    let mut bad = meta_payload("", &["base:allocation"]);
    let n = bad.len();
    bad.truncate(n - 3);
    let reply = c.option(OPT_SET_META_CONTEXT, &bad).unwrap();
    assert_eq!(reply.reply_type, REP_ERR_INVALID, "{reply:?}");
    let contexts = c.set_meta_context("", &["base:allocation"]).unwrap();
    c.structured = true;
    c.go("", &[]).unwrap().expect("GO");
    let outcome = c.command(0, CMD_BLOCK_STATUS, 0, 4 * MIB, &[]).unwrap();
    assert_eq!(outcome.error, None);
    let covered: u64 = outcome.extents.iter().map(|e| e.1).sum();
    assert!(covered > 0 && outcome.extents.iter().all(|e| e.0 == contexts[0].0));
    // REQ_ONE: exactly one descriptor, no longer than the request.
    let outcome = c
        .command(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4096, 8192, &[])
        .unwrap();
    assert_eq!(outcome.extents.len(), 1, "REQ_ONE: {:?}", outcome.extents);
    assert!(outcome.extents[0].1 <= 8192);
}

#[test]
fn df_read_is_one_content_chunk() {
    let server = ServerSpec::new("memory:4M").start();
    let (mut c, info) = RawClient::ready(server.socket(), "").unwrap();
    assert!(
        info.flags & FLAG_SEND_DF != 0,
        "SEND_DF advertised with structured replies"
    );
    c.write(0, 0, &pattern(0, 32768, 4)).unwrap().unwrap();
    // Half data, half never-written (a server may describe the tail as a hole, but not with DF).
    let outcome = c.command(CMD_FLAG_DF, CMD_READ, 0, 65536, &[]).unwrap();
    assert_eq!(outcome.error, None);
    assert_eq!(
        outcome.content_chunks, 1,
        "DF read split into {} chunks",
        outcome.content_chunks
    );
    assert_eq!(outcome.data[..32768], pattern(0, 32768, 4)[..]);
    assert!(outcome.data[32768..].iter().all(|&b| b == 0));
}

/// Random unaligned reads, writes and zeroes against an O_DIRECT export whose client did not
/// negotiate block sizes, checked against an in-memory model and finally against the file.
#[test]
fn unaligned_io_on_o_direct_export_matches_a_model() {
    let dir = tempdir();
    let image = dir.path().join("model.img");
    let size = 8 * MIB;
    sparse_file(&image, size);
    let mut server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--cache", "direct"])
        .start();
    let mut c = RawClient::handshake(server.socket()).unwrap();
    assert_eq!(
        c.option(OPT_STRUCTURED_REPLY, &[]).unwrap().reply_type,
        REP_ACK
    );
    c.structured = true;
    let info = c.go("", &[]).unwrap().expect("GO without INFO_BLOCK_SIZE");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    for step in 0..1500 {
        let len = 1 + rng.below(20_000);
        let offset = rng.below(size - len);
        let range = offset as usize..(offset + len) as usize;
        match rng.below(10) {
            0..=3 => {
                let data = rng.bytes(len as usize);
                let flags = if rng.below(4) == 0 { CMD_FLAG_FUA } else { 0 };
                c.write(flags, offset, &data)
                    .unwrap()
                    .expect("unaligned write");
                model[range].copy_from_slice(&data);
            }
            4 if info.flags & FLAG_SEND_WRITE_ZEROES != 0 => {
                c.simple(0, CMD_WRITE_ZEROES, offset, len)
                    .unwrap()
                    .expect("unaligned zero");
                model[range].fill(0);
            }
            5 => c.simple(0, CMD_FLUSH, 0, 0).unwrap().expect("flush"),
            _ => {
                let got = c.read(offset, len).unwrap().expect("unaligned read");
                assert!(
                    got == model[range],
                    "step {step}: read {offset}+{len} differs"
                );
            }
        }
    }
    pipelined_adjacent_unaligned_writes(&mut c, &mut rng, &mut model, 3 * MIB + 17);
    c.simple(0, CMD_FLUSH, 0, 0).unwrap().unwrap();
    c.disconnect().unwrap();
    assert!(server.terminate().success());
    let disk = fs::read(&image).unwrap();
    let first_diff = disk.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "file differs from the model");
}

/// 256 adjacent unaligned WRITEs sent back to back before any reply is read. Neighbours share
/// 512/4096-byte blocks, so a server doing unsynchronised read-modify-write would lose some.
fn pipelined_adjacent_unaligned_writes(
    c: &mut RawClient,
    rng: &mut Rng,
    model: &mut [u8],
    start: u64,
) {
    let mut pending = HashMap::new();
    let mut burst = Vec::new();
    let mut offset = start;
    for _ in 0..256 {
        let len = 1 + rng.below(3000);
        let data = rng.bytes(len as usize);
        let cookie = c.cookie();
        burst.extend_from_slice(&c.request_bytes(0, CMD_WRITE, cookie, offset, len));
        burst.extend_from_slice(&data);
        pending.insert(cookie, (false, offset, len, Outcome::default()));
        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        offset += len;
    }
    let mut writer = c.stream_clone();
    let sender = std::thread::spawn(move || writer.write_all_ignoring_errors(&burst));
    while !pending.is_empty() {
        if let Some((_, outcome)) = c.pump(&mut pending).unwrap() {
            assert_eq!(outcome.error, None, "pipelined unaligned write failed");
        }
    }
    sender.join().unwrap();
    let got = c.read(start, offset - start).unwrap().unwrap();
    let first_diff = got
        .iter()
        .zip(&model[start as usize..])
        .position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "concurrent adjacent unaligned writes lost data"
    );
}

/// qemu 10 negotiates extended headers and sends NBD_CMD_WRITE *without*
/// NBD_CMD_FLAG_PAYLOAD_LEN. The length is still the payload length: the server must consume it
/// and stay in sync (qemu-nbd and nbdkit accept such writes).
#[test]
fn extended_write_without_payload_len_keeps_framing() {
    let server = ServerSpec::new("memory:4M").start();
    let mut c = RawClient::handshake(server.socket()).unwrap();
    assert_eq!(
        c.option(OPT_EXTENDED_HEADERS, &[]).unwrap().reply_type,
        REP_ACK
    );
    c.extended = true;
    c.go("", &[]).unwrap().expect("GO");
    let data = pattern(8192, 4096, 21);
    let cookie = c.cookie();
    let mut msg = c.request_bytes(0, CMD_WRITE, cookie, 8192, 4096); // no PAYLOAD_LEN flag
    msg.extend_from_slice(&data);
    c.write_all(&msg).unwrap();
    let outcome = c
        .wait(cookie, false, 8192, 4096)
        .expect("a reply, not a dropped connection");
    let got = c
        .read(8192, 4096)
        .unwrap()
        .expect("stream in sync after the WRITE");
    match outcome.error {
        None => assert_eq!(got, data, "accepted WRITE was not applied"),
        Some(err) => assert_eq!(err, EINVAL, "refused WRITE: only EINVAL is fair"),
    }
}
