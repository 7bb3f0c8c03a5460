#!/usr/bin/python3
"""Concurrent large and small requests over TLS connections, and a disconnect in between.

Usage: ktls_io.py URI SEED

URI is an nbds:// URI (libnbd, with tls-certificates=DIR); the export must be at least 16 MiB.
Run by tests/ktls.rs against ringbd in a guest whose kernel took over the TLS records (kTLS),
so every byte here crosses the kernel's record layer in both directions.

Checks:
1. Handle A fills the first 8 MiB with pattern(SEED) by 1 MiB writes, all in flight at once
   (large requests: 64 records per message), then reads it back with 8 concurrent 1 MiB
   reads and 256 concurrent 4 KiB reads (small replies, many per record), all verified.
2. Handle B, connected meanwhile, issues its own concurrent small writes and large reads,
   verified, then disconnects cleanly (NBD_CMD_DISC, then TLS close_notify from libnbd).
3. After B is gone, A keeps working: up to 128 mixed writes (4..256 KiB) and reads in flight
   together, read back and verified; a new handle C then reads everything A and B wrote.
Prints one line "ktls_io ok requests=N bytes=N" at the end.
"""

import os
import random
import sys

import nbd

from nbdtest import drain, pattern

MiB = 1024 * 1024
BLOCK = 4096
REGION = 8 * MiB


def connect(uri):
    h = nbd.NBD()
    h.set_handle_name("ktls")
    h.set_uri_allow_local_file(True)  # tls-certificates=DIR
    h.connect_uri(uri)
    assert h.get_size() >= 2 * REGION, "export too small: %d" % h.get_size()
    return h


class Tally:
    """Counts requests and bytes, and collects failed completions."""

    def __init__(self):
        self.requests = 0
        self.bytes = 0
        self.errors = []

    def done(self, what, length):
        self.requests += 1
        self.bytes += length

        def callback(error):
            if error.value != 0:
                self.errors.append((what, error.value))
            return 1

        return callback

    def check(self):
        assert not self.errors, "failed commands: %r" % self.errors[:10]


def fill_and_verify(h, seed, rng, tally):
    for offset in range(0, REGION, MiB):
        h.aio_pwrite(pattern(offset, MiB, seed), offset, completion=tally.done("fill", MiB))
    drain(h)
    tally.check()
    reads = []
    for offset in range(0, REGION, MiB):
        buf = nbd.Buffer(MiB)
        h.aio_pread(buf, offset, completion=tally.done("big read", MiB))
        reads.append((offset, MiB, buf))
    for _ in range(256):
        offset = rng.randrange(0, REGION // BLOCK) * BLOCK
        buf = nbd.Buffer(BLOCK)
        h.aio_pread(buf, offset, completion=tally.done("small read", BLOCK))
        reads.append((offset, BLOCK, buf))
    drain(h)
    tally.check()
    for offset, length, buf in reads:
        assert buf.to_bytearray() == pattern(offset, length, seed), "read %d at %d" % (
            length,
            offset,
        )


def second_client(uri, seed, rng, tally):
    h = connect(uri)
    writes = []
    base = REGION
    for i in range(64):
        offset = base + i * 2 * BLOCK
        writes.append((offset, os.urandom(BLOCK)))
        h.aio_pwrite(writes[-1][1], offset, completion=tally.done("B write", BLOCK))
    reads = []
    for _ in range(4):
        offset = rng.randrange(0, (REGION - MiB) // BLOCK) * BLOCK
        buf = nbd.Buffer(MiB)
        h.aio_pread(buf, offset, completion=tally.done("B big read", MiB))
        reads.append((offset, buf))
    drain(h)
    tally.check()
    for offset, buf in reads:
        assert buf.to_bytearray() == pattern(offset, MiB, seed), "B read at %d" % offset
    h.flush()
    h.shutdown()
    return writes


def mixed_after_disconnect(h, rng, tally):
    writes = []
    reads = []
    offset = REGION + 64 * 2 * BLOCK
    for _ in range(128):
        length = rng.choice([1, 2, 16, 64]) * BLOCK
        if offset + length > 2 * REGION:
            break
        data = os.urandom(length)
        h.aio_pwrite(data, offset, completion=tally.done("A write", length))
        writes.append((offset, data))
        offset += length
        buf = nbd.Buffer(BLOCK)
        read_offset = rng.randrange(0, REGION // BLOCK) * BLOCK
        h.aio_pread(buf, read_offset, completion=tally.done("A read", BLOCK))
        reads.append((read_offset, buf))
    assert len(writes) >= 64, "scratch area too small"
    drain(h)
    tally.check()
    return writes, reads


def main():
    uri, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    tally = Tally()
    a = connect(uri)
    fill_and_verify(a, seed, rng, tally)
    b_writes = second_client(uri, seed, rng, tally)
    a_writes, a_reads = mixed_after_disconnect(a, rng, tally)
    for read_offset, buf in a_reads:
        assert buf.to_bytearray() == pattern(read_offset, BLOCK, seed), "A read %d" % read_offset
    c = connect(uri)
    back = []
    for offset, data in b_writes + a_writes:
        buf = nbd.Buffer(len(data))
        c.aio_pread(buf, offset, completion=tally.done("C read back", len(data)))
        back.append((offset, data, buf))
    drain(c)
    tally.check()
    for offset, data, buf in back:
        assert buf.to_bytearray() == data, "write of %d at %d not read back" % (len(data), offset)
    for h in (a, c):
        h.flush()
        h.shutdown()
    print("ktls_io ok requests=%d bytes=%d" % (tally.requests, tally.bytes))


if __name__ == "__main__":
    main()
