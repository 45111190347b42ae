#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/) from well-formed sessions.

Each seed starts with the harness's selector byte (see harness.rs). Run it
again after changing the harness's input format; the fuzzer's own finds are
not kept in the repository, only these seeds and fuzz/regressions/.
"""
import os, struct

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
EXT_REQ = 0x21E41C71
(EXPORT_NAME, ABORT, LIST, PEEK, STARTTLS, INFO, GO, STRUCTURED, LIST_META, SET_META, EXTENDED) = range(1, 12)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = (1 << i for i in range(6))


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def info(name=b"", reqs=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(name=b"", queries=(b"base:allocation",)):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def req(cmd, off=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, off, length) + payload


def ereq(cmd, off=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EXT_REQ, flags, cmd, cookie, off, length) + payload


FLAGS = struct.pack(">I", 3)
SESSION = (req(WRITE, 4096, 8192, FUA, 1, b"\xab" * 8192) + req(READ, 0, 65536, 0, 2)
           + req(READ, 0, 16384, DF, 3) + req(BS, 0, 1 << 20, 0, 4) + req(BS, 0, 1 << 20, REQ_ONE, 5)
           + req(TRIM, 4096, 4096, 0, 6) + req(WZ, 0, 8192, NO_HOLE, 7) + req(WZ, 8192, 4096, FAST_ZERO, 8)
           + req(CACHE, 0, 4096, 0, 9) + req(FLUSH, 0, 0, 0, 10) + req(READ, (1 << 20) - 1, 2, 0, 11)
           + req(WRITE, 0, 3, 1 << 9, 12, b"abc") + req(99, 0, 1, 0, 13) + req(DISC))
EXT_SESSION = (ereq(WRITE, 4096, 4, PAYLOAD_LEN, 1, b"wxyz") + ereq(WRITE, 8192, 4, 0, 2, b"abcd")
               + ereq(TRIM, 0, 3, PAYLOAD_LEN, 3, b"xyz") + ereq(READ, 0, 16384, 0, 4)
               + ereq(READ, 0, 16384, DF, 5) + ereq(BS, 0, 1 << 20, 0, 6) + ereq(BS, 0, 1 << 40, 0, 7)
               + ereq(WZ, 0, 4096, 0, 8) + ereq(DISC))

option_seeds = {
    "list-abort": b"\x00" + FLAGS + opt(LIST) + opt(ABORT),
    "info-go": b"\x00" + FLAGS + opt(INFO, info(b"x", (1, 2, 3))) + opt(GO, info(b"x", (1, 2, 3))) + req(DISC),
    "structured-meta-go": b"\x00" + FLAGS + opt(STRUCTURED) + opt(LIST_META, meta(queries=()))
    + opt(SET_META, meta()) + opt(GO, info()) + SESSION,
    "extended-go": b"\x00" + FLAGS + opt(EXTENDED) + opt(SET_META, meta()) + opt(GO, info()) + EXT_SESSION,
    "export-name": b"\x00" + struct.pack(">I", 1) + opt(EXPORT_NAME, b"name") + req(DISC),
    "bad-options": b"\x00" + FLAGS + opt(99, b"junk") + opt(PEEK) + opt(INFO, b"\x00\x00") + opt(SET_META, meta())
    + opt(STRUCTURED, b"x") + opt(LIST, b"x") + opt(STARTTLS) + opt(GO, info()),
    "tls-offered": b"\x01" + FLAGS + opt(STARTTLS),
    "tls-required": b"\x02" + FLAGS + opt(LIST) + opt(GO, info()) + opt(STARTTLS),
    "open-fails": bytes([OPEN_FAILS := 1 << 4]) + FLAGS + opt(INFO, info()) + opt(GO, info()) + opt(ABORT),
    "dribbled": bytes([1 << 2]) + FLAGS + opt(STRUCTURED) + opt(GO, info()) + SESSION,
    "broken-pipe": bytes([1 << 3]) + FLAGS + opt(LIST) * 64 + opt(GO, info()) + SESSION,
}
request_seeds = {
    "simple": b"\x00" + SESSION,
    "structured": b"\x01" + SESSION,
    "structured-meta": b"\x02" + SESSION,
    "extended": b"\x03" + EXT_SESSION,
    "dribbled-meta": bytes([2 | 1 << 2]) + SESSION,
    "broken-pipe": bytes([2 | 1 << 3]) + SESSION * 4,
    "oversized-write": b"\x00" + req(WRITE, 0, 0xFFFFFFFF, 0, 1),
    "drained-write": b"\x02" + req(WRITE, 0, (32 << 20) + 1, 0, 1) + b"\x00" * 4096,
    "bad-magic": b"\x01" + req(READ, 0, 512)[:3] + b"\x00" * 25,
    "extended-huge": b"\x03" + ereq(READ, 0, 1 << 62, 0, 1) + ereq(BS, 1 << 63, 1 << 63, REQ_ONE, 2)
    + ereq(WRITE, 0, 1 << 40, PAYLOAD_LEN, 3),
}

# Export names, as a client writes them (no selector byte).
name_seeds = {
    "default": b"",
    "plain": b"scratch",
    "chosen": b"scratch:size=16G:type=ext4:label=build",
    "default-chosen": b":size=2G",
    "over-limit": b"scratch:size=65G",
    "fixed-chosen": b"fixed:type=xfs",
    "unknown": b"nosuch",
    "twice": b"scratch:size=1G:size=2G",
    "bad-key": b"scratch:colour=red",
    "shell": b"scratch:type=x$(reboot)",
    "escape": b"scr\x1b[2Jatch",
    "long-label": b"scratch:type=xfs:label=" + b"L" * 300,
    "long": b"s" * 4096,
}

# The reconnect handover: selector byte, then the message.
KEY = bytes(range(32))
def offer(kind, size, leaves, waited=1500):
    return b"TDHO" + bytes([1, kind]) + struct.pack(">QQQ", size, leaves, waited)
leaf = struct.pack(">Q", 3) + b"\xff" * 4096
handover_seeds = {
    "request": b"\x00" + b"TDRQ\x01" + KEY,
    "request-short": b"\x00" + b"TDRQ\x01" + KEY[:10],
    "offer-image": b"\x02" + offer(0, 1 << 30, 0),
    "offer-overlay": b"\x03" + offer(1, 1 << 30, 8),
    "offer-too-many-leaves": b"\x03" + offer(1, 1 << 30, 9),
    "offer-huge": b"\x03" + offer(1, (1 << 63) - 1, 1 << 40),
    "map": b"\x04" + (1 << 30).to_bytes(5, "big") + leaf,
    "map-out-of-order": b"\x04" + (1 << 30).to_bytes(5, "big") + leaf + leaf,
}

# PROXY protocol headers (no selector byte), then what a client sends.
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
v4 = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack(">HH", 51234, 10809)
proxy_seeds = {
    "v1": b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 10809\r\n\x00\x00\x00\x03",
    "v1-tcp6": b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 10809\r\n",
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-garbage": b"PROXY \xff\xfe garbage without end",
    "v2": SIG + b"\x21\x11" + struct.pack(">H", len(v4)) + v4,
    "v2-tlv": SIG + b"\x21\x11" + struct.pack(">H", len(v4) + 6) + v4 + b"\x01\x00\x03nbd",
    "v2-local": SIG + b"\x20\x00\x00\x00",
    "v2-oversized": SIG + b"\x21\x11\xff\xff" + v4,
    "v2-truncated-tlv": SIG + b"\x21\x11" + struct.pack(">H", len(v4) + 4) + v4 + b"\x01\x00\x09\x00",
}

here = os.path.dirname(os.path.abspath(__file__))
for target, seeds in (("option_phase", option_seeds), ("request_phase", request_seeds),
                      ("export_name", name_seeds), ("handover", handover_seeds),
                      ("proxy_header", proxy_seeds)):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
