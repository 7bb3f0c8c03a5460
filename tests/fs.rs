//! A real filesystem on ringbd: nbdfuse exposes the export as a file, a loop device turns it
//! into a block device, ext4 goes on top. Needs root, /dev/fuse and loop devices.
//!
//! Cycle 1: mkfs.ext4, write files, record their SHA-256, umount, `e2fsck -fn` must be clean.
//! Cycle 2: tear everything down, restart the server on the same image file, mount again
//! through a fresh nbdfuse and loop device, `e2fsck -fn` again, verify every checksum. The
//! second cycle proves the data went through the server, not just into the loop page cache.
//!
//! Also: a block device (a loop device) as the export PATH.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fsstack::{Stack, fsck_clean, require_fs_stack, verify_checksums};
use common::*;

const MIB: u64 = 1 << 20;
const IMAGE_BYTES: u64 = 256 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Writes a small tree of random files and returns a `sha256sum` manifest (relative paths).
fn populate(root: &Path) -> String {
    let sizes = [0, 1, 511, 4096, 65537, MIB, 3 * MIB + 17, 8 * MIB, 20 * MIB];
    let mut names = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let dir = root.join(format!("d{}", i % 3));
        fs::create_dir_all(&dir).unwrap();
        let name = format!("d{}/f{i}.bin", i % 3);
        random_file(&root.join(&name), *size);
        names.push(name);
    }
    run(Command::new("sync").arg("-f").arg(root), TIMEOUT).ok();
    run(
        Command::new("sha256sum").args(&names).current_dir(root),
        TIMEOUT,
    )
    .ok()
}

#[test]
fn ext4_on_nbdfuse_loop_device_survives_remount_and_restart() {
    if !require_fs_stack() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("ext4.img");
    sparse_file(&image, IMAGE_BYTES);
    let spec = ServerSpec::new(image.to_str().unwrap());
    let mut server = spec.start();

    let manifest = {
        let mut stack = Stack::default();
        let file = stack.nbdfuse(&dir.path().join("fuse1"), server.socket(), IMAGE_BYTES);
        let device = stack.losetup(&file);
        run(
            Command::new("mkfs.ext4").args(["-q", "-F", &device]),
            TIMEOUT,
        )
        .ok();
        let mnt = dir.path().join("mnt");
        stack.mount(&device, &mnt);
        let manifest = populate(&mnt);
        stack.umount();
        fsck_clean(&device);
        stack.mount(&device, &mnt);
        verify_checksums(&mnt, &manifest, "remount");
        stack.teardown().expect("clean teardown");
        manifest
    };

    // Restart the server on the same file; everything must still be there.
    assert!(
        server.terminate().success(),
        "server exit status after SIGTERM"
    );
    let server = spec.start();
    let mut stack = Stack::default();
    let file = stack.nbdfuse(&dir.path().join("fuse2"), server.socket(), IMAGE_BYTES);
    let device = stack.losetup(&file);
    fsck_clean(&device);
    let mnt = dir.path().join("mnt");
    stack.mount(&device, &mnt);
    verify_checksums(&mnt, &manifest, "remount");
    stack.teardown().expect("clean teardown");
}

#[test]
fn block_device_export_roundtrip() {
    if !(require_root() && require_loop() && require_tools(&["losetup", "nbdcopy", "nbdinfo"])) {
        return;
    }
    let dir = tempdir();
    let backing = dir.path().join("backing.img");
    sparse_file(&backing, 64 * MIB);
    let mut stack = Stack::default();
    let device = stack.losetup(&backing);
    let mut server = ServerSpec::new(device.clone()).start();
    let info = run(
        Command::new("nbdinfo").args(["--size", &server.uri("")]),
        TIMEOUT,
    )
    .ok();
    assert_eq!(
        info.trim(),
        (64 * MIB).to_string(),
        "block device export size"
    );
    let source = dir.path().join("source.raw");
    random_file(&source, 64 * MIB);
    run(
        Command::new("nbdcopy")
            .args(["--flush"])
            .arg(&source)
            .arg(server.uri("")),
        TIMEOUT,
    )
    .ok();
    let back = dir.path().join("back.raw");
    run(
        Command::new("nbdcopy").arg(server.uri("")).arg(&back),
        TIMEOUT,
    )
    .ok();
    let want = sha256_file(&source);
    assert_eq!(
        sha256_file(&back),
        want,
        "data read back from the block device export"
    );
    assert!(server.terminate().success());
    stack.teardown().expect("detach loop device");
    assert_eq!(
        sha256_file(&backing),
        want,
        "the loop device's backing file"
    );
}
