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


def irq_cpus(dev):
    block = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev)))
    if os.path.exists(os.path.join(block, "partition")):
        block = os.path.dirname(block)
    directory = os.path.realpath(os.path.join(block, "device"))
    for _ in range(5):
        msi = os.path.join(directory, "msi_irqs")
        if os.path.isdir(msi):
            found = set()
            for irq in os.listdir(msi):
                base = "/proc/irq/" + irq
                handlers = [n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n))]
                if any(name.endswith("-config") for name in handlers):
                    continue
                with open(base + "/effective_affinity_list") as f:
                    found |= cpus(f.read())
            return found
        directory = os.path.dirname(directory)
    return set()


try:
    irq = irq_cpus(os.stat(sys.argv[1]).st_dev)
except OSError:
    irq = set()
allowed = sorted(os.sched_getaffinity(0))
shard_cpus = [allowed[i % len(allowed)] for i in range(2)]
# Only the first shard on each CPU counts (ringbd's rule for more shards than CPUs).
preferred = [cpu in irq and cpu not in shard_cpus[:i] for i, cpu in enumerate(shard_cpus)]
print(preferred.index(True) if any(preferred) and not all(preferred) else "none")
