#!/usr/bin/python3
"""TRIM, WRITE_ZEROES, FLUSH, FUA and CACHE with read-back, and base:allocation block status.

Usage: commands.py SOCKET KIND     (KIND = "file" for a fresh sparse file export, or "memory")

For a sparse file export, block status must show the untouched export as a hole, written data
as data, and a trimmed range as a hole again (TRIM punches holes in files).
"""

import os
import sys

import nbd

from nbdtest import connect, state_at

MiB = 1024 * 1024
HOLE = nbd.STATE_HOLE


def main():
    socket, kind = sys.argv[1], sys.argv[2]
    h = connect(socket)
    size = h.get_size()
    assert size >= 16 * MiB, size
    for name in ["can_flush", "can_fua", "can_trim", "can_zero"]:
        assert getattr(h, name)(), "%s must be advertised for a %s export" % (name, kind)
    assert h.can_meta_context("base:allocation"), "base:allocation not negotiated"
    assert not h.is_read_only()

    if kind == "file":
        states = state_at(h, 0, 8 * MiB)
        assert all(s & HOLE for s in states), "fresh sparse file not reported as hole: %r" % states

    # FUA write, read back.
    data = os.urandom(MiB)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 0) == data, "FUA write not read back"
    states = state_at(h, 0, MiB)
    assert all(not s & HOLE for s in states), "written range reported as hole: %r" % states

    # Plain write + FLUSH.
    data2 = os.urandom(MiB)
    h.pwrite(data2, 2 * MiB)
    h.flush()
    assert h.pread(MiB, 2 * MiB) == data2

    # TRIM: contents become unspecified; on a file it punches a hole.
    h.trim(MiB, 0)
    h.flush()
    if kind == "file":
        states = state_at(h, 0, MiB)
        assert all(s & HOLE for s in states), "trimmed range not reported as hole: %r" % states
        # The neighbour must be untouched.
        assert h.pread(MiB, 2 * MiB) == data2, "TRIM damaged a neighbouring range"

    # WRITE_ZEROES with NO_HOLE, then without flags; both must read back as zeroes.
    h.zero(MiB // 2, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
    got = h.pread(MiB, 2 * MiB)
    assert got[: MiB // 2] == bytes(MiB // 2), "WRITE_ZEROES(NO_HOLE) not zero"
    assert got[MiB // 2 :] == data2[MiB // 2 :], "WRITE_ZEROES overran its range"
    h.pwrite(os.urandom(MiB), 4 * MiB)
    h.zero(MiB, 4 * MiB)
    assert h.pread(MiB, 4 * MiB) == bytes(MiB), "WRITE_ZEROES not zero"
    # Small and odd-sized zeroing inside a data block, from a client that did not negotiate
    # block sizes (the server must still serve it).
    u = connect(socket, block_size=False)
    filler = os.urandom(8192)
    u.pwrite(filler, 6 * MiB)
    u.zero(100, 6 * MiB + 1000)
    want = filler[:1000] + bytes(100) + filler[1100:]
    assert u.pread(8192, 6 * MiB) == want, "unaligned WRITE_ZEROES wrong"
    u.trim(3000, 6 * MiB + 333)  # an unaligned TRIM must not damage its neighbours
    got = u.pread(8192, 6 * MiB)
    assert got[:333] == want[:333] and got[3333:] == want[3333:], "unaligned TRIM overran"
    u.shutdown()

    # FAST_ZERO: either done (and zero) or ENOTSUP, never anything else.
    if h.can_fast_zero():
        h.pwrite(os.urandom(MiB), 8 * MiB)
        try:
            h.zero(MiB, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
            assert h.pread(MiB, 8 * MiB) == bytes(MiB), "FAST_ZERO not zero"
        except nbd.Error as e:
            assert e.errno == "ENOTSUP", "FAST_ZERO failed with %s" % e.errno

    # CACHE is advisory: it succeeds and changes nothing.
    if h.can_cache():
        h.cache(4 * MiB, 0)
        assert h.pread(MiB // 2, 2 * MiB + MiB // 2) == data2[MiB // 2 :]

    # REQ_ONE block status: exactly one extent, not longer than asked.
    found = []

    def callback(metacontext, offset, entries, err):
        if metacontext == "base:allocation":
            found.append(list(entries))
        return 0

    h.block_status(3 * MiB, 0, callback, nbd.CMD_FLAG_REQ_ONE)
    assert len(found) == 1 and len(found[0]) == 2, "REQ_ONE returned %r" % found
    assert 0 < found[0][0] <= 3 * MiB, "REQ_ONE extent length %d" % found[0][0]

    h.flush()
    h.shutdown()
    print("ok")


if __name__ == "__main__":
    main()
