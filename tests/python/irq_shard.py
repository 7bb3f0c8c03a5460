"""Oracle for the placement test in tests/product.rs, computed without ringbd.

Prints which of `--shards 2` a first connection should reach under `--placement
interrupts`: the shard whose CPU takes the request interrupts of the disk holding argv[1],
when that is some but not all of the shards' CPUs; else "none" (then shard 0 takes it).
"""
import os
import sys


def cpus(text):
    out = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            out.update(range(int(first), int(last or first) + 1))
    return out


def one_irq(base):
    """CPUs of one interrupt; none for virtio configuration interrupts or unreadable ones."""
    try:
        handlers = [n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n))]
        if any(name.endswith("-config") for name in handlers):
            return set()
        for name in ("effective_affinity_list", "smp_affinity_list"):
            try:
                with open(os.path.join(base, name)) as f:
                    return cpus(f.read())
            except OSError:
                continue
    except OSError:
        pass
    return set()


def device_cpus(device):
    directory = os.path.realpath(device)
    for _ in range(5):
        msi = os.path.join(directory, "msi_irqs")
        if os.path.isdir(msi):
            found = set()
            for irq in os.listdir(msi):
                found |= one_irq("/proc/irq/" + irq)
            return found
        directory = os.path.dirname(directory)
    return set()


def block_cpus(block, depth=0):
    """A disk's interrupt CPUs; for dm/md devices the union over the disks under them."""
    if os.path.exists(os.path.join(block, "partition")):
        block = os.path.dirname(block)
    if os.path.exists(os.path.join(block, "device")):
        found = device_cpus(os.path.join(block, "device"))
        if found:
            return found
    found = set()
    slaves = os.path.join(block, "slaves")
    if depth < 4 and os.path.isdir(slaves):
        for slave in os.listdir(slaves):
            found |= block_cpus(os.path.realpath(os.path.join(slaves, slave)), depth + 1)
    return found


def irq_cpus(dev):
    return block_cpus(os.path.realpath("/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev))))


try:
    irq = irq_cpus(os.stat(sys.argv[1]).st_dev)
except OSError:
    irq = set()
allowed = sorted(os.sched_getaffinity(0))
shard_cpus = [allowed[i % len(allowed)] for i in range(2)]
# Only the first shard on each CPU counts (ringbd's rule for more shards than CPUs).
preferred = [cpu in irq and cpu not in shard_cpus[:i] for i, cpu in enumerate(shard_cpus)]
print(preferred.index(True) if any(preferred) and not all(preferred) else "none")
