//! Command semantics through python3-libnbd (`tests/python/*.py`): TRIM, WRITE_ZEROES, FLUSH,
//! FUA, CACHE, block status, error numbers, read-only exports, multi-connection visibility.

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
