#!/usr/bin/python3
"""TLS close_notify without NBD_CMD_DISC, from OpenSSL (Python's ssl module).

Usage: ktls_close_notify.py PORT EXPORT CERT_DIR

A raw NBD client (fixed newstyle, NBD_OPT_STARTTLS, NBD_OPT_GO, simple replies) over
Python's ssl module, i.e. OpenSSL: a TLS stack independent of GnuTLS (libnbd) and of rustls
(the server). CERT_DIR holds ca-cert.pem, client-cert.pem and client-key.pem.

libnbd always sends NBD_CMD_DISC before its close_notify, and the server stops reading after
DISC. These clients end with close_notify alone, while the server is still reading: on a
kernel TLS socket that record makes the server's plain recv fail (EIO). Checks:
1. Connection K (TLS 1.3) writes 64 KiB and reads it back.
2. Connections with TLS 1.3 and TLS 1.2 each read K's data, then send close_notify (unwrap);
   the server must close the TCP connection (EOF) within the socket timeout.
3. K still works afterwards (the server kept serving), then ends with DISC and close_notify.
Prints "close_notify ok" at the end.
"""

import os
import socket
import ssl
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_STARTTLS = 5
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
TIMEOUT_S = 30
CHUNK = 64 * 1024


def recv_exact(sock, length):
    data = bytearray()
    while len(data) < length:
        got = sock.recv(length - len(data))
        assert got, "EOF after %d of %d bytes" % (len(data), length)
        data += got
    return bytes(data)


def send_option(sock, option, data=b""):
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def option_reply(sock, option):
    magic, got, kind, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == OPT_REPLY_MAGIC and got == option, "bad option reply %x %d" % (magic, got)
    return kind, recv_exact(sock, length)


def connect(port, export, cert_dir, version):
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    magic, ihaveopt, _flags = struct.unpack(">QQH", recv_exact(raw, 18))
    assert magic == NBDMAGIC and ihaveopt == IHAVEOPT, "not a newstyle NBD server"
    raw.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    send_option(raw, OPT_STARTTLS)
    kind, _ = option_reply(raw, OPT_STARTTLS)
    assert kind == REP_ACK, "STARTTLS refused: %d" % kind
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(cert_dir, "ca-cert.pem"))
    context.load_cert_chain(
        os.path.join(cert_dir, "client-cert.pem"), os.path.join(cert_dir, "client-key.pem")
    )
    context.minimum_version = version
    context.maximum_version = version
    tls = context.wrap_socket(raw, server_hostname="localhost")
    assert tls.version() == {
        ssl.TLSVersion.TLSv1_3: "TLSv1.3",
        ssl.TLSVersion.TLSv1_2: "TLSv1.2",
    }[version], tls.version()
    name = export.encode()
    send_option(tls, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = None
    while True:
        kind, data = option_reply(tls, OPT_GO)
        if kind == REP_INFO:
            if struct.unpack(">H", data[:2])[0] == 0:  # NBD_INFO_EXPORT
                size = struct.unpack(">Q", data[2:10])[0]
        elif kind == REP_ACK:
            break
        else:
            raise AssertionError("NBD_OPT_GO failed: reply type %#x %r" % (kind, data))
    assert size is not None and size >= CHUNK, "export size %r" % size
    return tls


def request(sock, command, handle, offset, length, payload=b""):
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, handle, offset, length)
    sock.sendall(header + payload)


def simple_reply(sock, handle):
    magic, error, got = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC and got == handle, "bad reply %x %d" % (magic, got)
    assert error == 0, "request %d failed: error %d" % (handle, error)


def read(sock, handle, offset, length):
    request(sock, CMD_READ, handle, offset, length)
    simple_reply(sock, handle)
    return recv_exact(sock, length)


def write(sock, handle, offset, data):
    request(sock, CMD_WRITE, handle, offset, len(data), data)
    simple_reply(sock, handle)


def close_notify_and_expect_eof(tls):
    """Sends close_notify and waits for the server to drop the connection."""
    try:
        raw = tls.unwrap()
    except TimeoutError:
        raise AssertionError("the server neither answered nor closed after close_notify")
    except (ssl.SSLError, ConnectionError):
        return  # OpenSSL saw the server close the TCP connection while waiting for its alert
    try:
        assert raw.recv(1) == b"", "data after close_notify"
    except ConnectionResetError:
        pass
    raw.close()


def main():
    port, export, cert_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = os.urandom(CHUNK)
    keep = connect(port, export, cert_dir, ssl.TLSVersion.TLSv1_3)
    write(keep, 1, 0, data)
    assert read(keep, 2, 0, CHUNK) == data, "K: read back"
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        tls = connect(port, export, cert_dir, version)
        assert read(tls, 3, 0, CHUNK) == data, "%s: read" % version
        close_notify_and_expect_eof(tls)
    assert read(keep, 4, 0, CHUNK) == data, "K: read after the others left"
    request(keep, CMD_DISC, 5, 0, 0)
    close_notify_and_expect_eof(keep)
    print("close_notify ok")


if __name__ == "__main__":
    main()
