//! A stack of nbdfuse, a loop device and mounts, for filesystems on a ringbd export (the
//! kernel here has no `nbd` module). Everything is undone in reverse order on drop, even
//! after a panic; processes are stopped by PID.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RunOutput, run, send_signal, try_run, wait_timeout};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Everything mounted or attached, undone in reverse order on drop (even after a panic).
#[derive(Default)]
pub struct Stack {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse_mounts: Vec<PathBuf>,
    nbdfuse: Vec<Child>,
}

impl Stack {
    /// Exposes the export on `socket` as `mountpoint/nbd` (waits until it has `bytes`).
    pub fn nbdfuse(&mut self, mountpoint: &Path, socket: &Path, bytes: u64) -> PathBuf {
        fs::create_dir_all(mountpoint).unwrap();
        let child = Command::new("nbdfuse")
            .arg(mountpoint.join("nbd"))
            .arg("--unix")
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse.push(child);
        self.fuse_mounts.push(mountpoint.to_path_buf());
        let file = mountpoint.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == bytes {
                return file;
            }
            let child = self.nbdfuse.last_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nbdfuse exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {file:?} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Attaches `file` to a free loop device.
    pub fn losetup(&mut self, file: &Path) -> String {
        self.losetup_with(file, &[])
    }

    /// Like [`Stack::losetup`], with extra losetup options (e.g. `--direct-io=on`).
    pub fn losetup_with(&mut self, file: &Path, options: &[&str]) -> String {
        let out = run(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(options)
                .arg(file),
            TIMEOUT,
        )
        .ok();
        let device = out.trim().to_string();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        self.loops.push(device.clone());
        device
    }

    /// Mounts `device` on `mountpoint`.
    pub fn mount(&mut self, device: &str, mountpoint: &Path) {
        fs::create_dir_all(mountpoint).unwrap();
        run(Command::new("mount").arg(device).arg(mountpoint), TIMEOUT).ok();
        self.mounts.push(mountpoint.to_path_buf());
    }

    /// Unmounts the last mount.
    pub fn umount(&mut self) {
        let mountpoint = self.mounts.pop().expect("something mounted");
        run(Command::new("umount").arg(&mountpoint), TIMEOUT).ok();
    }

    /// Detaches everything (reverse order), returning the first failure.
    pub fn teardown(&mut self) -> Result<(), String> {
        let mut first_error = Ok(());
        let mut note = |result: Result<RunOutput, String>| match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                first_error = first_error.clone().and(Err(out.to_string()));
            }
            Err(e) => first_error = first_error.clone().and(Err(e)),
        };
        let t = Duration::from_secs(30);
        while let Some(m) = self.mounts.pop() {
            note(try_run(Command::new("umount").arg(&m), None, t));
        }
        while let Some(device) = self.loops.pop() {
            note(try_run(
                Command::new("losetup").args(["-d", &device]),
                None,
                t,
            ));
        }
        while let Some(m) = self.fuse_mounts.pop() {
            note(try_run(
                Command::new("fusermount3").arg("-u").arg(&m),
                None,
                t,
            ));
        }
        while let Some(mut child) = self.nbdfuse.pop() {
            // nbdfuse exits by itself once unmounted; give it a moment, then insist (by PID).
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                send_signal(child.id(), libc::SIGTERM);
                if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        first_error
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("cleanup problem: {e}");
            // Lazy unmounts as a last resort so the machine is not left with stale mounts.
            for m in self.mounts.drain(..) {
                let _ = try_run(Command::new("umount").arg("-l").arg(&m), None, TIMEOUT);
            }
        }
    }
}

/// `e2fsck -fn` must report a clean filesystem.
pub fn fsck_clean(device: &str) {
    let out = run(Command::new("e2fsck").args(["-f", "-n", device]), TIMEOUT);
    assert!(out.status.success(), "e2fsck -fn is not clean: {out}");
}

/// Every file of a `sha256sum` manifest (paths relative to `root`) must still match; `after`
/// says what they had to survive, for the failure message.
pub fn verify_checksums(root: &Path, manifest: &str, after: &str) {
    let out = super::run_with_stdin(
        Command::new("sha256sum")
            .args(["--check", "--strict", "-"])
            .current_dir(root),
        Some(manifest.as_bytes()),
        TIMEOUT,
    );
    assert!(out.status.success(), "files did not survive {after}: {out}");
}

/// Gates a filesystem test on root, /dev/fuse, loop devices and the tools the stack runs
/// (a failure under `RINGBD_STRICT_TESTS=1`, a printed skip otherwise).
pub fn require_fs_stack() -> bool {
    let tools = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
    ];
    super::require_root()
        && super::require_fuse()
        && super::require_loop()
        && super::require_tools(&tools)
}
