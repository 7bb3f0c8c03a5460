#!/usr/bin/python3
"""SIGHUP reloads the server's X.509 files while a TLS client keeps working.

Usage: tls_reload.py HOST PORT EXPORT PID CLIENT_A CLIENT_B CLIENT_MIXED SRC=DST...

The server (PID) requires client certificates and starts with CA A's files. CLIENT_A, CLIENT_B
are libnbd certificate directories of CA A and CA B; CLIENT_MIXED trusts CA B's server but
presents a CA A client certificate. Each SRC=DST replaces the server's file DST with SRC (set B)
by an atomic rename before the SIGHUP.
"""

import os
import shutil
import signal
import sys
import time

import nbd

from nbdtest import pattern

RELOAD_DEADLINE_S = 20


def tls_handle(certdir, export):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certdir)
    h.set_export_name(export)
    return h


def connect(host, port, certdir, export):
    h = tls_handle(certdir, export)
    h.connect_tcp(host, port)
    assert h.get_tls_negotiated(), "connected without TLS"
    return h


def refused(what, host, port, certdir, export):
    try:
        h = connect(host, port, certdir, export)
    except nbd.Error as e:
        return str(e)
    h.shutdown()
    raise AssertionError("%s: connected, but the server should have refused" % what)


def main():
    host, port, export, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client_a, client_b, client_mixed = sys.argv[5], sys.argv[6], sys.argv[7]
    swaps = [arg.split("=", 1) for arg in sys.argv[8:]]
    assert swaps, "no files to swap"

    old = connect(host, port, client_a, export)
    old.pwrite(pattern(0, 65536, 1), 0)
    refused("CA B before the reload", host, port, client_b, export)

    for src, dst in swaps:
        tmp = dst + ".new"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    os.kill(pid, signal.SIGHUP)

    # The reload is asynchronous: wait (bounded) until a CA B client gets in.
    deadline = time.monotonic() + RELOAD_DEADLINE_S
    while True:
        try:
            new = connect(host, port, client_b, export)
            break
        except nbd.Error as e:
            assert time.monotonic() < deadline, "CA B still refused after SIGHUP: %s" % e
            time.sleep(0.2)

    # The connection made under set A is untouched by the reload.
    assert old.pread(65536, 0) == pattern(0, 65536, 1), "old connection lost its data"
    old.pwrite(pattern(65536, 65536, 2), 65536)
    old.flush()
    assert old.pread(65536, 65536) == pattern(65536, 65536, 2)
    # The new connection sees what the old one wrote (same export).
    assert new.pread(131072, 0) == pattern(0, 65536, 1) + pattern(65536, 65536, 2)

    refused("CA A after the reload", host, port, client_a, export)
    refused("a CA A client certificate after the reload", host, port, client_mixed, export)

    new.shutdown()
    old.shutdown()
    print("tls reload ok")


if __name__ == "__main__":
    main()
