//! Durability: acknowledged-and-flushed writes survive `kill -9`, and SIGTERM drains in-flight
//! requests before a clean exit.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::raw::*;
use common::*;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn crash_after_flush(cache: &str) {
    let dir = tempdir();
    let image = dir.path().join("durable.img");
    sparse_file(&image, 64 * MIB);
    let spec = ServerSpec::new(image.to_str().unwrap()).options(&["--cache", cache]);
    let mut server = spec.start();
    let out = python(
        "durability.py",
        &["write", server.socket().to_str().unwrap(), "42"],
        TIMEOUT,
    );
    assert!(out.contains("flushed"), "{out}");
    server.kill9();
    let server = spec.start();
    python(
        "durability.py",
        &["check", server.socket().to_str().unwrap(), "42"],
        TIMEOUT,
    );
}

#[test]
fn flushed_writes_survive_kill_9_direct() {
    if !require_python_nbd() {
        return;
    }
    crash_after_flush("direct");
}

#[test]
fn flushed_writes_survive_kill_9_writeback() {
    if !require_python_nbd() {
        return;
    }
    crash_after_flush("writeback");
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempdir();
    let image = dir.path().join("drain.img");
    sparse_file(&image, 64 * MIB);
    let mut server = ServerSpec::new(image.to_str().unwrap()).start();
    let (mut client, _) = RawClient::ready(server.socket(), "").unwrap();
    let mut pending = HashMap::new();
    let mut expected = HashMap::new();
    let mut burst = Vec::new();
    for i in 0..64u64 {
        let offset = i * MIB;
        let data = pattern(offset, MIB as usize, 9);
        let cookie = client.cookie();
        burst.extend_from_slice(&client.request_bytes(0, CMD_WRITE, cookie, offset, MIB));
        burst.extend_from_slice(&data);
        pending.insert(cookie, (false, offset, MIB, Outcome::default()));
        expected.insert(cookie, offset);
    }
    // Send everything from a helper thread (the server may apply backpressure), then SIGTERM
    // while replies are still being produced.
    let mut writer = client.stream_clone();
    let sender = std::thread::spawn(move || writer.write_all_ignoring_errors(&burst));
    std::thread::sleep(Duration::from_millis(50));
    common::send_signal(server.pid(), libc::SIGTERM);
    let mut acknowledged = Vec::new();
    while !pending.is_empty() {
        match client.pump(&mut pending) {
            Ok(Some((cookie, outcome))) => match outcome.error {
                None => acknowledged.push(expected[&cookie]),
                Some(err) => assert_eq!(err, ESHUTDOWN, "only ESHUTDOWN is fair during shutdown"),
            },
            Ok(None) => {}
            Err(_) => break, // closed: the remaining requests were never started
        }
    }
    sender.join().unwrap();
    let status = server.wait_exit();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let disk = std::fs::read(&image).unwrap();
    for offset in &acknowledged {
        let at = *offset as usize;
        assert!(
            disk[at..at + MIB as usize] == pattern(*offset, MIB as usize, 9),
            "acknowledged write at {offset} is not in the file"
        );
    }
    eprintln!(
        "{} of 64 writes acknowledged before shutdown",
        acknowledged.len()
    );
}
