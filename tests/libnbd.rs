//! Command semantics through python3-libnbd (`tests/python/*.py`): TRIM, WRITE_ZEROES, FLUSH,
//! FUA, CACHE, block status, error numbers, read-only exports, multi-connection visibility;
//! small I/O on memory exports copied in the shard, without io_uring worker threads.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn socket(server: &Server) -> &str {
    server.socket().to_str().expect("UTF-8 socket path")
}

#[test]
fn commands_on_a_sparse_file_export() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    sparse_file(&image, 64 * MIB);
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    python("commands.py", &[socket(&server), "file"], TIMEOUT);
}

#[test]
fn commands_on_a_writeback_file_export() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("sparse.img");
    sparse_file(&image, 64 * MIB);
    let server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--cache", "writeback"])
        .start();
    python("commands.py", &[socket(&server), "file"], TIMEOUT);
}

/// Names of the server's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("server tasks");
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn small_io_on_a_memory_export_needs_no_io_worker_threads() {
    if !require_python_nbd() {
        return;
    }
    let server = ServerSpec::new("memory:64M").start();
    let out = python("small_io.py", &[socket(&server), "2000"], TIMEOUT);
    assert_eq!(out.trim(), "ok 2000");
    // io_uring's workers linger for seconds after their last request, so one that served
    // any of the 4000 requests is still listed.
    let names = thread_names(server.pid());
    assert!(
        names.iter().any(|name| name.starts_with("ringbd-shard")),
        "{names:?}"
    );
    let workers: Vec<&String> = names.iter().filter(|n| n.starts_with("iou-wrk")).collect();
    assert!(
        workers.is_empty(),
        "4 KiB I/O went to io_uring workers: {workers:?}"
    );
}

#[test]
fn commands_on_a_memory_export() {
    if !require_python_nbd() {
        return;
    }
    let server = ServerSpec::new("memory:64M").start();
    python("commands.py", &[socket(&server), "memory"], TIMEOUT);
}

#[test]
fn errors_out_of_range_and_read_only() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("ro.img");
    pattern_file(&image, 4 * MIB, 3);
    let writable = ServerSpec::new("memory:16M").start();
    let read_only = ServerSpec::new(image.to_str().unwrap())
        .options(&["--read-only"])
        .start();
    python(
        "errors.py",
        &[socket(&writable), socket(&read_only)],
        TIMEOUT,
    );
    // The read-only file is untouched.
    assert!(std::fs::read(&image).unwrap() == pattern(0, (4 * MIB) as usize, 3));
}

#[test]
fn errors_out_of_range_on_a_file_export() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("range.img");
    sparse_file(&image, 16 * MIB);
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    python("errors.py", &[socket(&server)], TIMEOUT);
}

#[test]
fn multi_connection_flush_visibility() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("multi.img");
    sparse_file(&image, 64 * MIB);
    // Several shards so the connections land on different threads and rings.
    let server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--shards", "2"])
        .start();
    python("multiconn.py", &[socket(&server)], TIMEOUT);
    drop(server);
    let server = ServerSpec::new("memory:64M")
        .options(&["--shards", "2"])
        .start();
    python("multiconn.py", &[socket(&server)], TIMEOUT);
}
