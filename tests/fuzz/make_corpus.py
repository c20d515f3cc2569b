#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/{frame,control,mux,sftp}/).

Each frame seed is one websocket message as the mux receives it: whole tether.v1 frames
back to back (proto/PROTOCOL.md). Each control seed is one CONTROL payload. The files are
small and few on purpose: they only show libFuzzer the shapes; it finds the rest.

Run from anywhere: /usr/bin/python3 tests/fuzz/make_corpus.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

HELLO, OPEN, OPEN_OK, OPEN_FAIL, DATA, CREDIT, RST, PING, PONG, GOAWAY, CONTROL = range(1, 12)
FIN = 0x0001
TCP, SSH, PTY = 1, 2, 3


def frame(ftype, stream, payload=b"", flags=0, version=1):
    return struct.pack(">BBHII", version, ftype, flags, stream, len(payload)) + payload


def hello(settings=((1, 65536), (2, 262144), (3, 1024))):
    return frame(HELLO, 0, b"".join(struct.pack(">HI", i, v) for i, v in settings))


def open_tcp(stream, host, port):
    h = host.encode()
    return frame(OPEN, stream, struct.pack(">BBHHB", TCP, 0, 0, port, len(h)) + h)


def open_kind(stream, kind, body=b""):
    return frame(OPEN, stream, struct.pack(">BBH", kind, 0, 0) + body)


def reason(ftype, stream, code, text):
    return frame(ftype, stream, struct.pack(">I", code) + text.encode())


def goaway(last, code, text):
    return frame(GOAWAY, 0, struct.pack(">II", last, code) + text.encode())


def control(obj):
    return frame(CONTROL, 0, json.dumps(obj, separators=(",", ":")).encode())


AGENT_HELLO = {"type": "hello", "version": "0.1.0", "os": "linux", "arch": "amd64",
               "hostname": "ws-1", "capabilities": ["ssh", "tcp"]}
MANIFEST = {"type": "manifest", "workspace": "ws", "owner": "alice",
            "directory": "/home/alice/src", "motd": "welcome",
            "env": {"EDITOR": "vi", "LANG": "C.UTF-8"},
            "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA alice@laptop"],
            "stats_interval": 60}

FRAME_SEEDS = {
    "hello_default": hello(),
    "hello_empty": hello(()),
    "hello_unknown_setting": hello(((9, 7), (2, 16384), (0xffff, 0))),
    "open_tcp": open_tcp(2, "127.0.0.1", 8080),
    "open_tcp_v6_zone": open_tcp(4, "fe80::1%eth0", 22),
    "open_ssh": open_kind(1, SSH),
    "open_unknown_kind": open_kind(6, 4, b"\x00\x01\x00\x18\x00\x50"),
    "open_pty": open_kind(8, PTY, bytes(range(1, 17)) + struct.pack(">HHBBH", 24, 80, 1, 0, 3)
                          + b"top"),
    "pty_records": frame(DATA, 8, b"\x01\x00\x02hi" + b"\x02\x00\x04\x00\x32\x00\x84"
                         + b"\x03\x00\x02\x00\x00"),
    "stream_exchange": frame(OPEN_OK, 2) + frame(DATA, 2, b"GET / HTTP/1.0\r\n\r\n")
    + frame(CREDIT, 2, struct.pack(">Q", 262144 + 18)) + frame(DATA, 2, b"", FIN),
    "open_fail": reason(OPEN_FAIL, 2, 4, "connection refused"),
    "rst_flow": reason(RST, 3, 2, "data beyond credit"),
    "credit_big": frame(CREDIT, 5, struct.pack(">Q", 0x0102030405060708)),
    "ping_pong": frame(PING, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07")
    + frame(PONG, 0, b"\xff" * 8),
    "goaway": goaway(7, 11, "relay shutting down"),
    "agent_session": hello() + control(AGENT_HELLO),
    "relay_session": hello() + control(MANIFEST) + open_tcp(2, "localhost", 3000),
}

CONTROL_SEEDS = {
    "hello": {"type": "hello", "version": "0.1.0", "os": "linux", "arch": "amd64",
              "hostname": "ws-1"},
    "hello_caps": AGENT_HELLO,
    "manifest_min": {"type": "manifest", "workspace": "ws"},
    "manifest_full": MANIFEST,
    "shutdown": {"type": "shutdown"},
    "shutdown_reason": {"type": "shutdown", "reason": "workspace stopped"},
    "stats_unknown": {"type": "stats", "cpu": 0.25, "mem": 123456789, "sessions": {"ssh": 1},
                      "last_activity": None, "idle": False},
    "future_type": {"type": "ports", "ports": [{"port": 8080, "v6": True}], "x": [[[]], {}]},
}
# Raw texts: escapes, numbers and near-misses that json.dumps would not produce.
CONTROL_RAW = {
    "escapes": b'{"type":"shutdown","reason":"caf\\u00e9 \\ud83d\\ude00 \\"q\\" \\\\ \\/ \\t"}',
    "numbers": b'{"type":"x","a":-0,"b":1E2,"c":-1.5e-3,"d":9223372036854775807}',
    "duplicate_key": b'{"type":"shutdown","type":"hello"}',
    "not_object": b'[{"type":"shutdown"}]',
    "missing_type": b'{"kind":"shutdown"}',
    "bad_interval": b'{"type":"manifest","workspace":"w","stats_interval":86401}',
}


# Mux seeds: a first byte choosing the chunk size and whether the target feeds a HELLO
# itself (even: it does), then what a relay would send an agent after its HELLO.
MUX_SEEDS = {
    "open_data_fin": b"\x20" + open_tcp(2, "127.0.0.1", 8080) + frame(DATA, 2, b"x" * 100)
    + frame(CREDIT, 2, struct.pack(">Q", 262144 + 4096)) + frame(DATA, 2, b"", FIN),
    "refused_then_rst": b"\x06" + open_tcp(2, "127.0.0.1", 9) + open_tcp(4, "::1", 10)
    + reason(RST, 4, 10, "client went away"),
    "control_ping": b"\x40" + control(MANIFEST) + frame(PING, 0, b"12345678")
    + goaway(0, 11, "bye"),
    "own_hello": b"\x01" + hello() + open_tcp(2, "127.0.0.1", 22) + frame(DATA, 2, b"y" * 10),
    "credit_backwards": b"\x10" + open_tcp(2, "127.0.0.1", 22)
    + frame(CREDIT, 2, struct.pack(">Q", 1)),
}


# SFTP seeds (agent/sftp_wire.h): what a client writes to `tether sftp-server`, packets of
# SFTP version 3 back to back: uint32 length, type, then (but for INIT) a uint32 id.
def sftp_str(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def sftp_pkt(ptype, rid, body=b""):
    payload = struct.pack(">BI", ptype, rid) + body
    return struct.pack(">I", len(payload)) + payload


def sftp_attrs(size=None, uidgid=None, perm=None, times=None, ext=()):
    flags, body = 0, b""
    if size is not None:
        flags |= 1
        body += struct.pack(">Q", size)
    if uidgid is not None:
        flags |= 2
        body += struct.pack(">II", *uidgid)
    if perm is not None:
        flags |= 4
        body += struct.pack(">I", perm)
    if times is not None:
        flags |= 8
        body += struct.pack(">II", *times)
    if ext:
        flags |= 0x80000000
        body += struct.pack(">I", len(ext)) + b"".join(sftp_str(k) + sftp_str(v) for k, v in ext)
    return struct.pack(">I", flags) + body


SFTP_HANDLE = b"\x00\x00\x00\x00\x00\x00\x00\x01"
SFTP_INIT = sftp_pkt(1, 3)


def sftp_ext(rid, name, body=b""):
    return sftp_pkt(200, rid, sftp_str(name) + body)


SFTP_SEEDS = {
    "init": SFTP_INIT,
    "upload": SFTP_INIT + sftp_pkt(3, 1, sftp_str("f.txt") + struct.pack(">I", 0x1a)
                                    + sftp_attrs(perm=0o644))
    + sftp_pkt(6, 2, sftp_str(SFTP_HANDLE) + struct.pack(">Q", 0) + sftp_str(b"x" * 300))
    + sftp_pkt(10, 3, sftp_str(SFTP_HANDLE) + sftp_attrs(times=(1, 2)))
    + sftp_pkt(4, 4, sftp_str(SFTP_HANDLE)),
    "download": SFTP_INIT + sftp_pkt(17, 1, sftp_str("/etc/hostname"))
    + sftp_pkt(3, 2, sftp_str("/etc/hostname") + struct.pack(">I", 1) + sftp_attrs())
    + sftp_pkt(5, 3, sftp_str(SFTP_HANDLE) + struct.pack(">QI", 0, 32768))
    + sftp_pkt(5, 4, sftp_str(SFTP_HANDLE) + struct.pack(">QI", 2**63, 2**32 - 1)),
    "listing": SFTP_INIT + sftp_pkt(16, 1, sftp_str(".")) + sftp_pkt(11, 2, sftp_str("dir"))
    + sftp_pkt(12, 3, sftp_str(SFTP_HANDLE)) + sftp_pkt(8, 4, sftp_str(SFTP_HANDLE)),
    "names": SFTP_INIT + sftp_pkt(18, 1, sftp_str("a") + sftp_str("b"))
    + sftp_pkt(20, 2, sftp_str("target") + sftp_str("link")) + sftp_pkt(19, 3, sftp_str("link"))
    + sftp_pkt(13, 4, sftp_str("a")) + sftp_pkt(14, 5, sftp_str("d") + sftp_attrs(perm=0o700))
    + sftp_pkt(15, 6, sftp_str("d")) + sftp_pkt(7, 7, sftp_str("l")),
    "setstat_all": sftp_pkt(9, 1, sftp_str("f") + sftp_attrs(10, (0, 0), 0o4755, (3, 4),
                                                            (("a", "1"), ("b", "")))),
    "extensions": SFTP_INIT + sftp_ext(1, "limits@openssh.com")
    + sftp_ext(2, "statvfs@openssh.com", sftp_str("/"))
    + sftp_ext(3, "posix-rename@openssh.com", sftp_str("a") + sftp_str("b"))
    + sftp_ext(4, "hardlink@openssh.com", sftp_str("a") + sftp_str("c"))
    + sftp_ext(5, "fsync@openssh.com", sftp_str(SFTP_HANDLE))
    + sftp_ext(6, "expand-path@openssh.com", sftp_str("~/x"))
    + sftp_ext(7, "copy-data", sftp_str(SFTP_HANDLE) + struct.pack(">QQ", 0, 0)),
    "unknown_type": sftp_pkt(150, 1, b"\xff" * 8),
    "path_with_nul": sftp_pkt(17, 1, sftp_str(b"a\x00b")),
    "length_lie": struct.pack(">IBI", 100, 17, 1) + sftp_str("short"),
    "string_lie": sftp_pkt(17, 1, struct.pack(">I", 0xFFFFFFF0) + b"abc"),
    "oversized": struct.pack(">IB", 256 * 1024 + 1025, 6),
}


def write(dirname, name, data):
    path = os.path.join(HERE, "corpus", dirname)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)


def main():
    for name, data in FRAME_SEEDS.items():
        write("frame", name, data)
    for name, obj in CONTROL_SEEDS.items():
        write("control", name, json.dumps(obj, separators=(",", ":")).encode())
    for name, data in CONTROL_RAW.items():
        write("control", name, data)
    for name, data in MUX_SEEDS.items():
        write("mux", name, data)
    for name, data in SFTP_SEEDS.items():
        write("sftp", name, data)


if __name__ == "__main__":
    main()
