#!/usr/bin/python3
"""Hundreds of concurrent AIO reads and writes on ONE libnbd handle.

Usage: concurrent_io.py SOCKET READ_REGION_BYTES SEED

The export's first READ_REGION_BYTES hold pattern(0, READ_REGION_BYTES, SEED) (see nbdtest.py);
everything after it is scratch space for writes.

Checks:
1. Out-of-order completion. Each round issues, back to back, a large read (16 MiB, bounded by
   the advertised maximum) followed by 32 small 4 KiB reads, four times over. On an O_DIRECT
   file export the large read costs milliseconds of device time and the small ones tens of
   microseconds, so a server that runs a connection's requests concurrently and replies as
   they complete answers some small read before the large read issued ahead of it. A server
   that serialises replies never does. Up to 10 rounds are tried; at least one out-of-order
   completion must be seen. Every reply's data is checked.
2. 512 writes of 4 KiB..256 KiB with distinct content, interleaved with 256 verified reads of
   the pattern region, all in flight together; then every write is read back concurrently.
3. Unaligned writes from a second handle that does not negotiate block sizes (a client that
   ignores the constraints, which the server must still serve), separated by at least one
   untouched 4 KiB block, read back byte-exact together with their untouched neighbours.
"""

import os
import random
import sys
import time

import nbd

from nbdtest import connect, drain, pattern

MiB = 1024 * 1024
BLOCK = 4096


def out_of_order_rounds(h, region, seed, rng):
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM) or 32 * MiB
    big = min(16 * MiB, maximum, region // 2)
    small = BLOCK
    for round_no in range(10):
        issued = []
        completed = []

        def on_done(index):
            def callback(error):
                assert error.value == 0, "request %d failed: errno %d" % (index, error.value)
                completed.append(index)
                return 1

            return callback

        for _ in range(4):
            offset = rng.randrange(0, (region - big) // BLOCK) * BLOCK
            buf = nbd.Buffer(big)
            h.aio_pread(buf, offset, completion=on_done(len(issued)))
            issued.append((offset, big, buf))
            for _ in range(32):
                offset = rng.randrange(0, region // small) * small
                buf = nbd.Buffer(small)
                h.aio_pread(buf, offset, completion=on_done(len(issued)))
                issued.append((offset, small, buf))
        drain(h)
        assert sorted(completed) == list(range(len(issued))), "lost or duplicated completions"
        for offset, length, buf in issued:
            assert buf.to_bytearray() == pattern(offset, length, seed), (
                "wrong data for read of %d at %d" % (length, offset)
            )
        inversions = sum(1 for a, b in zip(completed, completed[1:]) if b < a)
        print("round %d: %d requests, %d adjacent inversions" % (round_no, len(issued), inversions))
        if inversions > 0:
            return
    raise AssertionError("no out-of-order completion in 10 rounds: replies are serialised")


def mixed_reads_and_writes(h, region, size, seed, rng):
    scratch = size - region
    writes = []
    offset = region
    for _ in range(512):
        length = rng.randrange(1, 65) * BLOCK
        if offset + length > size:
            break
        writes.append((offset, os.urandom(length)))
        offset += length + rng.randrange(0, 4) * BLOCK
    assert len(writes) >= 256, "scratch area too small (%d bytes)" % scratch
    reads = []
    errors = []

    def check_ok(what):
        def callback(error):
            if error.value != 0:
                errors.append((what, error.value))
            return 1

        return callback

    for i, (offset, data) in enumerate(writes):
        h.aio_pwrite(data, offset, completion=check_ok(("write", offset)))
        if i % 2 == 0:
            read_offset = rng.randrange(0, region // BLOCK) * BLOCK
            buf = nbd.Buffer(BLOCK)
            h.aio_pread(buf, read_offset, completion=check_ok(("read", read_offset)))
            reads.append((read_offset, buf))
    print("in flight after submission: %d" % h.aio_in_flight())
    drain(h)
    assert not errors, "failed commands: %r" % errors[:10]
    for read_offset, buf in reads:
        assert buf.to_bytearray() == pattern(read_offset, BLOCK, seed), "read at %d" % read_offset
    back = []
    for offset, data in writes:
        buf = nbd.Buffer(len(data))
        h.aio_pread(buf, offset, completion=check_ok(("readback", offset)))
        back.append((offset, data, buf))
    drain(h)
    assert not errors, "failed read-backs: %r" % errors[:10]
    for offset, data, buf in back:
        assert buf.to_bytearray() == data, "write at %d (%d bytes) not read back" % (
            offset,
            len(data),
        )
    print("%d writes and %d reads verified" % (len(writes), len(reads)))
    return writes


def unaligned_writes(h, base, rng):
    slots = []
    offset = base
    for _ in range(64):
        start = offset + rng.randrange(1, BLOCK)
        length = rng.randrange(1, 3 * BLOCK)
        slots.append((start, os.urandom(length)))
        # Leave at least one untouched block between neighbours.
        offset = (start + length + 2 * BLOCK) // BLOCK * BLOCK
    end = offset
    h.pwrite(bytes(end - base), base)  # known zero background
    for start, data in slots:
        h.aio_pwrite(data, start)
    drain(h)
    image = bytearray(end - base)
    for start, data in slots:
        image[start - base : start - base + len(data)] = data
    got = h.pread(end - base, base)
    assert got == image, "unaligned writes were not applied byte-exactly"
    # Unaligned reads too.
    for start, data in slots[:16]:
        want = bytes(image[start - base - 1 : start - base + len(data) + 2])
        assert h.pread(len(data) + 3, start - 1) == want, "unaligned read at %d" % (start - 1)
    print("%d unaligned writes verified" % len(slots))


def main():
    socket, region, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    h = connect(socket)
    size = h.get_size()
    assert size > region, "export (%d) must be larger than the read region (%d)" % (size, region)
    started = time.monotonic()
    out_of_order_rounds(h, region, seed, rng)
    writes = mixed_reads_and_writes(h, region, size, seed, rng)
    last_offset, last_data = writes[-1]
    h.flush()
    h.shutdown()
    unaligned = connect(socket, block_size=False)
    unaligned_writes(unaligned, (last_offset + len(last_data) + BLOCK) // BLOCK * BLOCK, rng)
    unaligned.flush()
    unaligned.shutdown()
    print("ok in %.1fs" % (time.monotonic() - started))


if __name__ == "__main__":
    main()
