#!/usr/bin/env python3
"""Does MSG_ZEROCOPY (what IORING_OP_SEND_ZC uses) pay on this machine's transports?

Not a test. Prints whether AF_UNIX accepts SO_ZEROCOPY, then sends 2000 x 1 MiB over
loopback TCP to a reader thread with and without MSG_ZEROCOPY (2 interleaved rounds) and
reports the sender thread's CPU per MiB and how many completion notifications said the
kernel copied the data anyway (SO_EE_CODE_ZEROCOPY_COPIED). Bounded: fixed message count.
"""
import errno
import os
import socket
import struct
import threading
import time

SO_ZEROCOPY = 60; MSG_ZEROCOPY = 0x4000000; MSG_ERRQUEUE = 0x2000
N = 2000; SZ = 1 << 20
def sink(port, total):
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(1)
    c, _ = s.accept(); got = 0; buf = bytearray(SZ)
    while got < total:
        n = c.recv_into(buf); got += n
        if n == 0: break
    c.close(); s.close()
def run(zc, port):
    t = threading.Thread(target=sink, args=(port, N * SZ)); t.start(); time.sleep(0.2)
    s = socket.create_connection(("127.0.0.1", port))
    data = bytes(os.urandom(SZ))
    copied = notif = 0
    if zc: s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    r0 = time.thread_time(); w0 = time.time()
    for i in range(N):
        s.sendall(data, MSG_ZEROCOPY if zc else 0)
        if zc:
            while True:
                try:
                    m, anc, fl, _ = s.recvmsg(0, 1024, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
                except BlockingIOError: break
                for lvl, typ, d in anc:
                    errno_, origin, typ_, code, pad, info, data_ = struct.unpack("=IBBBBII", d[:16])
                    notif += 1; copied += code & 1
    cpu = time.thread_time() - r0; wall = time.time() - w0
    s.close(); t.join()
    print("zc=%d sender thread CPU %.3f s for %d MiB (%.0f us/MiB), wall %.2f s, notifications %d (copied %d)" % (zc, cpu, N, cpu / N * 1e6, wall, notif, copied))
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    a.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    print("AF_UNIX: SO_ZEROCOPY accepted")
except OSError as e:
    print("AF_UNIX: SO_ZEROCOPY refused (%s): SEND_ZC cannot apply to unix sockets" % errno.errorcode[e.errno])
a.close()
b.close()
for rnd in range(2):
    run(False, 20000 + rnd * 2); run(True, 20001 + rnd * 2)
