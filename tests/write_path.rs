//! WRITE payloads wherever the receive boundaries fall: small writes wait until wholly
//! buffered, large ones receive their tail straight into the request buffer. A raw client
//! fragments the byte stream on purpose (header alone, payload in pieces, many writes in one
//! send, cuts at random places) and everything must read back exactly.

mod common;

use std::collections::HashMap;
use std::thread::sleep;
use std::time::Duration;

use common::raw::*;
use common::{ServerSpec, pattern, sparse_file, tempdir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAUSE: Duration = Duration::from_millis(30);

/// xorshift64*: deterministic cuts (seeded, so failures replay).
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
}

/// One WRITE (header and payload) as the bytes a client sends.
fn write_bytes(c: &mut RawClient, offset: u64, data: &[u8]) -> (u64, Vec<u8>) {
    let cookie = c.cookie();
    let mut bytes = c.request_bytes(0, CMD_WRITE, cookie, offset, data.len() as u64);
    bytes.extend_from_slice(data);
    (cookie, bytes)
}

/// Waits for `count` successful replies to the cookies in `pending`.
fn expect_ok(c: &mut RawClient, pending: &mut HashMap<u64, (bool, u64, u64, Outcome)>) {
    while !pending.is_empty() {
        if let Some((cookie, outcome)) = c.pump(pending).unwrap() {
            assert_eq!(outcome.error, None, "write {cookie:#x} failed");
        }
    }
}

fn check(c: &mut RawClient, offset: u64, want: &[u8]) {
    let got = c
        .read(offset, want.len() as u64)
        .unwrap()
        .expect("read back");
    assert!(got == want, "{} bytes at {offset} differ", want.len());
}

fn exports() -> Vec<(tempfile::TempDir, ServerSpec)> {
    let dir = tempdir();
    let image = dir.path().join("w.img");
    sparse_file(&image, 64 * MIB);
    let file = ServerSpec::new(image.to_str().unwrap());
    vec![(dir, file), (tempdir(), ServerSpec::new("memory:64M"))]
}

#[test]
fn a_small_write_trickling_in_piece_by_piece() {
    for (_dir, spec) in exports() {
        let server = spec.start();
        let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
        let data = pattern(8 * KIB, 4096, 11);
        let (cookie, bytes) = write_bytes(&mut c, 8 * KIB, &data);
        // Header alone, then the payload in three pieces with pauses between.
        for piece in [
            &bytes[..28],
            &bytes[28..1028],
            &bytes[1028..3000],
            &bytes[3000..],
        ] {
            c.write_all(piece).unwrap();
            sleep(PAUSE);
        }
        let outcome = c.wait(cookie, false, 8 * KIB, 4096).unwrap();
        assert_eq!(outcome.error, None);
        check(&mut c, 8 * KIB, &data);
        c.disconnect().unwrap();
    }
}

#[test]
fn pipelined_writes_cut_at_random_places() {
    for (_dir, spec) in exports() {
        let server = spec.start();
        let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
        let mut rng = Rng(0x5eed_0000_0000_0001);
        for round in 0..8u64 {
            // 24 writes (one of them 1 MiB: the large path) in one stream, cut at random.
            let mut stream = Vec::new();
            let mut pending = HashMap::new();
            let mut written = Vec::new();
            for index in 0..24u64 {
                let (offset, len) = match index {
                    7 => (48 * MIB + round * MIB, MIB),
                    _ => (
                        (round * 24 + index) * MIB / 4 + 8 * rng.below(1000),
                        8 * (1 + rng.below(5000)),
                    ),
                };
                let data = pattern(offset, len as usize, round + 1);
                let (cookie, bytes) = write_bytes(&mut c, offset, &data);
                stream.extend_from_slice(&bytes);
                pending.insert(cookie, (false, offset, len, Outcome::default()));
                written.push((offset, data));
            }
            let mut at = 0;
            while at < stream.len() {
                let cut = (at + 1 + rng.below(70_000) as usize).min(stream.len());
                c.write_all(&stream[at..cut]).unwrap();
                if rng.below(4) == 0 {
                    sleep(Duration::from_millis(2));
                }
                at = cut;
            }
            expect_ok(&mut c, &mut pending);
            for (offset, data) in &written {
                check(&mut c, *offset, data);
            }
        }
        c.disconnect().unwrap();
    }
}
