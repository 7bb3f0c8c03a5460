//! End-to-end crash test: journalled ext4 on a ringbd export with power-loss simulation
//! (through nbdfuse and a loop device), a workload that writes and fsyncs files and also
//! leaves unflushed writes behind, a power cut, then recovery: mount (journal replay),
//! every file fsynced before any cut must be intact, and `e2fsck -fn` must be clean.
//!
//! One `drop` cut and several `torn` cuts with different seeds run on the same filesystem,
//! so later cycles also check the files of earlier ones. `RINGBD_CRASH_SEEDS=N` runs more
//! torn seeds (default 4). Needs root, /dev/fuse and loop devices (see docs/FAULTS.md).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fsstack::{Stack, fsck_clean, require_fs_stack, verify_checksums};
use common::*;

const IMAGE_BYTES: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
/// Loop device direct I/O: its writes reach ringbd at once instead of waiting in the FUSE
/// file's page cache, so a cut really finds unflushed writes on the server.
const DIRECT: &[&str] = &["--direct-io=on"];

fn control(socket: &Path, command: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    writeln!(stream, "{command}").unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    assert!(reply.starts_with("ok"), "control {command:?}: {reply}");
    reply
}

/// Writes `count` files of assorted sizes and fsyncs each and its directory; returns their
/// `sha256sum` manifest (paths relative to `root`).
fn durable_files(root: &Path, cycle: usize, count: usize) -> String {
    let dir = format!("cycle{cycle}");
    fs::create_dir_all(root.join(&dir)).unwrap();
    let mut names = Vec::new();
    for index in 0..count {
        let name = format!("{dir}/durable{index}.bin");
        random_file(
            &root.join(&name),
            [0, 1, 4095, 65_537, 1 << 20][index % 5] + index as u64,
        );
        run(Command::new("sync").arg(root.join(&name)), TIMEOUT).ok();
        names.push(name);
    }
    run(Command::new("sync").arg(root.join(&dir)), TIMEOUT).ok();
    run(
        Command::new("sha256sum").args(&names).current_dir(root),
        TIMEOUT,
    )
    .ok()
}

/// Leaves writes the disk has not been asked to flush: O_DIRECT data that reached the
/// server (its metadata only in the running journal transaction), and a buffered file still
/// in the page cache. Nothing here fsyncs.
fn unflushed_files(root: &Path, cycle: usize) {
    for (name, flag) in [
        ("volatile-direct.bin", "oflag=direct"),
        ("volatile-buffered.bin", ""),
    ] {
        let path = root.join(format!("cycle{cycle}/{name}"));
        let mut dd = Command::new("dd");
        dd.args(["if=/dev/urandom", "bs=64k", "count=64", "status=none"])
            .arg(format!("of={}", path.display()));
        if !flag.is_empty() {
            dd.arg(flag);
        }
        run(&mut dd, TIMEOUT).ok();
    }
}

#[test]
fn ext4_survives_power_cuts_with_every_fsynced_file_intact() {
    if !require_fs_stack() {
        return;
    }
    let torn_seeds: u64 = std::env::var("RINGBD_CRASH_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    let dir = tempdir();
    let image = dir.path().join("crash.img");
    sparse_file(&image, IMAGE_BYTES);
    let control_socket = dir.path().join("control.sock");
    let server = ServerSpec::new(image.to_str().unwrap())
        .options(&[
            "--power-loss",
            "torn",
            "--control",
            control_socket.to_str().unwrap(),
        ])
        .start();
    let mnt = dir.path().join("mnt");
    let mut manifests = String::new();
    let cuts: Vec<String> = std::iter::once("cut - drop".to_string())
        .chain((1..=torn_seeds).map(|seed| format!("cut - torn seed={seed}")))
        .collect();
    for (cycle, cut) in cuts.iter().enumerate() {
        let mut stack = Stack::default();
        let fuse = dir.path().join(format!("fuse{cycle}"));
        let file = stack.nbdfuse(&fuse, server.socket(), IMAGE_BYTES);
        let device = stack.losetup_with(&file, DIRECT);
        if cycle == 0 {
            run(
                Command::new("mkfs.ext4").args(["-q", "-F", "-O", "has_journal", &device]),
                TIMEOUT,
            )
            .ok();
        }
        stack.mount(&device, &mnt);
        manifests += &durable_files(&mnt, cycle, 6);
        unflushed_files(&mnt, cycle);
        let reply = control(&control_socket, cut);
        eprintln!("cycle {cycle}: {cut}: {}", reply.trim());
        let sectors: u64 = reply
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .filter(|(key, _)| key.ends_with("_sectors"))
            .map(|(_, value)| value.parse::<u64>().unwrap())
            .sum();
        assert!(
            sectors > 0,
            "the cut found no unflushed writes, so it tested nothing: {reply}"
        );
        // The disk is gone for the old connection: unmounting fails I/O, which is expected.
        drop(stack);
        let mut stack = Stack::default();
        let fuse = dir.path().join(format!("fuse{cycle}-after"));
        let file = stack.nbdfuse(&fuse, server.socket(), IMAGE_BYTES);
        let device = stack.losetup_with(&file, DIRECT);
        stack.mount(&device, &mnt);
        verify_checksums(&mnt, &manifests, "the power cut");
        stack.umount();
        fsck_clean(&device);
        stack.teardown().expect("clean teardown after recovery");
    }
    let log = server.log();
    assert!(log.contains("power cut simulated"), "{log}");
}
