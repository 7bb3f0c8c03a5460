"""Sparse READs with structured replies: holes arrive as LIBNBD_READ_HOLE chunks.

Usage: sparse.py SOCKET KIND   (KIND = file: the export is a sparse file whose data regions
were written by tests/sparse.rs; memory: a fresh memory export, written here)

Layout (both kinds): 64 KiB of pattern(seed 7) data at DATA_AT[i]; everything else zero.
"""

import sys

import nbd

from nbdtest import connect, pattern

KiB = 1024
MiB = 1024 * KiB
SEED = 7
DATA_LEN = 64 * KiB
DATA_AT = [1 * MiB, 1 * MiB + 192 * KiB, 3 * MiB - 8 * KiB]


def expected(offset, length):
    """What [offset, offset + length) must read as."""
    want = bytearray(length)
    for at in DATA_AT:
        lo, hi = max(at, offset), min(at + DATA_LEN, offset + length)
        if lo < hi:
            want[lo - offset : hi - offset] = pattern(at, DATA_LEN, SEED)[lo - at : hi - at]
    return bytes(want)


def chunks_of(h, offset, length, flags=0):
    """(offset, length, status, bytes) of every chunk of one structured read, plus the buffer."""
    seen = []

    def chunk(subbuf, off, status, error):
        assert error.value == 0, "chunk error %d at %d" % (error.value, off)
        seen.append((off, len(subbuf), status, bytes(subbuf)))
        return 0

    buf = h.pread_structured(length, offset, chunk, flags)
    return seen, buf


def check_read(h, offset, length, want_hole, want_data):
    """Reads a range and checks every chunk: tiling, holes zero, data exact.

    want_hole / want_data: True = at least one such chunk, False = none, None = either.
    """
    seen, buf = chunks_of(h, offset, length)
    want = expected(offset, length)
    assert buf == want, "read %d+%d returned wrong bytes" % (offset, length)
    covered = 0
    holes = data = 0
    for off, ln, status, got in sorted(seen):
        assert off == offset + covered, "chunks do not tile at %d (%r)" % (off, seen)
        assert ln > 0
        covered += ln
        rel = off - offset
        if status == nbd.READ_HOLE:
            holes += 1
            assert want[rel : rel + ln] == bytes(ln), "hole over data at %d+%d" % (off, ln)
        else:
            assert status == nbd.READ_DATA, "unexpected status %d" % status
            data += 1
            assert got == want[rel : rel + ln], "data chunk at %d+%d wrong" % (off, ln)
    assert covered == length, "chunks cover %d of %d" % (covered, length)
    if want_hole is not None:
        assert (holes > 0) == want_hole, "%d hole chunks for %d+%d: %r" % (
            holes,
            offset,
            length,
            [s[:3] for s in seen],
        )
    if want_data is not None:
        assert (data > 0) == want_data, "%d data chunks for %d+%d" % (data, offset, length)
    return [(off, ln, status) for off, ln, status, _ in sorted(seen)]


def main():
    socket, kind = sys.argv[1], sys.argv[2]
    h = connect(socket)
    assert h.get_structured_replies_negotiated(), "libnbd negotiated structured replies"
    if kind == "memory":
        for at in DATA_AT:
            h.pwrite(pattern(at, DATA_LEN, SEED), at)

    # An all-zero range: exactly one hole chunk covering it.
    got = check_read(h, 8 * MiB, 1 * MiB, True, False)
    assert got == [(8 * MiB, MiB, nbd.READ_HOLE)], got

    # A data-only range: one data chunk, as before.
    got = check_read(h, 1 * MiB, DATA_LEN, False, True)
    assert got == [(1 * MiB, DATA_LEN, nbd.READ_DATA)], got

    # Data, hole, data, hole: exact chunk boundaries.
    got = check_read(h, 1 * MiB, 512 * KiB, True, True)
    assert got == [
        (1 * MiB, DATA_LEN, nbd.READ_DATA),
        (1 * MiB + DATA_LEN, 128 * KiB, nbd.READ_HOLE),
        (1 * MiB + 192 * KiB, DATA_LEN, nbd.READ_DATA),
        (1 * MiB + 256 * KiB, 256 * KiB, nbd.READ_HOLE),
    ], got

    # Hole then data then hole, starting inside a hole.
    got = check_read(h, 3 * MiB - 64 * KiB, 192 * KiB, True, True)
    assert got == [
        (3 * MiB - 64 * KiB, 56 * KiB, nbd.READ_HOLE),
        (3 * MiB - 8 * KiB, DATA_LEN, nbd.READ_DATA),
        (3 * MiB + 56 * KiB, 72 * KiB, nbd.READ_HOLE),
    ], got

    # Unaligned reads across a data/hole edge (the client does not negotiate block sizes).
    u = connect(socket, block_size=False)
    got = check_read(u, 1 * MiB + DATA_LEN - 100, 5000, True, True)
    assert got == [
        (1 * MiB + DATA_LEN - 100, 100, nbd.READ_DATA),
        (1 * MiB + DATA_LEN, 4900, nbd.READ_HOLE),
    ], got
    check_read(u, 1 * MiB - 3, 9, None, True)
    got = check_read(u, 8 * MiB + 1, 4095, True, False)
    assert got == [(8 * MiB + 1, 4095, nbd.READ_HOLE)], got

    # NBD_CMD_FLAG_DF: one content chunk, even over data and holes.
    seen, buf = chunks_of(h, 1 * MiB, 512 * KiB, nbd.CMD_FLAG_DF)
    assert buf == expected(1 * MiB, 512 * KiB)
    assert len(seen) == 1 and seen[0][1] == 512 * KiB, [s[:3] for s in seen]

    # Many reads in flight at once, over the mixed region.
    pending = []
    for i in range(64):
        offset = 1 * MiB - 64 * KiB + (i % 16) * 16 * KiB
        buf = nbd.Buffer(128 * KiB)
        cookie = h.aio_pread_structured(buf, offset, lambda *a: 0)
        pending.append((cookie, buf, offset))
    for cookie, buf, offset in pending:
        while not h.aio_command_completed(cookie):
            h.poll(1000)
        assert buf.to_bytearray() == expected(offset, 128 * KiB), "aio read at %d" % offset

    # Without structured replies: plain simple replies, same bytes.
    s = nbd.NBD()
    s.set_request_structured_replies(False)
    s.connect_unix(socket)
    assert not s.get_structured_replies_negotiated()
    assert s.pread(512 * KiB, 1 * MiB) == expected(1 * MiB, 512 * KiB)
    assert s.pread(MiB, 8 * MiB) == bytes(MiB)
    for handle in (h, u, s):
        handle.shutdown()
    print("sparse reads ok (%s)" % kind)


if __name__ == "__main__":
    main()
