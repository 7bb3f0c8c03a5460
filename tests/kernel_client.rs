//! The Linux kernel NBD client (`nbd.ko` driven by Debian's `nbd-client`), the client
//! hypervisor hosts use, against ringbd. The host kernel here has no nbd module, so the
//! client runs in a qemu guest (tests/common/guest.rs) booting Debian's kernel; the guest
//! reaches ringbd's unix socket through a qemu `guestfwd` to `socat`.
//!
//! Each test checks twice: inside the guest (sizes, read-back, `e2fsck`), and on the host,
//! where the export's backing file must hold exactly what the guest wrote. The host check is
//! independent of the guest: it reads the file ringbd wrote, not anything the guest reports.
//!
//! Needs `scripts/install-deps` (qemu-system-x86, busybox-static, nbd-client, cpio and the
//! guest kernel of `scripts/guest-kernel`); fails under `RINGBD_STRICT_TESTS=1` without them.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::guest::{Guest, GuestOutput, GuestResult, require_guest};
use common::*;

const MIB: u64 = 1 << 20;
/// A bound on one guest run (boot, test, power-off); TCG runs take well under a minute.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);
const HOST_TIMEOUT: Duration = Duration::from_secs(60);
const SEED: u64 = 0x6b65_726e_656c;
const PORT: u16 = 10809;
const NBD_CLIENT: &str = "/usr/sbin/nbd-client";

/// The guest programs these tests use beyond busybox.
fn require_kernel_client() -> bool {
    require_guest(&[
        NBD_CLIENT,
        "/sbin/mkfs.ext4",
        "/sbin/e2fsck",
        "/usr/bin/socat",
    ]) && require_tools(&["e2fsck", "debugfs"])
}

/// Asserts success and prints the accelerator, boot time and wall time.
fn report(name: &str, out: GuestOutput) -> GuestOutput {
    out.expect_ok();
    eprintln!(
        "{name}: guest {:?}, init started {:?} after qemu, {:.1} s wall in all; result: {}",
        out.accel,
        out.booted_after,
        out.wall.as_secs_f64(),
        out.expect_ok()
    );
    out
}

/// Asserts that `path` holds [`pattern`]`(offset, len, SEED)` at `offset`.
fn assert_pattern(path: &Path, offset: u64, len: u64, what: &str) {
    let file = fs::File::open(path).expect("open backing file");
    let mut got = vec![0u8; usize::try_from(len).expect("len fits usize")];
    file.read_exact_at(&mut got, offset)
        .expect("read backing file");
    let want = pattern(offset, got.len(), SEED);
    if let Some(at) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!(
            "{what}: {} differs from the pattern the guest wrote, first at byte {}",
            path.display(),
            offset + at as u64
        );
    }
}

/// Host side of the ext4 check: the image is clean and holds the files the guest wrote.
fn assert_ext4_image(image: &Path, random_sha256: &str, dir: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(image), HOST_TIMEOUT).ok();
    let dumped = dir.join("dumped-pattern.bin");
    let random = dir.join("dumped-random.bin");
    let requests = format!(
        "dump /pattern.bin {}\ndump /random.bin {}\n",
        dumped.display(),
        random.display()
    );
    run_with_stdin(
        Command::new("debugfs").args(["-f", "-"]).arg(image),
        Some(requests.as_bytes()),
        HOST_TIMEOUT,
    )
    .ok();
    assert_eq!(
        fs::read(&dumped).expect("debugfs dumped /pattern.bin"),
        pattern(0, (2 * MIB) as usize, SEED),
        "/pattern.bin in the guest's ext4, read on the host with debugfs"
    );
    assert_eq!(
        sha256_file(&random),
        random_sha256,
        "/random.bin in the guest's ext4, read on the host, vs the guest's sha256sum"
    );
}

/// Guest script: raw block I/O on /dev/nbd0 (TCP, the docs/OPERATIONS.md line)
/// and ext4 on /dev/nbd1 (the README's `-unix` line, default 512-byte blocks).
const BLOCK_AND_EXT4_SCRIPT: &str = r#"
socat UNIX-LISTEN:/run/ringbd.sock,fork TCP:10.0.2.100:10809 &
tries=0
while [ ! -S /run/ringbd.sock ]; do
    tries=$((tries + 1)); [ $tries -lt 100 ] || guest_fail "in-guest socat never listened"
    sleep 0.1
done
nbd-client -V
check nbd-client 10.0.2.100 10809 /dev/nbd0 -N blk -C 4 -b 4096 -t 60
check nbd-client -unix /run/ringbd.sock -N fs /dev/nbd1

size=$(blockdev --getsize64 /dev/nbd0)
[ "$size" = "$BLK_BYTES" ] || guest_fail "nbd0 is $size bytes, expected $BLK_BYTES"
sectors=$(cat /sys/block/nbd0/size)
[ $((sectors * 512)) = "$BLK_BYTES" ] || guest_fail "nbd0 has $sectors sectors"
fs_size=$(blockdev --getsize64 /dev/nbd1)
[ "$fs_size" = "$FS_BYTES" ] || guest_fail "nbd1 is $fs_size bytes, expected $FS_BYTES"
logical=$(cat /sys/block/nbd0/queue/logical_block_size)
fs_logical=$(cat /sys/block/nbd1/queue/logical_block_size)

# Raw: the pattern at 8 MiB and in the last MiB, O_DIRECT, fsync (NBD_CMD_FLUSH).
last=$((BLK_BYTES / 1048576 - 1))
check dd if=/middle.bin of=/dev/nbd0 bs=1M seek=8 oflag=direct conv=fsync status=none
check dd if=/tail.bin of=/dev/nbd0 bs=1M seek=$last oflag=direct conv=fsync status=none
check dd if=/dev/nbd0 of=/tmp/middle.bin bs=1M skip=8 count=2 iflag=direct status=none
check cmp /middle.bin /tmp/middle.bin
echo 3 > /proc/sys/vm/drop_caches
check dd if=/dev/nbd0 of=/tmp/tail.bin bs=1M skip=$last count=2 status=none
check cmp /tail.bin /tmp/tail.bin

# ext4 through the unix-socket connection.
check mkfs.ext4 -q -F /dev/nbd1
check mount -t ext4 /dev/nbd1 /mnt
check cp /pattern.bin /mnt/pattern.bin
check dd if=/dev/urandom of=/mnt/random.bin bs=1M count=3 status=none
check mkdir /mnt/tree
for i in 1 2 3 4 5 6 7 8 9 10; do
    check dd if=/dev/urandom of=/mnt/tree/f$i bs=1k count=$((i * 7)) status=none
done
(cd /mnt && sha256sum pattern.bin random.bin tree/*) > /tmp/sums
random_sha256=$(sha256sum /mnt/random.bin | cut -d' ' -f1)
check sync
check umount /mnt
check e2fsck -fn /dev/nbd1
echo 3 > /proc/sys/vm/drop_caches
check mount -t ext4 -o ro /dev/nbd1 /mnt
(cd /mnt && sha256sum -c /tmp/sums) || guest_fail "checksums differ after remount"
check umount /mnt

check nbd-client -d /dev/nbd0
check nbd-client -d /dev/nbd1
guest_ok "size=$size sectors=$sectors logical_block=$logical fs_logical_block=$fs_logical \
random_sha256=$random_sha256"
"#;

#[test]
fn kernel_client_block_io_and_ext4() {
    if !require_kernel_client() {
        return;
    }
    let dir = tempdir();
    let blk = dir.path().join("blk.img");
    let fs_image = dir.path().join("fs.img");
    let blk_bytes = 72 * MIB;
    let fs_bytes = 128 * MIB;
    sparse_file(&blk, blk_bytes);
    sparse_file(&fs_image, fs_bytes);
    let server = ServerSpec::new(format!("blk={}", blk.display()))
        .export(format!("fs={}", fs_image.display()))
        .start();

    let script = format!("BLK_BYTES={blk_bytes}\nFS_BYTES={fs_bytes}\n{BLOCK_AND_EXT4_SCRIPT}");
    let out = Guest::builder()
        .module("nbd")
        .module("crc32c_generic")
        .module("ext4")
        .binary(NBD_CLIENT)
        .binary("/usr/bin/socat")
        .binary("/sbin/mkfs.ext4")
        .binary("/sbin/e2fsck")
        .file("/etc/mke2fs.conf", "/etc/mke2fs.conf")
        .data("/middle.bin", pattern(8 * MIB, (2 * MIB) as usize, SEED))
        .data("/tail.bin", pattern(blk_bytes - MIB, MIB as usize, SEED))
        .data("/pattern.bin", pattern(0, (2 * MIB) as usize, SEED))
        .guestfwd_unix(PORT, server.socket())
        .init_script(&script)
        .run(GUEST_TIMEOUT);
    let out = report("block io and ext4", out);

    assert_eq!(
        out.detail("size"),
        blk_bytes.to_string(),
        "guest device size"
    );
    assert_eq!(out.detail("logical_block"), "4096", "nbd-client -b 4096");
    assert_eq!(
        out.detail("fs_logical_block"),
        "512",
        "nbd-client's default block size"
    );
    assert_pattern(&blk, 8 * MIB, 2 * MIB, "raw O_DIRECT write at 8 MiB");
    assert_pattern(&blk, blk_bytes - MIB, MIB, "raw write to the last MiB");
    assert_ext4_image(&fs_image, &out.detail("random_sha256"), dir.path());
}

/// Guest script: the README's `-C 4` line (default 512-byte blocks), four concurrent O_DIRECT
/// writers, read back.
const MULTI_CONN_SCRIPT: &str = r#"
check nbd-client 10.0.2.100 10809 -N vm1 /dev/nbd0 -C 4
conns=$(netstat -tn | grep '10.0.2.100:10809' | grep -c ESTABLISHED)
[ "$conns" = 4 ] || guest_fail "expected 4 TCP connections to the server, netstat shows $conns"
logical=$(cat /sys/block/nbd0/queue/logical_block_size)
pids=""
for i in 0 1 2 3; do
    dd if=/part$i.bin of=/dev/nbd0 bs=64k seek=$((i * 16)) oflag=direct conv=fsync status=none &
    pids="$pids $!"
done
for pid in $pids; do
    wait $pid || guest_fail "writer $pid failed"
done
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3; do
    check dd if=/dev/nbd0 of=/tmp/part$i.bin bs=64k skip=$((i * 16)) count=16 iflag=direct status=none
    check cmp /part$i.bin /tmp/part$i.bin
done
check nbd-client -d /dev/nbd0
guest_ok "connections=$conns logical_block=$logical"
"#;

#[test]
fn kernel_client_multi_connection() {
    if !require_kernel_client() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("vm1.img");
    let bytes = 32 * MIB;
    sparse_file(&image, bytes);
    let mut server = ServerSpec::new(format!("vm1={}", image.display())).start();

    let part_bytes = MIB;
    let mut guest = Guest::builder()
        .module("nbd")
        .binary(NBD_CLIENT)
        .guestfwd_unix(PORT, server.socket())
        .init_script(MULTI_CONN_SCRIPT);
    for i in 0..4 {
        let data = pattern(i * part_bytes, part_bytes as usize, SEED);
        guest = guest.data(&format!("/part{i}.bin"), data);
    }
    let out = report("multi-connection", guest.run(GUEST_TIMEOUT));

    assert_eq!(out.detail("connections"), "4");
    assert_eq!(
        out.detail("logical_block"),
        "512",
        "nbd-client's default block size"
    );
    let log = server.log();
    let connected = log
        .lines()
        .filter(|line| line.contains("client connected") && line.contains("export=vm1"))
        .count();
    assert_eq!(
        connected, 4,
        "the server saw {connected} connections; log:\n{log}"
    );
    assert_pattern(
        &image,
        0,
        4 * part_bytes,
        "four writers over four connections",
    );
    server.assert_running();
}

#[test]
fn guest_result_lines_parse() {
    let serial =
        "boot\n[ 1.0] RINGBD-GUEST-RESULT ok a=1 b=2\r\nRINGBD-GUEST-RESULT fail disk gone\n";
    assert_eq!(
        GuestResult::parse(serial),
        GuestResult::Fail("disk gone".into()),
        "the last result line counts"
    );
    assert_eq!(
        GuestResult::parse("[ 2.0] x RINGBD-GUEST-RESULT ok a=1\n"),
        GuestResult::Ok("a=1".into())
    );
    assert_eq!(GuestResult::parse("no result\n"), GuestResult::Missing);
    assert!(matches!(
        GuestResult::parse("RINGBD-GUEST-RESULT maybe\n"),
        GuestResult::Fail(_)
    ));
}

/// The harness itself: a failing command in the guest script is reported as `fail` with the
/// command, a guest that never finishes is killed at its deadline with no result, and
/// `hostfwd` reaches a guest server from the host's loopback.
#[test]
fn guest_harness_reports_failures_kills_hung_guests_and_forwards_ports() {
    if !require_guest(&[]) {
        return;
    }
    let hung = Guest::builder()
        .init_script("echo hanging\nsleep 600")
        .start(Duration::from_secs(25));
    let port = free_port();
    let mut served = Guest::builder()
        .hostfwd(port, 7777)
        .init_script(HOSTFWD_SCRIPT)
        .start(GUEST_TIMEOUT);
    let failed = Guest::builder()
        .init_script("check test 1 = 2\nguest_ok unreachable")
        .run(GUEST_TIMEOUT);
    served.wait_for_serial("RINGBD-GUEST-LISTENING");
    let greeting = read_forwarded(port);
    let served = served.wait();
    let hung = hung.wait();

    assert_eq!(
        failed.result,
        GuestResult::Fail("command failed (status 1): test 1 = 2".into()),
        "serial:\n{}",
        failed.serial
    );
    assert!(hung.timed_out, "serial:\n{}", hung.serial);
    assert_eq!(hung.result, GuestResult::Missing);
    assert_eq!(greeting, "hello from the guest\n");
    served.expect_ok();
}

/// Serves one greeting on guest port 7777.
const HOSTFWD_SCRIPT: &str = r#"
printf '#!/bin/sh\necho hello from the guest\n' > /tmp/greet.sh
chmod +x /tmp/greet.sh
nc -l -p 7777 -e /tmp/greet.sh &
server=$!
sleep 1
echo RINGBD-GUEST-LISTENING
wait $server || guest_fail "nc exited with $?"
guest_ok served
"#;

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Reads what the guest sends on a forwarded port. qemu accepts on the host side before the
/// guest listens, so an empty read is retried (bounded).
fn read_forwarded(port: u16) -> String {
    for _ in 0..50 {
        let mut text = String::new();
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("set_read_timeout");
            let _ = stream.read_to_string(&mut text);
        }
        if !text.is_empty() {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("nothing came through hostfwd 127.0.0.1:{port}");
}
