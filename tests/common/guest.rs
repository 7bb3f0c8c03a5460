//! A throwaway Linux guest in qemu, for clients the host kernel lacks (the kernel NBD client,
//! `nbd.ko`) and, later, for running ringbd under a guest kernel (kernel TLS, `tls.ko`).
//!
//! The guest is Debian's amd64 kernel (unpacked by `scripts/guest-kernel` into
//! `target/guest-cache/kernel`) booted directly (`-kernel`; the uncompressed `vmlinux` through
//! its PVH entry, so TCG need not emulate the xz decompressor) with a small initramfs built per
//! run in a temporary directory: static busybox, the requested kernel modules with their
//! `modules.dep` dependencies, host binaries with their shared libraries (`ldd` closure, same
//! paths as on the host), extra files, and `/init`. The init script mounts the pseudo filesystems, loads
//! the modules, configures `eth0` (10.0.2.15/24, qemu user networking) and runs the test's
//! script, which reports through [`RESULT_MARKER`] lines on the serial console and powers off.
//!
//! ```ignore
//! let out = Guest::builder()
//!     .module("nbd")
//!     .binary("/usr/sbin/nbd-client")
//!     .guestfwd_unix(10809, server.socket())
//!     .init_script("nbd-client 10.0.2.100 10809 /dev/nbd0 -N vm1 || guest_fail connect\n\
//!                   guest_ok connected")
//!     .run(Duration::from_secs(120));
//! out.expect_ok();
//! ```
//!
//! A server in the guest, reached from the host: `.module("tls").binary(ringbd_bin())
//! .hostfwd(port, 10809).init_script("ringbd serve ... &\necho READY\nwait ...").start(t)`,
//! then [`RunningGuest::wait_for_serial`]`("READY")`, connect to `127.0.0.1:port`, and
//! [`RunningGuest::wait`].
//!
//! # Script contract
//!
//! The test's script runs under busybox `sh` (every busybox applet is installed, `set -u`).
//! It must end by calling `guest_ok DETAILS` or `guest_fail WHY`: each prints exactly one line
//! `RINGBD-GUEST-RESULT ok DETAILS` / `RINGBD-GUEST-RESULT fail WHY` and powers the guest off.
//! `check CMD...` runs a command and calls `guest_fail` (with the command) if it fails. A
//! script that ends without a result gets a `fail` line from the init. The init also prints
//! `RINGBD-GUEST-BOOTED` when it starts; [`GuestOutput::booted_after`] is the host wall time
//! from spawning qemu to that line (the boot time).
//!
//! # Process contract
//!
//! qemu runs with `-no-reboot`, `PR_SET_PDEATHSIG = SIGKILL`, and a deadline: when the
//! deadline passes, [`RunningGuest`] kills exactly its qemu (by PID) and the output says
//! `timed_out`. Dropping a [`RunningGuest`] also kills it. Networking is qemu user mode with
//! `restrict=on`: the guest reaches nothing but the explicit `guestfwd`/`hostfwd` rules, and
//! the host side of those is a unix socket (through `socat`) or `127.0.0.1`.
//!
//! # Acceleration
//!
//! KVM is used only if `/dev/kvm` opens and a probe boot under KVM prints the kernel banner
//! within [`KVM_PROBE_TIMEOUT`] (nested or paravirtual KVM often cannot run a stock kernel);
//! otherwise TCG. `RINGBD_GUEST_ACCEL=kvm|tcg` skips the probe.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{repo_root, require, run, send_signal, tempdir, which};

/// Prefix of the result line the guest prints on its serial console.
pub const RESULT_MARKER: &str = "RINGBD-GUEST-RESULT";
/// Prefix of the line the init prints as soon as it runs.
pub const BOOTED_MARKER: &str = "RINGBD-GUEST-BOOTED";
/// The guest's address on qemu's user network.
pub const GUEST_ADDRESS: &str = "10.0.2.15";
/// The address `guestfwd_unix` forwards from (inside the user network, not the gateway).
pub const FORWARD_ADDRESS: &str = "10.0.2.100";
/// How long the KVM probe may take to show the kernel banner.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `scripts/guest-kernel` may take when the cache is missing.
pub const KERNEL_FETCH_TIMEOUT: Duration = Duration::from_secs(600);

const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";

/// The unpacked guest kernel of `scripts/guest-kernel`.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `.../guest-cache/kernel`.
    pub dir: PathBuf,
    /// The release string, e.g. `6.1.0-56-amd64`.
    pub version: String,
}

impl Kernel {
    /// The cache directory: `RINGBD_GUEST_CACHE`, else `target/guest-cache` in the repository.
    pub fn cache_dir() -> PathBuf {
        match std::env::var_os("RINGBD_GUEST_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => repo_root().join("target/guest-cache"),
        }
    }

    /// The cached kernel, if `scripts/guest-kernel` has unpacked one.
    pub fn locate() -> Option<Kernel> {
        let dir = Self::cache_dir().join("kernel");
        let version = fs::read_to_string(dir.join("version")).ok()?;
        let kernel = Kernel {
            version: version.trim().to_string(),
            dir,
        };
        let complete =
            kernel.vmlinuz().is_file() && kernel.modules_dir().join("modules.dep").is_file();
        complete.then_some(kernel)
    }

    /// The cached kernel, running `scripts/guest-kernel` (apt download) first if it is missing.
    pub fn fetch() -> Result<Kernel, String> {
        if let Some(kernel) = Self::locate() {
            return Ok(kernel);
        }
        let script = repo_root().join("scripts/guest-kernel");
        let out = super::try_run(
            Command::new(&script).arg(Self::cache_dir()),
            None,
            KERNEL_FETCH_TIMEOUT,
        )?;
        if !out.status.success() {
            return Err(format!("scripts/guest-kernel failed: {out}"));
        }
        Self::locate().ok_or_else(|| format!("scripts/guest-kernel left no kernel: {out}"))
    }

    /// `vmlinuz`.
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// What qemu boots: the uncompressed `vmlinux` (PVH entry, no decompressor to emulate)
    /// when `scripts/guest-kernel` produced it, else `vmlinuz`.
    pub fn image(&self) -> PathBuf {
        let vmlinux = self.dir.join("vmlinux");
        if vmlinux.is_file() {
            vmlinux
        } else {
            self.vmlinuz()
        }
    }

    /// `lib/modules/VERSION`.
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.version)
    }
}

/// Requires what a guest needs: qemu, cpio, static busybox, the cached kernel (fetched with
/// `scripts/guest-kernel` if missing) and each of `binaries`. Gated like every tool.
pub fn require_guest(binaries: &[&str]) -> bool {
    let tools_ok = super::require_tools(&[QEMU, "cpio", "ldd", "socat"])
        && require(
            is_static(Path::new(BUSYBOX)),
            "/bin/busybox is missing or not static (install busybox-static)",
        );
    if !tools_ok {
        return false;
    }
    let binaries_ok = binaries
        .iter()
        .all(|binary| require(Path::new(binary).is_file(), &format!("{binary} is missing")));
    if !binaries_ok {
        return false;
    }
    match Kernel::fetch() {
        Ok(_) => true,
        Err(why) => require(
            false,
            &format!("no guest kernel (scripts/guest-kernel): {why}"),
        ),
    }
}

fn is_static(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    // ldd says "not a dynamic executable" (and exits 1) for a static binary.
    Command::new("ldd").arg(path).output().is_ok_and(|out| {
        let text = [out.stdout, out.stderr].concat();
        String::from_utf8_lossy(&text).contains("not a dynamic executable")
    })
}

/// Entry point: `Guest::builder()`.
#[derive(Debug)]
pub struct Guest;

impl Guest {
    /// A builder with the defaults: 512 MiB, 1 vCPU, no modules beyond networking.
    pub fn builder() -> GuestBuilder {
        GuestBuilder {
            modules: Vec::new(),
            binaries: Vec::new(),
            files: Vec::new(),
            data: Vec::new(),
            script: String::new(),
            guestfwds: Vec::new(),
            hostfwds: Vec::new(),
            memory_mib: 512,
            cpus: 1,
            cmdline: Vec::new(),
        }
    }
}

/// What goes into the guest; see the module docs.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    modules: Vec<String>,
    binaries: Vec<PathBuf>,
    files: Vec<(PathBuf, String)>,
    data: Vec<(String, Vec<u8>)>,
    script: String,
    guestfwds: Vec<(String, String)>,
    hostfwds: Vec<(u16, u16)>,
    memory_mib: u32,
    cpus: u32,
    cmdline: Vec<String>,
}

impl GuestBuilder {
    /// Loads kernel module `name` (and its dependencies, from `modules.dep`) at boot, in the
    /// order given.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_string());
        self
    }

    /// Copies a host executable to the same path, with its `ldd` shared-library closure.
    pub fn binary(mut self, host_path: impl Into<PathBuf>) -> Self {
        self.binaries.push(host_path.into());
        self
    }

    /// Copies a host file to `guest_path` (absolute).
    pub fn file(mut self, host_path: impl Into<PathBuf>, guest_path: &str) -> Self {
        self.files.push((host_path.into(), guest_path.to_string()));
        self
    }

    /// Writes `bytes` to `guest_path` (absolute).
    pub fn data(mut self, guest_path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.data.push((guest_path.to_string(), bytes.into()));
        self
    }

    /// The test's script (busybox `sh`), run after the init; see the script contract.
    pub fn init_script(mut self, script: &str) -> Self {
        self.script = script.to_string();
        self
    }

    /// Every TCP connection to `guest_address` (`IP:PORT`) runs `cmd` on the host with the
    /// connection on its stdin/stdout (qemu `guestfwd=tcp:IP:PORT-cmd:CMD`).
    pub fn guestfwd(mut self, guest_address: &str, cmd: &str) -> Self {
        self.guestfwds
            .push((guest_address.to_string(), cmd.to_string()));
        self
    }

    /// Connections to [`FORWARD_ADDRESS`]`:port` reach the host's unix socket `socket`.
    pub fn guestfwd_unix(self, port: u16, socket: &Path) -> Self {
        let cmd = format!("socat - UNIX-CONNECT:{}", socket.display());
        self.guestfwd(&format!("{FORWARD_ADDRESS}:{port}"), &cmd)
    }

    /// Host `127.0.0.1:host_port` forwards to the guest's `guest_port`
    /// (`hostfwd=tcp:127.0.0.1:HOST-:GUEST`).
    pub fn hostfwd(mut self, host_port: u16, guest_port: u16) -> Self {
        self.hostfwds.push((host_port, guest_port));
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Appends a kernel command-line argument.
    pub fn cmdline(mut self, argument: &str) -> Self {
        self.cmdline.push(argument.to_string());
        self
    }

    /// Boots the guest; it is killed (by PID) once `timeout` has passed.
    pub fn start(self, timeout: Duration) -> RunningGuest {
        let started = Instant::now();
        let kernel = Kernel::fetch().unwrap_or_else(|why| panic!("no guest kernel: {why}"));
        let dir = tempdir();
        let initrd = self.build_initramfs(&kernel, dir.path());
        let serial = dir.path().join("serial.log");
        let accel = accel(&kernel);
        let mut cmd = self.qemu_command(&kernel, &initrd, &serial, accel);
        let child = spawn_with_deathsig(&mut cmd);
        RunningGuest {
            pid: child.id(),
            child: Some(child),
            serial,
            deadline: started + timeout,
            started,
            spawned: Instant::now(),
            accel,
            _dir: dir,
        }
    }

    /// Boots the guest and waits until it powers off or `timeout` passes.
    pub fn run(self, timeout: Duration) -> GuestOutput {
        self.start(timeout).wait()
    }

    fn qemu_command(&self, kernel: &Kernel, initrd: &Path, serial: &Path, accel: Accel) -> Command {
        // tsc=reliable: under a loaded TCG host the TSC watchdog would otherwise demote the
        // clocksource to the (much slower to emulate) HPET.
        let mut append = vec!["console=ttyS0", "panic=-1", "rdinit=/init", "tsc=reliable"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        append.extend(self.cmdline.iter().cloned());
        let mut cmd = Command::new(QEMU);
        cmd.args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args([
                "-machine",
                "pc",
                "-accel",
                accel.name(),
                "-cpu",
                accel.cpu(),
            ])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(kernel.image())
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append.join(" ")])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-device", "virtio-rng-pci"])
            .args([
                "-netdev",
                &self.netdev(),
                "-device",
                "virtio-net-pci,netdev=net0",
            ]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(serial.with_extension("qemu.log")).expect("qemu log"));
        cmd
    }

    fn netdev(&self) -> String {
        let mut netdev = String::from("user,id=net0,restrict=on");
        for (address, cmd) in &self.guestfwds {
            assert!(
                !cmd.contains(','),
                "guestfwd commands cannot contain ',': {cmd}"
            );
            netdev.push_str(&format!(",guestfwd=tcp:{address}-cmd:{cmd}"));
        }
        for (host_port, guest_port) in &self.hostfwds {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"));
        }
        netdev
    }

    fn build_initramfs(&self, kernel: &Kernel, dir: &Path) -> PathBuf {
        let root = dir.join("root");
        for sub in [
            "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
        ] {
            fs::create_dir_all(root.join(sub)).expect("initramfs dirs");
        }
        copy_into(&root, Path::new(BUSYBOX), BUSYBOX);
        let mut libraries = BTreeSet::new();
        for binary in &self.binaries {
            copy_into(&root, binary, &binary.to_string_lossy());
            libraries.extend(ldd_closure(binary));
        }
        for library in &libraries {
            copy_into(&root, library, &library.to_string_lossy());
        }
        for (host, guest) in &self.files {
            copy_into(&root, host, guest);
        }
        for (guest, bytes) in &self.data {
            write_into(&root, guest, bytes, 0o644);
        }
        let modules = self.all_modules();
        copy_modules(kernel, &root, &modules);
        write_into(&root, "/init", self.init(&modules).as_bytes(), 0o755);
        let image = dir.join("initramfs.cpio");
        let cpio = format!(
            "find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc > {}",
            image.display()
        );
        run(
            Command::new("sh").arg("-c").arg(cpio).current_dir(&root),
            Duration::from_secs(60),
        )
        .ok();
        image
    }

    /// Networking modules first, then the caller's.
    fn all_modules(&self) -> Vec<String> {
        let mut modules = vec!["virtio_pci", "virtio_net", "virtio_rng"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        modules.extend(self.modules.iter().cloned());
        modules
    }

    fn init(&self, modules: &[String]) -> String {
        format!(
            "{INIT_PRELUDE}\nfor module in {modules}; do\n    \
             modprobe \"$module\" || guest_fail \"modprobe $module failed\"\ndone\n\
             {INIT_NETWORK}\n# ---- test script ----\n{script}\n# ---- end ----\n\
             guest_fail 'the test script ended without guest_ok or guest_fail'\n",
            modules = modules.join(" "),
            script = self.script,
        )
    }
}

const INIT_PRELUDE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs root is already writable memory: /tmp stays a plain directory, so host files
# copied to their own paths under /tmp (a checkout in /tmp) are not hidden by a mount.
mkdir -p /tmp /run /mnt
chmod 1777 /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/mounts /etc/mtab
echo "RINGBD-GUEST-BOOTED"
guest_poweroff() {
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 10
}
guest_ok() {
    echo "RINGBD-GUEST-RESULT ok $*"
    guest_poweroff
}
guest_fail() {
    echo "RINGBD-GUEST-RESULT fail $*"
    guest_poweroff
}
check() {
    "$@" || guest_fail "command failed (status $?): $*"
}
set -u"#;

const INIT_NETWORK: &str = r#"ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi"#;

/// Copies `host` to `guest_path` under `root`, following symlinks, keeping the mode.
fn copy_into(root: &Path, host: &Path, guest_path: &str) {
    let target = guest_target(root, guest_path);
    fs::create_dir_all(target.parent().expect("parent")).expect("create guest dir");
    fs::copy(host, &target).unwrap_or_else(|e| panic!("copy {host:?} into the guest: {e}"));
}

fn write_into(root: &Path, guest_path: &str, bytes: &[u8], mode: u32) {
    let target = guest_target(root, guest_path);
    fs::create_dir_all(target.parent().expect("parent")).expect("create guest dir");
    let mut file = File::create(&target).expect("create guest file");
    file.write_all(bytes).expect("write guest file");
    fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod guest file");
}

fn guest_target(root: &Path, guest_path: &str) -> PathBuf {
    let relative = guest_path.strip_prefix('/').unwrap_or_else(|| {
        panic!("guest paths are absolute: {guest_path}");
    });
    assert!(
        !relative.split('/').any(|c| c == ".."),
        "no '..' in {guest_path}"
    );
    root.join(relative)
}

/// The shared libraries `ldd` lists for `binary` (already transitive), as absolute paths.
fn ldd_closure(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("ldd {binary:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert!(is_static(binary), "ldd {binary:?} failed: {text}");
        return Vec::new();
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        assert!(!line.contains("not found"), "ldd {binary:?}: {line}");
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|path| path.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    libraries
}

/// Copies `modules` and their `modules.dep` dependencies, with a `modules.dep` listing them.
fn copy_modules(kernel: &Kernel, root: &Path, modules: &[String]) {
    let source = kernel.modules_dir();
    let dep = fs::read_to_string(source.join("modules.dep")).expect("read modules.dep");
    let entries: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
        .collect();
    let find = |name: &str| {
        entries
            .iter()
            .find(|(path, _)| module_name(path) == name.replace('-', "_"))
            .unwrap_or_else(|| panic!("kernel {} has no module {name}", kernel.version))
    };
    let mut wanted = BTreeSet::new();
    for name in modules {
        let (path, deps) = find(name);
        wanted.insert(*path);
        wanted.extend(deps.iter().copied());
    }
    let target = format!("/lib/modules/{}", kernel.version);
    let mut listing = String::new();
    for (path, deps) in entries.iter().filter(|(path, _)| wanted.contains(path)) {
        copy_into(root, &source.join(path), &format!("{target}/{path}"));
        listing.push_str(&format!("{path}: {}\n", deps.join(" ")));
    }
    write_into(
        root,
        &format!("{target}/modules.dep"),
        listing.as_bytes(),
        0o644,
    );
}

/// `kernel/drivers/block/nbd.ko` -> `nbd`; dashes become underscores, as the kernel does.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().expect("module file");
    let stem = file.split(".ko").next().expect("module stem");
    stem.replace('-', "_")
}

fn spawn_with_deathsig(cmd: &mut Command) -> Child {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}

/// qemu's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Emulation (always works, slower).
    Tcg,
}

impl Accel {
    /// The `-accel` name.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// KVM if usable (see the module docs), probed once per test process.
fn accel(kernel: &Kernel) -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("RINGBD_GUEST_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ if kvm_boots(kernel) => Accel::Kvm,
        _ => Accel::Tcg,
    })
}

/// Boots the kernel without an initramfs under KVM and waits for its banner.
fn kvm_boots(kernel: &Kernel) -> bool {
    let openable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !openable || which(QEMU).is_none() {
        return false;
    }
    let dir = tempdir();
    let serial = dir.path().join("probe.log");
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-accel",
        "kvm",
    ])
    .args(["-cpu", "host", "-m", "128"])
    .arg("-kernel")
    .arg(kernel.image())
    .args(["-append", "console=ttyS0 panic=-1"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = spawn_with_deathsig(&mut cmd);
    let deadline = Instant::now() + KVM_PROBE_TIMEOUT;
    let mut booted = false;
    while Instant::now() < deadline && !booted {
        booted = fs::read_to_string(&serial).is_ok_and(|s| s.contains("Linux version"));
        if !booted && child.try_wait().expect("try_wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().expect("try_wait").is_none() {
        send_signal(child.id(), libc::SIGKILL);
    }
    let _ = child.wait();
    if !booted {
        eprintln!("guest: /dev/kvm cannot boot a stock kernel here; using TCG");
    }
    booted
}

/// A booted guest; killed (by PID) at its deadline or on drop.
#[derive(Debug)]
pub struct RunningGuest {
    child: Option<Child>,
    pid: u32,
    serial: PathBuf,
    started: Instant,
    spawned: Instant,
    deadline: Instant,
    accel: Accel,
    _dir: tempfile::TempDir,
}

impl RunningGuest {
    /// The serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// qemu's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the serial console contains `needle`; panics (with the console) if the guest
    /// stops or the deadline passes first.
    pub fn wait_for_serial(&mut self, needle: &str) {
        loop {
            let serial = self.serial();
            if serial.contains(needle) {
                return;
            }
            let exited = self.child.as_mut().map(|c| c.try_wait().expect("try_wait"));
            assert!(
                matches!(exited, Some(None)) && Instant::now() < self.deadline,
                "guest stopped or timed out before printing {needle:?}; serial:\n{serial}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until qemu exits (the guest powered off) or the deadline passes (then kills it).
    pub fn wait(mut self) -> GuestOutput {
        let mut child = self.child.take().expect("guest already waited for");
        let mut booted_after = None;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if booted_after.is_none() && self.serial().contains(BOOTED_MARKER) {
                booted_after = Some(self.spawned.elapsed());
            }
            if Instant::now() >= self.deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let timed_out = status.is_none();
        if timed_out {
            send_signal(self.pid, libc::SIGKILL);
            let _ = child.wait();
        }
        let serial = self.serial();
        let qemu_log =
            fs::read_to_string(self.serial.with_extension("qemu.log")).unwrap_or_default();
        GuestOutput {
            result: GuestResult::parse(&serial),
            booted_after,
            serial,
            qemu_log,
            status,
            timed_out,
            accel: self.accel,
            wall: self.started.elapsed(),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                send_signal(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// The last result line of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestResult {
    /// `RINGBD-GUEST-RESULT ok DETAILS`.
    Ok(String),
    /// `RINGBD-GUEST-RESULT fail WHY`.
    Fail(String),
    /// No result line (the guest hung, crashed or never booted).
    Missing,
}

impl GuestResult {
    /// Parses the last result line of a serial log (kernel messages may precede it on the
    /// same line, so the marker is searched anywhere in the line).
    pub fn parse(serial: &str) -> GuestResult {
        let line = serial
            .lines()
            .filter_map(|line| line.find(RESULT_MARKER).map(|at| &line[at..]))
            .next_back();
        let Some(line) = line else {
            return GuestResult::Missing;
        };
        let rest = line[RESULT_MARKER.len()..].trim();
        match rest.split_once(' ').unwrap_or((rest, "")) {
            ("ok", details) => GuestResult::Ok(details.trim().to_string()),
            ("fail", why) => GuestResult::Fail(why.trim().to_string()),
            _ => GuestResult::Fail(format!("unparsable result line: {line}")),
        }
    }
}

/// What a finished guest left behind.
#[derive(Debug)]
pub struct GuestOutput {
    /// The whole serial console (kernel log and the init's output).
    pub serial: String,
    /// qemu's own stderr.
    pub qemu_log: String,
    /// The result line.
    pub result: GuestResult,
    /// Host wall time from spawning qemu to the BOOTED line (polled every 50 ms).
    pub booted_after: Option<Duration>,
    /// qemu's exit status (`None` if it was killed at the deadline).
    pub status: Option<ExitStatus>,
    /// True if the deadline passed and qemu was killed.
    pub timed_out: bool,
    /// The accelerator used.
    pub accel: Accel,
    /// Host wall time from `start` (including building the initramfs) to the end.
    pub wall: Duration,
}

impl GuestOutput {
    /// Returns the `ok` details; panics with the serial console otherwise.
    pub fn expect_ok(&self) -> &str {
        match &self.result {
            GuestResult::Ok(details) if !self.timed_out => details,
            result => panic!(
                "guest did not succeed: {result:?} (timed out: {}, status {:?}, {:?}, \
                 {:.1} s)\n===== serial console =====\n{}\n===== qemu stderr =====\n{}",
                self.timed_out,
                self.status,
                self.accel,
                self.wall.as_secs_f64(),
                self.serial,
                self.qemu_log
            ),
        }
    }

    /// The value of `key=VALUE` in the `ok` details (panics if absent).
    pub fn detail(&self, key: &str) -> String {
        let details = self.expect_ok();
        details
            .split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in the guest result {details:?}"))
            .to_string()
    }
}
