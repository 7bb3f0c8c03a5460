#!/usr/bin/python3
"""Write-then-flush durability across a server crash.

Usage: durability.py write SOCKET SEED   -- writes 32 MiB, FLUSHes, prints "flushed"
       durability.py check SOCKET SEED   -- reads it back and compares

The data is derived from SEED so the check needs no state from the writer.
"""

import random
import sys

import nbd

from nbdtest import connect

MiB = 1024 * 1024
TOTAL = 32 * MiB


def plan(seed):
    """[(offset, bytes)] covering [0, TOTAL) in mixed sizes, some with FUA."""
    rng = random.Random(seed)
    out = []
    offset = 0
    while offset < TOTAL:
        length = min(rng.choice([4096, 65536, MiB, 4 * MiB]), TOTAL - offset)
        out.append((offset, rng.randbytes(length), rng.random() < 0.25))
        offset += length
    return out


def main():
    mode, socket, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    h = connect(socket)
    if mode == "write":
        for offset, data, fua in plan(seed):
            h.aio_pwrite(data, offset, flags=nbd.CMD_FLAG_FUA if fua else 0)
        while h.aio_in_flight() > 0:
            h.poll(1000)
        h.flush()
        print("flushed", flush=True)
    elif mode == "check":
        for offset, data, _ in plan(seed):
            got = h.pread(len(data), offset)
            assert got == data, "data at %d (%d bytes) lost after crash" % (offset, len(data))
        print("ok")
    else:
        raise SystemExit("unknown mode " + mode)
    h.shutdown()


if __name__ == "__main__":
    main()
