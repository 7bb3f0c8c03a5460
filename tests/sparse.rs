//! Sparse READs: with structured replies (and with extended headers), runs of zero blocks
//! are answered with `NBD_REPLY_TYPE_OFFSET_HOLE` chunks. Checked with python3-libnbd
//! (`tests/python/sparse.py`), qemu-io over extended headers (its own chunk trace), and the
//! raw client for the exact chunk layout.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::raw::*;
use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
/// The layout `tests/python/sparse.py` expects: 64 KiB of pattern(seed 7) at each offset.
const SEED: u64 = 7;
const DATA_LEN: u64 = 64 * KIB;
const DATA_AT: [u64; 3] = [MIB, MIB + 192 * KIB, 3 * MIB - 8 * KIB];

/// A 64 MiB sparse file with the data regions of the shared layout written.
fn layout_file(path: &Path) {
    sparse_file(path, 64 * MIB);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    for at in DATA_AT {
        file.write_all_at(&pattern(at, DATA_LEN as usize, SEED), at)
            .unwrap();
    }
    file.sync_all().unwrap();
}

fn socket(server: &Server) -> &str {
    server.socket().to_str().expect("UTF-8 socket path")
}

#[test]
fn libnbd_gets_hole_chunks_from_a_direct_file_export() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    layout_file(&image);
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    let out = python("sparse.py", &[socket(&server), "file"], TIMEOUT);
    assert!(out.contains("sparse reads ok"), "{out}");
}

#[test]
fn libnbd_gets_hole_chunks_from_a_writeback_file_export() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    layout_file(&image);
    let server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--cache", "writeback"])
        .start();
    let out = python("sparse.py", &[socket(&server), "file"], TIMEOUT);
    assert!(out.contains("sparse reads ok"), "{out}");
}

#[test]
fn libnbd_gets_hole_chunks_from_a_memory_export() {
    if !require_python_nbd() {
        return;
    }
    let server = ServerSpec::new("memory:64M").start();
    let out = python("sparse.py", &[socket(&server), "memory"], TIMEOUT);
    assert!(out.contains("sparse reads ok"), "{out}");
}

/// One READ's chunks as (chunk type, flags, header offset field, payload).
fn read_chunks(c: &mut RawClient, flags: u16, offset: u64, len: u64) -> Vec<Reply> {
    let cookie = c.send_request(flags, CMD_READ, offset, len, &[]).unwrap();
    let mut replies = Vec::new();
    loop {
        let reply = c.read_reply(|_| 0).unwrap();
        assert_eq!(reply.cookie, cookie);
        assert!(reply.simple_error.is_none(), "simple reply: {reply:?}");
        let done = reply.is_final();
        replies.push(reply);
        if done {
            return replies;
        }
    }
}

/// (type, flags, payload length) of each chunk, for failure messages.
fn summary(chunks: &[Reply]) -> Vec<(u16, u16, usize)> {
    chunks
        .iter()
        .map(|c| (c.chunk_type, c.flags, c.payload.len()))
        .collect()
}

fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().unwrap())
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

/// The exact chunks of reads over the layout, structured or extended: offsets, sizes, the
/// 12-byte OFFSET_HOLE payload, DONE only on the last chunk, the extended header's offset.
fn check_chunk_layout(c: &mut RawClient, extended: bool) {
    let offset = MIB;
    let chunks = read_chunks(c, 0, offset, 512 * KIB);
    let expect = [
        (REPLY_TYPE_OFFSET_DATA, MIB, DATA_LEN),
        (REPLY_TYPE_OFFSET_HOLE, MIB + DATA_LEN, 128 * KIB),
        (REPLY_TYPE_OFFSET_DATA, MIB + 192 * KIB, DATA_LEN),
        (REPLY_TYPE_OFFSET_HOLE, MIB + 256 * KIB, 256 * KIB),
    ];
    assert_eq!(chunks.len(), expect.len(), "{:?}", summary(&chunks));
    for (index, (chunk, (kind, at, len))) in chunks.iter().zip(expect).enumerate() {
        assert_eq!(chunk.chunk_type, kind, "chunk {index}");
        let last = index == expect.len() - 1;
        assert_eq!(
            chunk.flags & REPLY_FLAG_DONE != 0,
            last,
            "DONE on chunk {index}"
        );
        if extended {
            assert_eq!(
                chunk.offset, offset,
                "extended header echoes the request offset"
            );
        }
        assert_eq!(be64(&chunk.payload), at, "chunk {index} offset");
        if kind == REPLY_TYPE_OFFSET_HOLE {
            assert_eq!(chunk.payload.len(), 12, "OFFSET_HOLE payload is u64 + u32");
            assert_eq!(
                u64::from(be32(&chunk.payload[8..])),
                len,
                "hole {index} size"
            );
        } else {
            assert_eq!(chunk.payload.len() as u64, 8 + len);
            assert!(chunk.payload[8..] == pattern(at, len as usize, SEED)[..]);
        }
    }
    // All zero: one hole with DONE.
    let chunks = read_chunks(c, 0, 8 * MIB, MIB);
    assert_eq!(chunks.len(), 1, "{:?}", summary(&chunks));
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_OFFSET_HOLE);
    assert!(chunks[0].is_final());
    assert_eq!(be64(&chunks[0].payload), 8 * MIB);
    assert_eq!(u64::from(be32(&chunks[0].payload[8..])), MIB);
    // DF: one content chunk (data) for a mixed range.
    let chunks = read_chunks(c, CMD_FLAG_DF, MIB, 512 * KIB);
    assert_eq!(chunks.len(), 1, "DF: {:?}", summary(&chunks));
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len() as u64, 8 + 512 * KIB);
}

#[test]
fn raw_chunk_layout_with_structured_replies_and_extended_headers() {
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    layout_file(&image);
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
    check_chunk_layout(&mut c, false);
    c.disconnect().unwrap();

    let mut c = RawClient::handshake(server.socket()).unwrap();
    let reply = c.option(OPT_EXTENDED_HEADERS, &[]).unwrap();
    assert_eq!(reply.reply_type, REP_ACK, "{reply:?}");
    c.extended = true;
    c.go("", &[INFO_BLOCK_SIZE]).unwrap().expect("GO");
    check_chunk_layout(&mut c, true);
    c.disconnect().unwrap();

    // Without structured replies: one simple reply carrying every byte.
    let (mut c, _) = RawClient::ready_simple(server.socket(), "").unwrap();
    let got = c.read(MIB, 512 * KIB).unwrap().expect("simple READ");
    let mut want = vec![0u8; 512 * KIB as usize];
    want[..DATA_LEN as usize].copy_from_slice(&pattern(MIB, DATA_LEN as usize, SEED));
    let at = (192 * KIB) as usize;
    want[at..at + DATA_LEN as usize].copy_from_slice(&pattern(
        MIB + 192 * KIB,
        DATA_LEN as usize,
        SEED,
    ));
    assert!(got == want, "simple READ bytes");
    c.disconnect().unwrap();
}

/// qemu 10 negotiates extended headers; its NBD client traces every chunk header it receives
/// (`nbd_receive_reply_chunk_header`). Holes must arrive as OFFSET_HOLE chunks and the data
/// must still read back right (`read -P` checks every byte).
#[test]
fn qemu_io_reads_hole_chunks_over_extended_headers() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    sparse_file(&image, 64 * MIB);
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    file.write_all_at(&vec![0x5a; MIB as usize], 4 * MIB)
        .unwrap();
    file.sync_all().unwrap();
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    let out = run(
        Command::new("qemu-io")
            .args(["-r", "--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={}",
                socket(&server)
            ))
            .args(["--trace", "nbd_receive_reply_chunk_header"])
            .args(["--trace", "nbd_receive_option_reply"])
            .args(["-c", "read -P 0 0 2M"])
            .args(["-c", "read -P 0x5a 4M 1M"])
            .args(["-c", "read -P 0 5M 1M"]),
        TIMEOUT,
    );
    let text = format!("{}\n{}", out.stdout, out.stderr);
    assert!(out.status.success(), "qemu-io failed: {text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(
        text.contains("option reply 11 (extended headers), type 1 (ack)"),
        "extended headers not negotiated: {text}"
    );
    let chunks = |kind: &str| {
        text.lines()
            .filter(|line| line.contains("Got reply chunk header") && line.contains(kind))
            .count()
    };
    assert!(
        chunks("type = 2 (hole)") >= 2,
        "no OFFSET_HOLE chunks traced: {text}"
    );
    assert!(
        chunks("type = 1 (data)") >= 1,
        "no OFFSET_DATA chunk traced: {text}"
    );
}
