#!/usr/bin/python3
"""Out-of-range requests get the right errno and the connection stays usable; a read-only
export refuses writes with EPERM.

Usage: errors.py SOCKET [READ_ONLY_SOCKET]

libnbd's client-side checks are disabled (set_strict_mode(0)) so every bad request really
reaches the server.
"""

import sys

import nbd

from nbdtest import connect, expect_errno

MiB = 1024 * 1024


def usable(h, reference):
    assert h.pread(4096, 0) == reference, "connection not usable after an error"


def out_of_range(socket):
    h = connect(socket)
    h.set_strict_mode(0)
    size = h.get_size()
    h.pwrite(b"\x5a" * 4096, 0)
    reference = h.pread(4096, 0)
    cases = [(size, 4096), (size - 512, 4096), (size + MiB, 512)]
    for offset, count in cases:
        what = "%d bytes at %d (size %d)" % (count, offset, size)
        expect_errno("READ " + what, "EINVAL", h.pread, count, offset)
        usable(h, reference)
        expect_errno("WRITE " + what, "ENOSPC", h.pwrite, b"x" * count, offset)
        usable(h, reference)
        expect_errno("TRIM " + what, "EINVAL", h.trim, count, offset)
        usable(h, reference)
        expect_errno("WRITE_ZEROES " + what, "ENOSPC", h.zero, count, offset)
        usable(h, reference)
        if h.can_cache():
            expect_errno("CACHE " + what, "EINVAL", h.cache, count, offset)
            usable(h, reference)
        expect_errno(
            "BLOCK_STATUS " + what, "EINVAL", h.block_status, count, offset, lambda *a: 0
        )
        usable(h, reference)
    h.shutdown()
    # The last byte is fine (from a client that did not negotiate block sizes, so a 1-byte
    # write is legal for it).
    u = connect(socket, block_size=False)
    u.pwrite(b"\x01", size - 1)
    assert u.pread(1, size - 1) == b"\x01"
    u.shutdown()


def read_only(socket):
    h = connect(socket)
    assert h.is_read_only(), "export started with --read-only does not say so"
    assert not h.can_trim() and not h.can_zero(), "read-only export advertises TRIM/ZERO"
    h.set_strict_mode(0)
    reference = h.pread(4096, 0)
    expect_errno("WRITE on read-only", "EPERM", h.pwrite, b"x" * 4096, 0)
    usable(h, reference)
    expect_errno("WRITE(FUA) on read-only", "EPERM", h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA)
    usable(h, reference)
    expect_errno("TRIM on read-only", "EPERM", h.trim, 4096, 0)
    usable(h, reference)
    expect_errno("WRITE_ZEROES on read-only", "EPERM", h.zero, 4096, 0)
    usable(h, reference)
    h.shutdown()


def main():
    out_of_range(sys.argv[1])
    if len(sys.argv) > 2:
        read_only(sys.argv[2])
    print("ok")


if __name__ == "__main__":
    main()
