//! Data integrity under real load: nbdcopy, fio with verification, and concurrent libnbd AIO.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const COPY_BYTES: u64 = 256 * MIB;
const TIMEOUT: Duration = Duration::from_secs(300);

/// Copies a random 256 MiB file into the export and back out; both copies must match.
fn nbdcopy_roundtrip(server: &Server, dir: &std::path::Path) -> String {
    let source = dir.join("source.raw");
    random_file(&source, COPY_BYTES);
    let want = sha256_file(&source);
    let uri = server.uri("");
    run(
        Command::new("nbdcopy")
            .args(["--flush"])
            .arg(&source)
            .arg(&uri),
        TIMEOUT,
    )
    .ok();
    let back = dir.join("back.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&back), TIMEOUT).ok();
    assert_eq!(fs::metadata(&back).unwrap().len(), COPY_BYTES);
    assert_eq!(
        sha256_file(&back),
        want,
        "nbdcopy out of the export differs from what went in"
    );
    fs::remove_file(&back).unwrap();
    fs::remove_file(&source).unwrap();
    want
}

#[test]
fn nbdcopy_256mib_through_a_file_export() {
    if !require_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("export.img");
    sparse_file(&image, COPY_BYTES);
    let mut server = ServerSpec::new(image.to_str().unwrap()).start();
    let want = nbdcopy_roundtrip(&server, dir.path());
    assert!(
        server.terminate().success(),
        "server did not exit cleanly on SIGTERM"
    );
    assert_eq!(
        sha256_file(&image),
        want,
        "the export file differs from the source"
    );
}

#[test]
fn nbdcopy_256mib_through_a_memory_export() {
    if !require_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let dir = tempdir();
    let server = ServerSpec::new("memory:256M").start();
    nbdcopy_roundtrip(&server, dir.path());
}

fn fio_job_file(uri: &str, verify_only: bool) -> String {
    let mut job = format!(
        "[global]\n\
         ioengine=nbd\n\
         uri={uri}\n\
         rw=randwrite\n\
         bsrange=4k-64k\n\
         iodepth=64\n\
         size=48m\n\
         verify=crc32c\n\
         verify_fatal=1\n\
         do_verify=1\n\
         randrepeat=1\n\
         runtime=120\n\
         [conn0]\n\
         offset=0\n\
         [conn1]\n\
         offset=64m\n"
    );
    if verify_only {
        job = job.replace("[conn0]", "verify_only=1\n[conn0]");
    }
    job
}

#[test]
fn fio_randwrite_with_crc32c_verify_on_two_connections() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("fio.img");
    sparse_file(&image, 128 * MIB);
    let mut server = ServerSpec::new(image.to_str().unwrap()).start();
    let uri = server.uri("");
    for (name, verify_only) in [("write.fio", false), ("verify.fio", true)] {
        let job = dir.path().join(name);
        fs::write(&job, fio_job_file(&uri, verify_only)).unwrap();
        // fio leaves verify state files in its working directory: keep them in the tempdir.
        let out = run(
            Command::new("fio").arg(&job).current_dir(dir.path()),
            TIMEOUT,
        );
        assert!(out.status.success(), "fio {name}: {out}");
        assert!(
            !out.stdout.contains("verify: bad"),
            "fio {name} reported bad data: {out}"
        );
        assert!(
            out.stdout.contains("err= 0"),
            "fio {name} reported an error: {out}"
        );
    }
    server.assert_running();
}

#[test]
fn libnbd_hundreds_of_concurrent_aio_requests_out_of_order() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("aio.img");
    let region = 64 * MIB;
    let seed = 0x1234_5678_9abc_def1_u64;
    pattern_file(&image, region, seed);
    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--cache", "direct"])
        .start();
    let out = python(
        "concurrent_io.py",
        &[
            server.socket().to_str().unwrap(),
            &region.to_string(),
            &seed.to_string(),
        ],
        TIMEOUT,
    );
    eprintln!("{out}");
}
