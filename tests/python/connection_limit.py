#!/usr/bin/python3
"""A per-export connection limit of 1, seen by real clients.

Usage: connection_limit.py URI EXPECTED_MESSAGE

A python3-libnbd handle holds the only slot of the export at URI. A second client (nbdinfo, then
another libnbd handle) is refused, and nbdinfo's stderr contains EXPECTED_MESSAGE (empty: any
refusal). The holder keeps working. Once it disconnects, a new client gets in (bounded wait: the
server learns of the disconnect asynchronously).
"""

import subprocess
import sys
import time

import nbd

from nbdtest import pattern

CLIENT_TIMEOUT_S = 60
RELEASE_DEADLINE_S = 20


def nbdinfo_size(uri):
    return subprocess.run(
        ["nbdinfo", "--size", uri],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )


def main():
    uri, expected = sys.argv[1], sys.argv[2]
    holder = nbd.NBD()
    holder.connect_uri(uri)
    holder.pwrite(pattern(0, 4096, 7), 0)

    probe = nbdinfo_size(uri)
    assert probe.returncode != 0, "second client got in: %r" % probe.stdout
    assert expected in probe.stderr, "nbdinfo said %r, expected %r" % (probe.stderr, expected)
    second = nbd.NBD()
    try:
        second.connect_uri(uri)
        raise AssertionError("a second libnbd handle got in")
    except nbd.Error as e:
        assert expected in str(e), "libnbd said %r, expected %r" % (str(e), expected)

    assert holder.pread(4096, 0) == pattern(0, 4096, 7), "the holder lost its connection"
    holder.shutdown()
    del holder

    deadline = time.monotonic() + RELEASE_DEADLINE_S
    while True:
        after = nbd.NBD()
        try:
            after.connect_uri(uri)
            break
        except nbd.Error as e:
            assert time.monotonic() < deadline, "slot never released: %s" % e
            time.sleep(0.2)
    assert after.pread(4096, 0) == pattern(0, 4096, 7)
    after.shutdown()
    print("connection limit ok")


if __name__ == "__main__":
    main()
