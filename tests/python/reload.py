#!/usr/bin/python3
"""SIGHUP reload seen by real clients.

Usage: reload.py SOCKET CONFIG PID NEW_CONFIG_TEXT
An existing client of export "a" keeps working after a reload removes "a" and adds "b"; a new
client can use "b"; "a" is no longer offered.
"""

import os
import signal
import sys
import time

import nbd

from nbdtest import connect


def main():
    sock, config, pid, new_text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    old = connect(sock, export="a")
    old.pwrite(b"1" * 4096, 0)
    with open(config, "w") as f:
        f.write(new_text)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while True:
        try:
            new = connect(sock, export="b")
            break
        except nbd.Error:
            assert time.monotonic() < deadline, "export b never appeared after SIGHUP"
            time.sleep(0.1)
    new.pwrite(b"b" * 4096, 0)
    assert new.pread(4096, 0) == b"b" * 4096
    old.pwrite(b"2" * 4096, 4096)
    assert old.pread(8192, 0) == b"1" * 4096 + b"2" * 4096, "the running client lost its export"
    try:
        connect(sock, export="a")
        raise AssertionError("removed export a is still offered")
    except nbd.Error as e:
        assert "no export" in e.string or "unknown" in e.string.lower(), e.string
    print("reload ok")


if __name__ == "__main__":
    main()
