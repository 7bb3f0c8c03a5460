"""Helpers shared by the python3-libnbd test scripts (run by tests/*.rs).

Data layout contract with tests/common/mod.rs `pattern()`: every 8-byte little-endian word
holds its own byte offset XOR a 64-bit seed, so any 8-byte aligned range can be recomputed.
"""

import array
import sys
import time

import nbd

assert sys.byteorder == "little", "pattern() assumes a little-endian host"


def pattern(offset, length, seed):
    """Bytes of the deterministic pattern at [offset, offset + length)."""
    assert offset % 8 == 0 and length % 8 == 0
    words = array.array("Q", range(offset, offset + length, 8)).tobytes()
    if seed == 0:
        return words
    key = seed.to_bytes(8, "little") * (length // 8)
    mixed = int.from_bytes(words, "little") ^ int.from_bytes(key, "little")
    return mixed.to_bytes(length, "little")


def connect(socket, export="", meta=True, block_size=True):
    """A libnbd handle connected to EXPORT on a unix SOCKET.

    block_size=False: do not request NBD_INFO_BLOCK_SIZE and disable libnbd's alignment
    checks, i.e. behave like a client that ignores block size constraints (the server must
    still serve it).
    """
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    if not block_size:
        h.set_request_block_size(False)
        h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
    h.set_export_name(export)
    h.connect_unix(socket)
    return h


def expect_errno(what, name, fn, *args):
    """Runs fn(*args) and asserts it fails with errno NAME (e.g. "EINVAL")."""
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errno == name, "%s: expected %s, got %s (%s)" % (what, name, e.errno, e)
        return
    raise AssertionError("%s: expected %s, but it succeeded" % (what, name))


def drain(h, deadline_s=60):
    """Polls until no command is in flight, bounded in time."""
    deadline = time.monotonic() + deadline_s
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, "commands still in flight after %ss" % deadline_s
        h.poll(1000)


def extents(h, length, offset, flags=0):
    """base:allocation extents as a list of (length, flags)."""
    found = []

    def callback(metacontext, off, entries, err):
        if metacontext == "base:allocation":
            found.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, callback, flags)
    return found


def state_at(h, offset, length):
    """The base:allocation flags covering [offset, offset + length) (must be uniform)."""
    covered = 0
    states = set()
    for ext_len, flags in extents(h, length, offset):
        states.add(flags)
        covered += ext_len
        if covered >= length:
            break
    assert covered >= length, "extents cover only %d of %d bytes" % (covered, length)
    return states
