//! Which shard takes a new connection.
//!
//! The least-loaded shard (fewest live connections); among equally loaded shards, the one on
//! the CPU that receives the connection's packets, then one running on a CPU that takes the
//! completion interrupts of the exports' disks.
//!
//! The receive CPU is TCP's `SO_INCOMING_CPU`: the CPU whose softirq last queued data for the
//! socket, which is the CPU of the NIC queue interrupt the flow hashes to (or, over loopback,
//! the client's CPU). Every request arrives there; a shard elsewhere is woken by an
//! inter-processor interrupt per burst of requests, and the reply's transmit work moves CPUs
//! too. Measured in `tuning/README.md` §1: a QD1 client over loopback TCP pinned to the CPU
//! of a shard without its connection saw 75 µs per 4k read of a RAM disk and 32 µs of server
//! CPU per request; with the connection on that shard, 22 µs and 11 µs. Unix-socket
//! connections have no receive CPU.
//!
//! A request's
//! disk completion is posted by the interrupt handler and wakes the shard that submitted it:
//! on the interrupt's own CPU that is a local wake-up, on any other CPU an inter-processor
//! interrupt, which in a virtual machine is an exit to the hypervisor for the sender and an
//! entry for the halted receiver. At queue depth 1 that wake-up is on every request's path
//! (measured in `tuning/README.md` §1: 4k random reads at QD1, 117 µs mean with the
//! connection on the other CPU, 90 µs on the interrupt's CPU). A connection that keeps a CPU
//! busy can lose by sharing it with the interrupts, hence `placement = "least-loaded"`.
//!
//! Devices with one queue per CPU (NVMe, multi-queue virtio) complete on the submitting CPU
//! already; their interrupts cover every shard's CPU, and then no shard is preferred.
//!
//! Discovery reads sysfs and procfs under a root directory (`/` in production, a fake tree in
//! tests): the export's block device (`/sys/dev/block/MAJ:MIN`, the whole disk for a
//! partition, the underlying disks for device-mapper and md through `slaves/`), the PCI
//! function above it with its `msi_irqs/`, and each interrupt's `effective_affinity_list`
//! in `/proc/irq/N/`. Interrupts whose handler is a `*-config` (virtio configuration
//! changes) never carry completions and are skipped. Anything missing means "unknown", never
//! an error: placement then falls back to the least-loaded shard alone.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A set of CPU numbers.
pub type CpuSet = BTreeSet<usize>;

/// How deep `slaves/` chains are followed (dm on md on disks is three).
const STACK_DEPTH_MAX: usize = 4;
/// How many directories above a disk's `device` link a PCI function is looked for.
const PARENT_DEPTH_MAX: usize = 4;
/// Highest CPU number accepted from a CPU list (guards against nonsense in a fake tree).
const CPU_MAX: usize = 1 << 16;

/// Parses a kernel CPU list such as `0-3,8,10-11`. `None` if malformed.
pub fn parse_cpu_list(text: &str) -> Option<CpuSet> {
    let mut cpus = CpuSet::new();
    for part in text.trim().split(',').filter(|part| !part.is_empty()) {
        let (first, last): (usize, usize) = match part.split_once('-') {
            Some((first, last)) => (first.parse().ok()?, last.parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        if first > last || last > CPU_MAX {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

/// The block device `(major, minor)` holding `path`: the device itself for a block device
/// node, the filesystem's device for a regular file.
pub fn device_of(path: &Path) -> Option<(u32, u32)> {
    let metadata = fs::metadata(path).ok()?;
    let dev = if metadata.file_type().is_block_device() {
        metadata.rdev()
    } else {
        metadata.dev()
    };
    Some(split_dev(dev))
}

/// glibc's `major()`/`minor()` encoding of a `dev_t`.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The CPUs that take the completion interrupts of block device `dev`, or `None` if that
/// cannot be told (a virtual device without slaves, no MSI interrupts, no procfs).
pub fn completion_cpus(root: &Path, dev: (u32, u32)) -> Option<CpuSet> {
    let link = root.join(format!("sys/dev/block/{}:{}", dev.0, dev.1));
    let block = fs::canonicalize(link).ok()?;
    block_cpus(root, &block, 0)
}

fn block_cpus(root: &Path, block: &Path, depth: usize) -> Option<CpuSet> {
    let disk = if block.join("partition").exists() {
        block.parent()?.to_path_buf()
    } else {
        block.to_path_buf()
    };
    if let Ok(device) = fs::canonicalize(disk.join("device"))
        && let Some(cpus) = device_cpus(root, &device)
    {
        return Some(cpus);
    }
    if depth >= STACK_DEPTH_MAX {
        return None;
    }
    // A stacked device (dm, md): the union over the disks under it.
    let slaves = fs::read_dir(disk.join("slaves")).ok()?.flatten();
    union_of(slaves.map(|slave| {
        let slave = fs::canonicalize(slave.path()).ok()?;
        block_cpus(root, &slave, depth + 1)
    }))
}

/// The union of the known sets; `None` when none is known.
fn union_of(sets: impl Iterator<Item = Option<CpuSet>>) -> Option<CpuSet> {
    sets.flatten().reduce(|mut union, cpus| {
        union.extend(cpus);
        union
    })
}

/// Looks for `msi_irqs/` in `device` or the few directories above it (virtio and NVMe
/// devices sit below their PCI function) and unions the interrupts' effective affinities.
fn device_cpus(root: &Path, device: &Path) -> Option<CpuSet> {
    let mut dir: PathBuf = device.to_path_buf();
    for _ in 0..=PARENT_DEPTH_MAX {
        if let Ok(entries) = fs::read_dir(dir.join("msi_irqs")) {
            return union_of(entries.flatten().map(|entry| {
                let irq = entry.file_name().to_str()?.parse().ok()?;
                irq_cpus(root, irq)
            }));
        }
        dir = dir.parent()?.to_path_buf();
    }
    None
}

/// The effective affinity of interrupt `irq`, `None` for configuration interrupts and
/// unreadable entries.
fn irq_cpus(root: &Path, irq: u32) -> Option<CpuSet> {
    let dir = root.join(format!("proc/irq/{irq}"));
    let config_only = fs::read_dir(&dir).ok()?.flatten().any(|entry| {
        entry.file_type().is_ok_and(|kind| kind.is_dir())
            && entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.ends_with("-config"))
    });
    if config_only {
        return None;
    }
    let text = fs::read_to_string(dir.join("effective_affinity_list"))
        .or_else(|_| fs::read_to_string(dir.join("smp_affinity_list")))
        .ok()?;
    parse_cpu_list(&text).filter(|cpus| !cpus.is_empty())
}

/// Which shards to prefer, given each shard's CPU (if pinned) and the interrupt CPUs: those
/// on an interrupt CPU, unless that is all of them or none (then no preference). With more
/// shards than CPUs only the first shard on each CPU counts, so that a second connection
/// goes to another CPU rather than to a second shard on the same one.
pub fn preferred_shards(shard_cpus: &[Option<usize>], irq_cpus: &CpuSet) -> Vec<bool> {
    let preferred: Vec<bool> = receive_cpus(shard_cpus)
        .into_iter()
        .map(|cpu| cpu.is_some_and(|cpu| irq_cpus.contains(&cpu)))
        .collect();
    if preferred.iter().all(|&p| p) || !preferred.iter().any(|&p| p) {
        return vec![false; shard_cpus.len()];
    }
    preferred
}

/// The CPU each shard stands for (see [`choose`], [`preferred_shards`]): the first shard on
/// each CPU, `None` for unpinned shards and for further shards on a CPU already taken.
pub fn receive_cpus(shard_cpus: &[Option<usize>]) -> Vec<Option<usize>> {
    let mut seen = CpuSet::new();
    shard_cpus
        .iter()
        .map(|cpu| cpu.filter(|&cpu| seen.insert(cpu)))
        .collect()
}

/// A shard as the acceptor sees it when placing a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Live connections.
    pub connections: usize,
    /// The CPU whose connections this shard takes ([`receive_cpus`]).
    pub receive_cpu: Option<usize>,
    /// On a CPU that takes the disks' completion interrupts ([`preferred_shards`]).
    pub preferred: bool,
}

/// The shard for a connection whose packets arrive on `received_on` (if known): fewest
/// connections first, then the shard taking that CPU's connections, then a preferred one,
/// then the lowest index. `None` without shards.
pub fn choose(
    shards: impl IntoIterator<Item = Candidate>,
    received_on: Option<usize>,
) -> Option<usize> {
    shards
        .into_iter()
        .enumerate()
        .min_by_key(|&(index, shard)| {
            let receives = received_on.is_some() && shard.receive_cpu == received_on;
            (shard.connections, !receives, !shard.preferred, index)
        })
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn cpus(list: &[usize]) -> CpuSet {
        list.iter().copied().collect()
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(cpus(&[0, 1, 2, 3, 8, 10, 11]))
        );
        assert_eq!(parse_cpu_list("1"), Some(cpus(&[1])));
        assert_eq!(parse_cpu_list("\n"), Some(CpuSet::new()));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
        assert_eq!(parse_cpu_list("0-99999999"), None);
    }

    #[test]
    fn dev_t_split_matches_glibc() {
        assert_eq!(split_dev(0xfe00), (254, 0));
        assert_eq!(split_dev(0x0103), (1, 3));
        // major 259 (NVMe partitions), minor 300: both need the high bits.
        let dev = (259u64 & 0xfff) << 8 | (300u64 & 0xff) | ((300u64 & !0xff) << 12);
        assert_eq!(split_dev(dev), (259, 300));
    }

    /// A fake sysfs/procfs tree shaped like the development VM: virtio-blk vda on PCI
    /// function 0000:00:02.0, configuration IRQ 35 on CPU 0, request IRQ 36 on CPU 1, a
    /// partition vda1, a dm device on top of vda1, a loop device without interrupts and a
    /// four-queue NVMe disk with one request interrupt per CPU.
    fn fake_tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let mk = |p: &str| fs::create_dir_all(r.join(p)).unwrap();
        let write = |p: &str, text: &str| fs::write(r.join(p), text).unwrap();
        let link = |target: &str, at: &str| symlink(target, r.join(at)).unwrap();
        mk("sys/dev/block");
        let pci = "sys/devices/pci0000:00/0000:00:02.0";
        mk(&format!("{pci}/virtio1/block/vda/vda1"));
        mk(&format!("{pci}/msi_irqs/35"));
        mk(&format!("{pci}/msi_irqs/36"));
        write(&format!("{pci}/virtio1/block/vda/vda1/partition"), "1\n");
        link(
            "../../../virtio1",
            &format!("{pci}/virtio1/block/vda/device"),
        );
        link(
            "../../devices/pci0000:00/0000:00:02.0/virtio1/block/vda",
            "sys/dev/block/254:0",
        );
        link(
            "../../devices/pci0000:00/0000:00:02.0/virtio1/block/vda/vda1",
            "sys/dev/block/254:1",
        );
        for (irq, name, cpu) in [(35, "virtio1-config", "0"), (36, "virtio1-req.0", "1")] {
            mk(&format!("proc/irq/{irq}/{name}"));
            write(&format!("proc/irq/{irq}/effective_affinity_list"), cpu);
        }
        mk("sys/devices/virtual/block/dm-0/slaves");
        link(
            "../../../../pci0000:00/0000:00:02.0/virtio1/block/vda/vda1",
            "sys/devices/virtual/block/dm-0/slaves/vda1",
        );
        link("../../devices/virtual/block/dm-0", "sys/dev/block/253:0");
        mk("sys/devices/virtual/block/loop0");
        link("../../devices/virtual/block/loop0", "sys/dev/block/7:0");
        let nvme = "sys/devices/pci0000:00/0000:00:04.0";
        mk(&format!("{nvme}/nvme/nvme0/nvme0n1"));
        link("../../nvme0", &format!("{nvme}/nvme/nvme0/nvme0n1/device"));
        link(
            "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1",
            "sys/dev/block/259:0",
        );
        for cpu in 0..4 {
            let irq = 50 + cpu;
            mk(&format!("{nvme}/msi_irqs/{irq}"));
            mk(&format!("proc/irq/{irq}/nvme0q{}", cpu + 1));
            write(
                &format!("proc/irq/{irq}/effective_affinity_list"),
                &cpu.to_string(),
            );
        }
        root
    }

    #[test]
    fn virtio_disk_partition_and_dm_resolve_to_the_request_irq_cpu() {
        let root = fake_tree();
        for dev in [(254, 0), (254, 1), (253, 0)] {
            assert_eq!(
                completion_cpus(root.path(), dev),
                Some(cpus(&[1])),
                "{dev:?}"
            );
        }
    }

    #[test]
    fn unknown_devices_have_no_answer() {
        let root = fake_tree();
        assert_eq!(completion_cpus(root.path(), (7, 0)), None);
        assert_eq!(completion_cpus(root.path(), (8, 0)), None);
    }

    #[test]
    fn per_cpu_queues_prefer_no_shard() {
        let root = fake_tree();
        let irq = completion_cpus(root.path(), (259, 0)).unwrap();
        assert_eq!(irq, cpus(&[0, 1, 2, 3]));
        let shards = [Some(0), Some(1), Some(2), Some(3)];
        assert_eq!(preferred_shards(&shards, &irq), vec![false; 4]);
    }

    #[test]
    fn shards_on_the_interrupt_cpu_are_preferred() {
        let irq = cpus(&[1]);
        assert_eq!(
            preferred_shards(&[Some(0), Some(1)], &irq),
            vec![false, true]
        );
        assert_eq!(preferred_shards(&[None, None], &irq), vec![false, false]);
        // Both on the interrupt CPU: only the first counts (the same CPU either way).
        assert_eq!(
            preferred_shards(&[Some(1), Some(1)], &irq),
            vec![true, false]
        );
        assert_eq!(
            preferred_shards(&[Some(0), Some(2)], &irq),
            vec![false, false]
        );
        // Four shards on two CPUs: one preferred shard, so two connections use both CPUs.
        let four = [Some(0), Some(1), Some(0), Some(1)];
        let preferred = preferred_shards(&four, &irq);
        assert_eq!(preferred, vec![false, true, false, false]);
        let first = choose(shards(&[0; 4], &[None; 4], &preferred), None).unwrap();
        assert_eq!(first, 1);
        let second = choose(shards(&[0, 1, 0, 0], &[None; 4], &preferred), None).unwrap();
        assert_eq!(four[second], Some(0));
    }

    /// Candidates from parallel slices of connections, receive CPUs and preferences.
    fn shards(
        connections: &[usize],
        receive_cpus: &[Option<usize>],
        preferred: &[bool],
    ) -> Vec<Candidate> {
        let shards = connections.iter().zip(receive_cpus).zip(preferred);
        let candidate = |((&connections, &receive_cpu), &preferred)| Candidate {
            connections,
            receive_cpu,
            preferred,
        };
        shards.map(candidate).collect()
    }

    #[test]
    fn least_loaded_first_then_preferred_then_lowest_index() {
        let none = [None; 3];
        let pick = |connections: &[usize], preferred: &[bool]| {
            choose(shards(connections, &none, preferred), None)
        };
        assert_eq!(pick(&[0, 0], &[false, true]), Some(1));
        assert_eq!(pick(&[0, 1], &[false, true]), Some(0));
        assert_eq!(pick(&[1, 1, 1], &[false, true, true]), Some(1));
        assert_eq!(pick(&[2, 1], &[false, false]), Some(1));
        assert_eq!(pick(&[0, 0], &[false, false]), Some(0));
        assert_eq!(choose(std::iter::empty(), Some(0)), None);
    }

    #[test]
    fn the_receive_cpu_ranks_after_load_and_before_disk_interrupts() {
        let receive = receive_cpus(&[Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(receive, vec![Some(0), Some(1), None, None]);
        assert_eq!(receive_cpus(&[None, Some(1)]), vec![None, Some(1)]);
        let preferred = [false, true, false, false];
        // Received on CPU 0: the shard taking CPU 0 beats the disk-interrupt shard.
        assert_eq!(
            choose(shards(&[0; 4], &receive, &preferred), Some(0)),
            Some(0)
        );
        assert_eq!(
            choose(shards(&[0; 4], &receive, &preferred), Some(1)),
            Some(1)
        );
        // Unknown receive CPU (unix sockets) or one no shard runs on: disk preference.
        assert_eq!(choose(shards(&[0; 4], &receive, &preferred), None), Some(1));
        assert_eq!(
            choose(shards(&[0; 4], &receive, &preferred), Some(7)),
            Some(1)
        );
        // Load still comes first: with the CPU 0 shard busy, the lowest idle index wins (the
        // second shard on CPU 0 does not take CPU 0's connections).
        let busy = [1, 0, 0, 1];
        assert_eq!(
            choose(shards(&busy, &receive, &[false; 4]), Some(0)),
            Some(1)
        );
    }
}
