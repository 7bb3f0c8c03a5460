#!/usr/bin/env python3
"""Regenerates the seed corpus in fuzz/seeds/ (valid handshakes and request streams).

handshake seeds: 8 bytes of split seed (little-endian u64), then client bytes.
decode_request seeds: 1 selector byte (index into validate::harness::contexts()), then
request headers and payloads.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
FIXED, NO_ZEROES = 1, 2
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, SR, LIST_META, SET_META, EH = 1, 2, 3, 5, 6, 7, 8, 9, 10, 11


def opt(option, payload=b""):
    return struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload


def info(name, infos=()):
    name = name.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta(name, queries=()):
    name = name.encode()
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def handshake(seed, flags, *options):
    return struct.pack("<Q", seed) + struct.pack(">I", flags) + b"".join(options)


HANDSHAKES = {
    "go_simple": handshake(1, FIXED, opt(GO, info("disk"))),
    "export_name_no_zeroes": handshake(2, FIXED | NO_ZEROES, opt(EXPORT_NAME, b"")),
    "everything_extended": handshake(
        3, FIXED | NO_ZEROES,
        opt(LIST), opt(LIST, b"junk"), opt(STARTTLS), opt(0x4242, b"\x01" * 300),
        opt(INFO, info("ro", [1])), opt(LIST_META, meta("disk")), opt(SR),
        opt(LIST_META, meta("disk", ["base:"])), opt(SET_META, meta("disk", ["base:allocation"])),
        opt(EH), opt(INFO, info("nope")), opt(GO, info("disk", [2, 3]))),
    "structured_set_meta_go": handshake(
        4, FIXED, opt(SR), opt(SET_META, meta("disk", ["base:allocation", "x-y:z"])),
        opt(GO, info("disk", [3]))),
    "abort_with_payload": handshake(5, FIXED, opt(SR), opt(ABORT, b"bye")),
    "list_payload_then_go": handshake(6, FIXED, opt(LIST, b"x" * 9), opt(GO, info(""))),
    "shutdown_then_abort": handshake(0xFF, FIXED, opt(LIST), opt(GO, info("disk")), opt(ABORT)),
    "info_bad_name_length": handshake(
        7, FIXED, opt(INFO, struct.pack(">I", 100) + b"ro\0\0"), opt(EXPORT_NAME, b"ro")),
    # Low seed byte 0xFE: forced TLS; 0xFD: selective TLS with a restrictive gate.
    "forced_tls_refusals": handshake(
        0xFE, FIXED, opt(LIST), opt(GO, info("disk")), opt(STARTTLS, b"x"), opt(STARTTLS)),
    "selective_tls_gate": handshake(
        0xFD, FIXED, opt(LIST), opt(INFO, info("disk")), opt(GO, info("ro")), opt(SR),
        opt(LIST_META, meta("disk")), opt(GO, info("")), opt(STARTTLS)),
}

REQUEST, EXTENDED_REQUEST = 0x25609513, 0x21E41C71
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = (1 << i for i in range(6))


def req(command, flags=0, offset=0, length=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQUEST, flags, command, cookie, offset, length) + payload


def ext(command, flags=0, offset=0, length=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST, flags, command, cookie, offset, length) + payload


# Selector indices: 0 disk/simple, 2 disk/structured+base:allocation,
# 4 disk/extended+base:allocation, 5 ro/simple (see validate::harness::contexts()).
REQUESTS = {
    "simple_all_commands": bytes([0]) + req(READ, 0, 0, 4096) + req(WRITE, FUA, 512, 512,
        payload=b"\xab" * 512) + req(FLUSH) + req(TRIM, 0, 0, 1 << 20) + req(WZ, NO_HOLE, 4096, 4096)
        + req(CACHE, 0, 0, 8192) + req(DISC),
    "structured_block_status": bytes([2]) + req(READ, DF, 0, 65536) + req(BS, REQ_ONE, 0, 1 << 30)
        + req(WRITE, 0, 1 << 30, 512, payload=b"\0" * 512) + req(0x77, 0, 0, 1 << 31)
        + req(WZ, FAST_ZERO, 0, 1 << 20),
    "extended_payload_len": bytes([4]) + ext(WRITE, PAYLOAD_LEN, 0, 512, payload=b"\x11" * 512)
        + ext(BS, 0, 0, 1 << 40) + ext(READ, PAYLOAD_LEN, 0, 16, payload=b"\0" * 16)
        + ext(WZ, 0, 0, 1 << 30) + ext(WRITE, FUA, 4096, 512, payload=b"\x22" * 512)  # no PAYLOAD_LEN, as qemu 10
        + ext(DISC),
    "read_only_writes": bytes([5]) + req(WRITE, 0, 0, 4096, payload=b"\0" * 4096)
        + req(READ, 0, 0, 4096) + req(TRIM, 0, 0, 4096) + req(WZ, FAST_ZERO, 0, 4096),
    "bad_magic_after_one": bytes([0]) + req(READ, 0, 0, 512) + b"GET / HTTP/1.1\r\n",
}

for directory, seeds in (("handshake", HANDSHAKES), ("decode_request", REQUESTS)):
    os.makedirs(os.path.join(HERE, "seeds", directory), exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(HERE, "seeds", directory, name), "wb") as seed:
            seed.write(data)
