#!/usr/bin/python3
"""Multi-connection consistency: what one connection wrote and flushed, another one reads.

Usage: multiconn.py SOCKET

NBD_FLAG_CAN_MULTI_CONN promises that a FLUSH (or FUA) on one connection makes every write
that connection had completed visible to reads on all connections.
"""

import os
import random
import sys

import nbd

from nbdtest import connect, drain

MiB = 1024 * 1024


def main():
    socket = sys.argv[1]
    a, b, c = connect(socket), connect(socket), connect(socket)
    assert a.can_multi_conn(), "CAN_MULTI_CONN not advertised"
    size = a.get_size()
    rng = random.Random(7)
    # Sequential: write on A, flush on A, read on B.
    for i in range(200):
        length = rng.randrange(1, 17) * 4096
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        data = os.urandom(length)
        if i % 2 == 0:
            a.pwrite(data, offset)
            a.flush()
        else:
            a.pwrite(data, offset, nbd.CMD_FLAG_FUA)
        got = b.pread(length, offset)
        assert got == data, "B did not see A's flushed write at %d (iteration %d)" % (offset, i)
    # Concurrent: 128 writes in flight on A, then one FLUSH, then B and C read everything.
    writes = []
    for i in range(128):
        offset = i * 65536
        data = os.urandom(65536)
        a.aio_pwrite(data, offset)
        writes.append((offset, data))
    drain(a)
    a.flush()
    for reader in (b, c):
        for offset, data in writes:
            assert reader.pread(len(data), offset) == data, "stale read at %d" % offset
    for h in (a, b, c):
        h.shutdown()
    print("ok")


if __name__ == "__main__":
    main()
