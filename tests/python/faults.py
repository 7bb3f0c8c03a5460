#!/usr/bin/python3
"""Fault injection seen by a real client (python3-libnbd), driven through the control socket.

Usage: faults.py MODE SOCKET CONTROL [SEED]
  errors  the server runs with --fault error:write:errno=ENOSPC,every=2
  delay   a delayed read does not hold back a later one on the same connection
  power   --power-loss drop: flushed and FUA writes survive a cut, unflushed ones do not
  torn    --power-loss torn: prints which of 64 unflushed sectors survived a cut with SEED
  per-export  rules from the config file ([[export]] faults) and from --fault EXPORT@RULE
"""

import socket
import sys
import time

import nbd

from nbdtest import connect, drain, expect_errno

SECTOR = 512


def control(path, command):
    """Sends one control command; returns the reply text after 'ok ' (asserts success)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall((command + "\n").encode())
        reply = s.makefile().readline().strip()
    assert reply.startswith("ok"), "control %r answered %r" % (command, reply)
    return reply[3:]


def errors(sock, ctl):
    h = connect(sock)
    outcomes = []
    for i in range(4):
        try:
            h.pwrite(b"w" * 4096, i * 4096)
            outcomes.append("ok")
        except nbd.Error as e:
            outcomes.append(e.errno)
    assert outcomes == ["ok", "ENOSPC", "ok", "ENOSPC"], outcomes
    assert h.pread(4096, 0) == b"w" * 4096, "reads are not affected by a write rule"
    assert "injected=2" in control(ctl, "show -")
    control(ctl, "faults -")
    for i in range(4):
        h.pwrite(b"v" * 4096, i * 4096)
    control(ctl, "state - failing")
    expect_errno("read on a failing device", "EIO", h.pread, 4096, 0)
    expect_errno("flush on a failing device", "EIO", h.flush)
    control(ctl, "state - readonly")
    expect_errno("write on a read-only device", "EPERM", h.pwrite, b"x" * 4096, 0)
    assert h.pread(4096, 0) == b"v" * 4096
    control(ctl, "state - normal")
    h.pwrite(b"u" * 4096, 0)
    assert h.pread(4096, 0) == b"u" * 4096, "normal operation resumes"
    control(ctl, "faults - error:read:range=8192-12288,errno=EIO,count=1")
    assert h.pread(4096, 0) == b"u" * 4096, "outside the range"
    expect_errno("read in the range", "EIO", h.pread, 4096, 8192)
    assert h.pread(4096, 8192) == b"v" * 4096, "count=1: the rule is spent"
    print("errors ok")


def delay(sock, ctl):
    h = connect(sock)
    h.pwrite(b"d" * 8192, 0)
    control(ctl, "faults - delay:read:ms=400,range=0-4096")
    order = []

    def done(name):
        def callback(error):
            order.append((name, time.monotonic()))
            return 1
        return callback

    buf_slow, buf_fast = nbd.Buffer(4096), nbd.Buffer(4096)
    started = time.monotonic()
    h.aio_pread(buf_slow, 0, completion=done("slow"))
    h.aio_pread(buf_fast, 4096, completion=done("fast"))
    drain(h)
    names = [name for name, _ in order]
    assert names == ["fast", "slow"], "the delayed read held back the other one: %s" % names
    slow_at = dict(order)["slow"] - started
    assert slow_at >= 0.39, "delay not applied (%.3f s)" % slow_at
    assert buf_slow.to_bytearray() == b"d" * 4096 and buf_fast.to_bytearray() == b"d" * 4096
    control(ctl, "faults -")
    print("delay ok")


def power(sock, ctl):
    h = connect(sock)
    h.pwrite(b"A" * 4096, 0)
    h.flush()
    h.pwrite(b"B" * 4096, 4096)
    h.pwrite(b"C" * 4096, 8192, nbd.CMD_FLAG_FUA)
    h.pwrite(b"D" * 4096, 12288)
    h.pwrite(b"E" * 512, 12288 + 1024, nbd.CMD_FLAG_FUA)
    assert "unflushed_bytes=" in control(ctl, "show -")
    reply = control(ctl, "cut -")
    assert "reverted_sectors=" in reply, reply
    try:
        h.pread(4096, 0)
        raise AssertionError("the connection survived the power cut")
    except nbd.Error:
        pass
    g = connect(sock)
    assert g.pread(4096, 0) == b"A" * 4096, "flushed write lost"
    assert g.pread(4096, 4096) == b"\0" * 4096, "unflushed write survived a drop-mode cut"
    assert g.pread(4096, 8192) == b"C" * 4096, "FUA write lost"
    tail = g.pread(4096, 12288)
    assert tail[1024:1536] == b"E" * 512, "FUA sector lost"
    assert tail[:1024] == b"\0" * 1024 and tail[1536:] == b"\0" * 2560, "unflushed bytes kept"
    g.pwrite(b"F" * 4096, 4096)
    g.flush()
    assert g.pread(4096, 4096) == b"F" * 4096, "the export works again after the cut"
    print("power ok")


def per_export(sock, ctl):
    """Export a has a config-file rule (writes: ENOSPC), export b a CLI b@ rule (reads: EIO)."""
    a, b = connect(sock, export="a"), connect(sock, export="b")
    expect_errno("write on a", "ENOSPC", a.pwrite, b"a" * 4096, 0)
    assert a.pread(4096, 0) == b"\0" * 4096, "reads on a are not affected"
    b.pwrite(b"b" * 4096, 0)
    expect_errno("read on b", "EIO", b.pread, 4096, 0)
    assert "seed=77" in control(ctl, "show a"), "the config file's seed"
    print("per-export ok")


def torn(sock, ctl, seed):
    h = connect(sock)
    h.pwrite(b"\x11" * (64 * SECTOR), 0)
    h.flush()
    h.pwrite(b"\x22" * (64 * SECTOR), 0)
    control(ctl, "cut - torn seed=%d" % seed)
    g = connect(sock)
    data = g.pread(64 * SECTOR, 0)
    bitmap = ""
    for i in range(64):
        sector = data[i * SECTOR:(i + 1) * SECTOR]
        assert sector in (b"\x11" * SECTOR, b"\x22" * SECTOR), "sector %d is torn inside" % i
        bitmap += "1" if sector[0] == 0x22 else "0"
    print(bitmap)


if __name__ == "__main__":
    mode, sock, ctl = sys.argv[1:4]
    if mode == "torn":
        torn(sock, ctl, int(sys.argv[4]))
    else:
        modes = {"errors": errors, "delay": delay, "power": power, "per-export": per_export}
        modes[mode](sock, ctl)
