//! Misbehaving clients over raw sockets (`common::raw`, independent of the server's codec).
//!
//! Every test ends with [`assert_healthy`]: the server process is alive, a fresh client is
//! served, and the data written before the abuse is intact.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::raw::*;
use common::{Server, ServerSpec, pattern};

const EXPORT_BYTES: u64 = 64 << 20;
const SEED_BYTES: u64 = 1 << 20;
const SEED: u64 = 0x5eed_0000_0000_0001;

/// A 64 MiB memory export with a known 1 MiB pattern at offset 0.
fn seeded_server(options: &[&str]) -> Server {
    let server = ServerSpec::new("memory:64M").options(options).start();
    seed(&server);
    server
}

fn seed(server: &Server) {
    let (mut client, info) = RawClient::ready(server.socket(), "").expect("connect");
    assert_eq!(info.size, EXPORT_BYTES);
    client
        .write(0, 0, &pattern(0, SEED_BYTES as usize, SEED))
        .unwrap()
        .expect("seed write");
    client.disconnect().expect("disconnect");
}

/// The server is alive, serves a fresh client, and the seeded data is intact.
fn assert_healthy(server: &mut Server) {
    server.assert_running();
    let (mut client, info) = RawClient::ready(server.socket(), "").expect("fresh client connects");
    assert_eq!(info.size, EXPORT_BYTES);
    let data = client
        .read(0, SEED_BYTES)
        .unwrap()
        .expect("read seeded data");
    assert!(
        data == pattern(0, SEED_BYTES as usize, SEED),
        "seeded data was corrupted"
    );
    let scratch = pattern(EXPORT_BYTES - 8192, 8192, 77);
    client
        .write(0, EXPORT_BYTES - 8192, &scratch)
        .unwrap()
        .expect("scratch write");
    assert_eq!(
        client
            .read(EXPORT_BYTES - 8192, 8192)
            .unwrap()
            .expect("scratch read"),
        scratch
    );
    client.disconnect().expect("disconnect");
    server.assert_running();
}

/// One READ at offset 0 returns the seed: the connection is usable and in sync.
fn assert_in_sync(client: &mut RawClient) {
    let data = client
        .read(0, 4096)
        .expect("connection usable")
        .expect("read ok");
    assert!(data == pattern(0, 4096, SEED), "stream out of sync");
}

fn free_tcp_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let mut server = seeded_server(&[]);
    for cflags in [0xffff_ffffu32, FLAG_C_FIXED_NEWSTYLE | 0x8000_0000, 0x4] {
        let mut client = RawClient::connect(server.socket()).unwrap();
        client.read_greeting().unwrap();
        client.write_all(&cflags.to_be_bytes()).unwrap();
        assert!(
            client.closed_by_server(),
            "unknown client flags {cflags:#x} must drop"
        );
    }
    assert_healthy(&mut server);
}

#[test]
fn bad_option_magic_closes_without_harm() {
    let mut server = seeded_server(&[]);
    let mut client = RawClient::handshake(server.socket()).unwrap();
    client
        .write_all(b"NOTMAGIC\x00\x00\x00\x03\x00\x00\x00\x00")
        .unwrap();
    assert!(
        client.closed_by_server(),
        "bad IHAVEOPT must close the connection"
    );
    assert_healthy(&mut server);
}

#[test]
fn bad_request_magic_closes_without_harm() {
    let mut server = seeded_server(&[]);
    for magic in [0xdead_beefu32, SIMPLE_REPLY_MAGIC, 0] {
        let (mut client, _) = RawClient::ready(server.socket(), "").unwrap();
        assert_in_sync(&mut client);
        let mut msg = client.request_bytes(0, CMD_READ, 7, 0, 4096);
        msg[..4].copy_from_slice(&magic.to_be_bytes());
        client.write_all(&msg).unwrap();
        assert!(
            client.closed_by_server(),
            "bad request magic {magic:#x} must close"
        );
    }
    assert_healthy(&mut server);
}

#[test]
fn disconnect_mid_handshake() {
    let mut server = seeded_server(&[]);
    let path = server.socket().to_path_buf();
    // Each case stops at a different point of the handshake.
    drop(RawClient::connect(&path).unwrap());
    let mut c = RawClient::connect(&path).unwrap();
    c.read_greeting().unwrap();
    drop(c);
    let mut c = RawClient::connect(&path).unwrap();
    c.read_greeting().unwrap();
    c.write_all(&[0, 0]).unwrap(); // half the client flags
    drop(c);
    drop(RawClient::handshake(&path).unwrap());
    let mut c = RawClient::handshake(&path).unwrap();
    c.write_all(&IHAVEOPT.to_be_bytes()).unwrap(); // half an option header
    drop(c);
    let mut c = RawClient::handshake(&path).unwrap();
    c.send_option_header(OPT_GO, 100).unwrap();
    c.write_all(&[0; 10]).unwrap(); // 10 of 100 option bytes
    drop(c);
    let mut c = RawClient::handshake(&path).unwrap();
    c.send_option(OPT_GO, &info_payload("", &[INFO_BLOCK_SIZE]))
        .unwrap();
    drop(c); // GO sent, replies never read
    let mut c = RawClient::handshake(&path).unwrap();
    c.send_option(OPT_LIST, &[]).unwrap();
    drop(c);
    assert_healthy(&mut server);
}

#[test]
fn disconnect_mid_request() {
    let mut server = seeded_server(&[]);
    let path = server.socket().to_path_buf();
    // Half a request header.
    let (mut c, _) = RawClient::ready(&path, "").unwrap();
    let msg = c.request_bytes(0, CMD_READ, 1, 0, 4096);
    c.write_all(&msg[..10]).unwrap();
    drop(c);
    // A WRITE header without its payload.
    let (mut c, _) = RawClient::ready(&path, "").unwrap();
    let msg = c.request_bytes(0, CMD_WRITE, 2, 0, 65536);
    c.write_all(&msg).unwrap();
    drop(c);
    // A WRITE with part of its payload (must not be applied as a short write of the seed).
    let (mut c, _) = RawClient::ready(&path, "").unwrap();
    let mut msg = c.request_bytes(0, CMD_WRITE, 3, 0, 65536);
    msg.extend_from_slice(&[0xee; 1000]);
    c.write_all(&msg).unwrap();
    drop(c);
    // A large READ, closed before the reply is read (the server must survive EPIPE).
    let (mut c, _) = RawClient::ready(&path, "").unwrap();
    let msg = c.request_bytes(0, CMD_READ, 4, 0, 32 << 20);
    c.write_all(&msg).unwrap();
    drop(c);
    // Same without structured replies.
    let (mut c, _) = RawClient::ready_simple(&path, "").unwrap();
    let msg = c.request_bytes(0, CMD_READ, 5, 0, 32 << 20);
    c.write_all(&msg).unwrap();
    drop(c);
    assert_healthy(&mut server);
}

/// Sends `count` READs of 64 KiB, reads none of the replies, and closes.
fn flood_reads_then_close(client: &mut RawClient, count: u64) {
    let mut burst = Vec::new();
    for i in 0..count {
        let offset = (i * 65536) % EXPORT_BYTES;
        burst.extend_from_slice(&client.request_bytes(0, CMD_READ, i, offset, 65536));
    }
    // The server may stop reading once its in-flight limit is reached; a timeout is fine.
    let _ = client.write_all(&burst);
}

#[test]
fn reset_with_hundreds_of_pending_replies() {
    let address = free_tcp_address();
    let mut server = ServerSpec::new("memory:64M")
        .listen(address.to_string())
        .start();
    seed(&server);
    let baseline_fds = server.fd_count();
    for round in 0..5 {
        let (mut client, _) = RawClient::ready(address, "").expect("tcp connect");
        flood_reads_then_close(&mut client, 500);
        // Let some replies start flowing so the reset hits a busy connection.
        std::thread::sleep(Duration::from_millis(20 * round));
        client.set_linger_zero();
        drop(client); // RST with replies pending
    }
    // Same on the unix socket (no RST there: close with unread replies, server gets EPIPE).
    for _ in 0..5 {
        let (mut client, _) = RawClient::ready(server.socket(), "").unwrap();
        flood_reads_then_close(&mut client, 500);
        drop(client);
    }
    assert_healthy(&mut server);
    wait_for_fds(&server, baseline_fds);
}

fn wait_for_fds(server: &Server, baseline: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = server.fd_count();
    while now > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = server.fd_count();
    }
    assert!(
        now <= baseline,
        "fd leak: {baseline} fds before, {now} after; log:\n{}",
        server.log()
    );
}

#[test]
fn out_of_range_and_wrapping_requests() {
    let mut server = seeded_server(&[]);
    let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
    let size = EXPORT_BYTES;
    let wrap = u64::MAX - 1023;
    for (offset, len) in [
        (size, 4096),
        (size - 1024, 4096),
        (wrap, 4096),
        (u64::MAX, 1),
    ] {
        let what = format!("at {offset:#x}+{len}");
        assert_eq!(c.read(offset, len).unwrap(), Err(EINVAL), "READ {what}");
        assert_in_sync(&mut c);
        // Past the end: ENOSPC for writes; if offset + length wraps, EINVAL is also fair.
        let wraps = offset.checked_add(len).is_none();
        let write_errno_ok = |err: u32| err == ENOSPC || (wraps && err == EINVAL);
        let payload = vec![0x42; len as usize];
        let err = c
            .write(0, offset, &payload)
            .unwrap()
            .expect_err("WRITE out of range");
        assert!(write_errno_ok(err), "WRITE {what}: errno {err}");
        assert_in_sync(&mut c);
        assert_eq!(
            c.simple(0, CMD_TRIM, offset, len).unwrap(),
            Err(EINVAL),
            "TRIM {what}"
        );
        let err = c
            .simple(0, CMD_WRITE_ZEROES, offset, len)
            .unwrap()
            .expect_err("WZ");
        assert!(write_errno_ok(err), "WRITE_ZEROES {what}: errno {err}");
        let err = c
            .simple(0, CMD_BLOCK_STATUS, offset, len)
            .unwrap()
            .expect_err("BS");
        assert_eq!(err, EINVAL, "BLOCK_STATUS {what}");
        let err = c
            .simple(0, CMD_CACHE, offset, len)
            .unwrap()
            .expect_err("CACHE");
        assert_eq!(err, EINVAL, "CACHE {what}");
        assert_in_sync(&mut c);
    }
    // Straddling the end with ENOSPC for a plain WRITE (the contract's errno).
    let err = c
        .write(0, size - 512, &[1; 1024])
        .unwrap()
        .expect_err("straddling WRITE");
    assert_eq!(err, ENOSPC);
    assert_in_sync(&mut c);
    c.disconnect().unwrap();
    assert_healthy(&mut server);
}

#[test]
fn oversize_requests_get_errors_not_disconnects() {
    let mut server = seeded_server(&[]);
    let (mut c, info) = RawClient::ready(server.socket(), "").unwrap();
    let max = u64::from(info.block_size.expect("NBD_INFO_BLOCK_SIZE sent").2);
    // A READ above the maximum payload, inside the export: EINVAL or EOVERFLOW, no disconnect.
    let err = c
        .read(0, max + 4096)
        .unwrap()
        .expect_err("oversize READ must fail");
    assert!(
        err == EINVAL || err == EOVERFLOW,
        "oversize READ: errno {err}"
    );
    assert_in_sync(&mut c);
    let err = c
        .read(0, u64::from(u32::MAX))
        .unwrap()
        .expect_err("4 GiB READ must fail");
    assert!(err == EINVAL || err == EOVERFLOW, "4 GiB READ: errno {err}");
    assert_in_sync(&mut c);
    // Large non-payload commands are not a reason to disconnect either.
    let big = u64::from(u32::MAX);
    assert!(c.simple(0, CMD_TRIM, 0, big).unwrap().is_err());
    assert!(c.simple(0, CMD_CACHE, 0, big).unwrap().is_err());
    assert_in_sync(&mut c);
    // Zero-length commands are unspecified, but must not break the connection.
    let _ = c.read(4096, 0).unwrap();
    let _ = c.write(0, 4096, &[]).unwrap();
    let _ = c.simple(0, CMD_TRIM, 4096, 0).unwrap();
    assert_in_sync(&mut c);
    c.disconnect().unwrap();
    assert_healthy(&mut server);
}

#[test]
fn oversize_write_payload_is_refused_cleanly() {
    let mut server = seeded_server(&[]);
    let (mut c, info) = RawClient::ready(server.socket(), "").unwrap();
    let max = u64::from(info.block_size.expect("NBD_INFO_BLOCK_SIZE sent").2);
    let len = max + 1024 * 1024;
    let cookie = c.cookie();
    let header = c.request_bytes(0, CMD_WRITE, cookie, 0, len);
    c.write_all(&header).unwrap();
    // The server may hard-disconnect (DoS protection) or drain the payload and reply EINVAL.
    let chunk = vec![0xab; 1 << 20];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min((len - sent) as usize);
        if c.write_all(&chunk[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    if sent == len {
        match c.wait(cookie, false, 0, len) {
            Ok(outcome) => {
                assert!(outcome.error.is_some(), "oversize WRITE must not succeed");
                assert_in_sync(&mut c);
            }
            Err(e) => eprintln!("server closed after oversize WRITE: {e}"),
        }
    }
    drop(c);
    assert_healthy(&mut server);
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let mut server = seeded_server(&[]);
    let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
    for ty in [8u16, 9, 42, 0x7fff, 0xffff] {
        assert_eq!(
            c.simple(0, ty, 0, 4096).unwrap(),
            Err(EINVAL),
            "command type {ty}"
        );
        assert_in_sync(&mut c);
    }
    // Unknown command flags (bits the spec does not define).
    for flag in [1u16 << 7, 1 << 15] {
        let outcome = c.command(flag, CMD_READ, 0, 4096, &[]).unwrap();
        assert_eq!(
            outcome.error,
            Some(EINVAL),
            "READ with unknown flag {flag:#x}"
        );
        assert_in_sync(&mut c);
    }
    c.disconnect().unwrap();
    assert_healthy(&mut server);
}

#[test]
fn unknown_options_get_unsup_and_parsing_continues() {
    let mut server = seeded_server(&[]);
    let mut c = RawClient::handshake(server.socket()).unwrap();
    for (option, data) in [
        (0x1234u32, vec![7u8; 20]),
        (0x7fff_ffff, vec![]),
        (12, vec![1; 3]),
    ] {
        let reply = c.option(option, &data).unwrap();
        assert_eq!(
            reply.reply_type, REP_ERR_UNSUP,
            "unknown option {option:#x}"
        );
    }
    // No TLS configured: STARTTLS must be refused, not half-started.
    let reply = c.option(OPT_STARTTLS, &[]).unwrap();
    assert!(
        reply.reply_type == REP_ERR_UNSUP || reply.reply_type == REP_ERR_POLICY,
        "STARTTLS without TLS: {reply:?}"
    );
    assert_eq!(c.list().unwrap(), vec![String::new()]);
    let info = c.go("", &[]).unwrap().expect("GO after unknown options");
    assert_eq!(info.size, EXPORT_BYTES);
    assert_in_sync(&mut c);
    c.disconnect().unwrap();
    assert_healthy(&mut server);
}

#[test]
fn absurd_option_lengths_are_not_allocated() {
    let mut server = seeded_server(&[]);
    // Peak RSS so far (the registered pools are already resident) is the baseline.
    let baseline_kib = server.rss_peak_kib();
    let junk = vec![0u8; 1 << 20];
    for option in [
        0x1234u32,
        OPT_INFO,
        OPT_GO,
        OPT_LIST,
        OPT_SET_META_CONTEXT,
        OPT_EXPORT_NAME,
    ] {
        let mut c = RawClient::handshake(server.socket()).unwrap();
        c.send_option_header(option, u32::MAX).unwrap();
        // Stream up to 64 MiB of the claimed 4 GiB; the server may hang up at any point.
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..64 {
            if Instant::now() > deadline || c.write_all(&junk).is_err() {
                break;
            }
        }
        let peak_kib = server.rss_peak_kib();
        assert!(
            peak_kib < baseline_kib + 48 * 1024,
            "option {option:#x} with length 0xffffffff: RSS peak {peak_kib} KiB, \
             baseline {baseline_kib} KiB"
        );
        drop(c);
        server.assert_running();
    }
    assert_healthy(&mut server);
}

#[test]
fn list_with_payload_is_invalid_and_stream_stays_in_sync() {
    let mut server = seeded_server(&[]);
    let mut c = RawClient::handshake(server.socket()).unwrap();
    c.send_option(OPT_LIST, b"garbage").unwrap();
    let reply = c.read_option_reply().unwrap();
    assert_eq!(reply.option, OPT_LIST);
    assert_eq!(
        reply.reply_type, REP_ERR_INVALID,
        "LIST with payload: {reply:?}"
    );
    // The next reply must belong to the next option: no stray SERVER replies, payload consumed.
    c.send_option(0x4242, &[]).unwrap();
    let reply = c.read_option_reply().unwrap();
    assert_eq!(
        (reply.option, reply.reply_type),
        (0x4242, REP_ERR_UNSUP),
        "{reply:?}"
    );
    assert_eq!(c.list().unwrap(), vec![String::new()]);
    c.go("", &[]).unwrap().expect("GO");
    assert_in_sync(&mut c);
    assert_healthy(&mut server);
}

#[test]
fn info_with_inconsistent_lengths_is_invalid_without_hanging() {
    let mut server = seeded_server(&[]);
    let mut c = RawClient::handshake(server.socket()).unwrap();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Name length larger than the option.
    let mut p = 1000u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"abcdef");
    cases.push(p);
    // Name fits, but no room for the info count.
    let mut p = 2u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"ab");
    cases.push(p);
    // Info count promises more requests than present.
    let mut p = info_payload("", &[]);
    let n = p.len();
    p[n - 2..].copy_from_slice(&100u16.to_be_bytes());
    cases.push(p);
    // Shorter than the name length field itself.
    cases.push(vec![0, 0]);
    for option in [OPT_INFO, OPT_GO] {
        for payload in &cases {
            let reply = c
                .option(option, payload)
                .expect("server answers (read timeout = hang)");
            assert_eq!(
                reply.reply_type, REP_ERR_INVALID,
                "{option} with {payload:02x?}"
            );
        }
    }
    let info = c.go("", &[]).unwrap().expect("GO after invalid options");
    assert_eq!(info.size, EXPORT_BYTES);
    assert_in_sync(&mut c);
    assert_healthy(&mut server);
}

#[test]
fn info_reports_the_real_size_and_go_agrees() {
    let mut server = seeded_server(&[]);
    let mut c = RawClient::handshake(server.socket()).unwrap();
    let info = c
        .info_or_go(OPT_INFO, "", &[INFO_BLOCK_SIZE])
        .unwrap()
        .expect("INFO");
    assert_eq!(info.size, EXPORT_BYTES, "INFO must report the real size");
    assert_eq!(info.export_infos, 1);
    assert!(info.flags & FLAG_HAS_FLAGS != 0);
    let (min, preferred, max) = info
        .block_size
        .expect("INFO_BLOCK_SIZE requested, not sent");
    assert!(min.is_power_of_two() && min <= 65536, "minimum {min}");
    assert!(
        preferred.is_power_of_two() && preferred >= min.max(512),
        "preferred {preferred}"
    );
    assert!(max >= preferred && max >= 1 << 20, "maximum {max}");
    let unknown = c.info_or_go(OPT_INFO, "no-such-export", &[]).unwrap();
    assert_eq!(
        unknown.expect_err("unknown export").reply_type,
        REP_ERR_UNKNOWN
    );
    let unknown = c.go("no-such-export", &[]).unwrap();
    assert_eq!(
        unknown.expect_err("unknown export").reply_type,
        REP_ERR_UNKNOWN
    );
    let go = c.go("", &[INFO_BLOCK_SIZE]).unwrap().expect("GO");
    assert_eq!(
        (go.size, go.flags, go.block_size),
        (info.size, info.flags, info.block_size)
    );
    assert_in_sync(&mut c);
    assert_healthy(&mut server);
}

#[test]
fn write_zeroes_with_fast_zero_never_crashes() {
    let mut server = seeded_server(&[]);
    let (mut c, info) = RawClient::ready(server.socket(), "").unwrap();
    let offset = 8 << 20;
    c.write(0, offset, &[0x11; 65536]).unwrap().expect("write");
    let result = c
        .simple(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, offset, 65536)
        .unwrap();
    if info.flags & FLAG_SEND_FAST_ZERO == 0 {
        assert_eq!(
            result,
            Err(EINVAL),
            "FAST_ZERO not advertised: expect EINVAL"
        );
    } else if let Err(err) = result {
        assert_eq!(err, ENOTSUP, "FAST_ZERO may only fail with ENOTSUP");
    }
    if result.is_ok() {
        assert!(
            c.read(offset, 65536)
                .unwrap()
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
    }
    // Every flag combination on WRITE_ZEROES, including ones that make no sense.
    for flags in [
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
        0xffff,
    ] {
        let _ = c.simple(flags, CMD_WRITE_ZEROES, offset, 65536).unwrap();
        assert_in_sync(&mut c);
    }
    c.disconnect().unwrap();
    assert_healthy(&mut server);
    // Read-only: refused, still no crash.
    let mut ro = ServerSpec::new("memory:1M")
        .options(&["--read-only"])
        .start();
    let (mut c, info) = RawClient::ready(ro.socket(), "").unwrap();
    assert!(info.flags & FLAG_READ_ONLY != 0);
    assert!(
        c.simple(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 4096)
            .unwrap()
            .is_err()
    );
    assert!(c.read(0, 4096).unwrap().is_ok());
    ro.assert_running();
}

#[test]
fn rapid_connections_do_not_leak_fds() {
    let mut server = seeded_server(&[]);
    let baseline = server.fd_count();
    let started = Instant::now();
    for i in 0..200u32 {
        match i % 5 {
            0 => {
                let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
                assert_in_sync(&mut c);
                c.disconnect().unwrap();
            }
            1 => drop(RawClient::connect(server.socket()).unwrap()),
            2 => {
                let mut c = RawClient::handshake(server.socket()).unwrap();
                assert_eq!(c.option(OPT_ABORT, &[]).unwrap().reply_type, REP_ACK);
            }
            3 => {
                let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
                for k in 0..8 {
                    let msg = c.request_bytes(0, CMD_READ, k, k * 4096, 4096);
                    c.write_all(&msg).unwrap();
                }
                drop(c); // replies pending
            }
            _ => {
                let mut c = RawClient::handshake(server.socket()).unwrap();
                c.send_option(OPT_GO, &info_payload("nope", &[])).unwrap();
                drop(c);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "200 connections took > 60 s"
        );
    }
    wait_for_fds(&server, baseline);
    assert_healthy(&mut server);
}

#[test]
fn stalled_clients_do_not_block_others() {
    // One shard: every connection shares a single thread and ring.
    let mut server = seeded_server(&["--shards", "1"]);
    // A: half a request header, then silence.
    let (mut a, _) = RawClient::ready(server.socket(), "").unwrap();
    let msg = a.request_bytes(0, CMD_WRITE, 1, 0, 4096);
    a.write_all(&msg[..14]).unwrap();
    // B: a WRITE header and half its payload, then silence.
    let (mut b, _) = RawClient::ready(server.socket(), "").unwrap();
    let mut msg = b.request_bytes(0, CMD_WRITE, 1, 4 << 20, 65536);
    msg.extend_from_slice(&[9; 30000]);
    b.write_all(&msg).unwrap();
    // C: floods READs and never reads a reply: the server's socket buffer fills up.
    let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
    flood_reads_then_close_later(&mut c, 2000);
    // D: a normal client on the same shard must still get prompt service.
    let started = Instant::now();
    let (mut d, _) = RawClient::ready(server.socket(), "").unwrap();
    for i in 0..200u64 {
        let offset = (16 << 20) + i * 4096;
        let data = pattern(offset, 4096, i);
        d.write(0, offset, &data)
            .unwrap()
            .expect("write while others stall");
        assert_eq!(
            d.read(offset, 4096)
                .unwrap()
                .expect("read while others stall"),
            data
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "service degraded by stalled clients"
    );
    d.disconnect().unwrap();
    drop((a, b, c));
    assert_healthy(&mut server);
}

fn flood_reads_then_close_later(client: &mut RawClient, count: u64) {
    let mut burst = Vec::new();
    for i in 0..count {
        burst.extend_from_slice(&client.request_bytes(
            0,
            CMD_READ,
            i,
            (i * 65536) % EXPORT_BYTES,
            65536,
        ));
    }
    // Write in pieces; stop when the server applies backpressure (write timeout).
    let RawClient { stream, .. } = client;
    if let Stream::Unix(s) = stream {
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    }
    for piece in burst.chunks(4096) {
        if stream.write_all(piece).is_err() {
            break;
        }
    }
}

#[test]
fn pipelined_requests_all_complete_with_correct_data() {
    let mut server = seeded_server(&[]);
    let (mut c, _) = RawClient::ready(server.socket(), "").unwrap();
    let mut pending = HashMap::new();
    let mut burst = Vec::new();
    for i in 0..256u64 {
        let offset = (i * 4096) % SEED_BYTES;
        let cookie = c.cookie();
        burst.extend_from_slice(&c.request_bytes(0, CMD_READ, cookie, offset, 4096));
        pending.insert(cookie, (true, offset, 4096, Outcome::default()));
    }
    c.write_all(&burst).unwrap();
    let mut done = 0;
    while !pending.is_empty() {
        let snapshot: HashMap<u64, u64> = pending.iter().map(|(k, v)| (*k, v.1)).collect();
        if let Some((cookie, outcome)) = c.pump(&mut pending).unwrap() {
            let offset = snapshot[&cookie];
            assert_eq!(outcome.error, None);
            assert!(
                outcome.data == pattern(offset, 4096, SEED),
                "wrong data for {offset}"
            );
            done += 1;
        }
    }
    assert_eq!(done, 256);
    c.disconnect().unwrap();
    assert_healthy(&mut server);
}

/// Bytes the server sends before closing after NBD_OPT_ABORT: exactly one ACK (or nothing).
#[test]
fn abort_is_acknowledged_and_closed() {
    let mut server = seeded_server(&[]);
    let mut c = RawClient::handshake(server.socket()).unwrap();
    c.send_option(OPT_ABORT, &[]).unwrap();
    let mut rest = Vec::new();
    let _ = c.stream.read_to_end(&mut rest);
    if !rest.is_empty() {
        assert_eq!(
            rest.len(),
            20,
            "ABORT reply must be a bare ACK: {rest:02x?}"
        );
        assert_eq!(&rest[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&rest[12..16], &REP_ACK.to_be_bytes());
    }
    assert_healthy(&mut server);
}
