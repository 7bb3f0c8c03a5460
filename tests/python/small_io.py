"""Small READs and WRITEs only (no FLUSH, TRIM or zeroing): argv: SOCKET COUNT.

Writes COUNT 4 KiB blocks of pattern data at scattered offsets, reads each back and checks
it, with 16 commands in flight; prints "ok COUNT". Used to check that a memory export
serves small I/O without io_uring worker threads (tests/libnbd.rs).
"""

import sys

import nbdtest

socket, count = sys.argv[1], int(sys.argv[2])
h = nbdtest.connect(socket)
size = h.get_size()
blocks = size // 4096
offsets = [((i * 7919) % blocks) * 4096 for i in range(count)]
for start in range(0, count, 16):
    batch = offsets[start:start + 16]
    for o in batch:
        h.aio_pwrite(nbdtest.pattern(o, 4096, 5), o)
    nbdtest.drain(h)
for offset in offsets:
    got = h.pread(4096, offset)
    assert got == nbdtest.pattern(offset, 4096, 5), "data differs at %d" % offset
h.shutdown()
print("ok", count)
