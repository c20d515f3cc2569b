"""A small Python implementation of the tether.v1 frame codec (proto/proto.h).

Used by the hostile-peer tests to speak the protocol byte for byte, including the wrong
bytes. Everything here is pure: no sockets. All integers are big-endian.
"""
import json
import struct
import zlib

VERSION = 1
SUBPROTOCOL = "tether.v1"
HEADER_SIZE = 12

# Frame types (enum proto_type)
HELLO = 1
OPEN = 2
OPEN_OK = 3
OPEN_FAIL = 4
DATA = 5
CREDIT = 6
RST = 7
PING = 8
PONG = 9
GOAWAY = 10
CONTROL = 11

TYPE_NAMES = {
    HELLO: "HELLO", OPEN: "OPEN", OPEN_OK: "OPEN_OK", OPEN_FAIL: "OPEN_FAIL", DATA: "DATA",
    CREDIT: "CREDIT", RST: "RST", PING: "PING", PONG: "PONG", GOAWAY: "GOAWAY",
    CONTROL: "CONTROL",
}

FLAG_FIN = 0x0001

# Error codes (enum proto_code)
CODE_OK = 0
CODE_PROTOCOL = 1
CODE_FLOW = 2
CODE_STREAM_LIMIT = 3
CODE_REFUSED = 4
CODE_UNREACHABLE = 5
CODE_TIMEOUT = 6
CODE_UNSUPPORTED = 7
CODE_FORBIDDEN = 8
CODE_INTERNAL = 9
CODE_CANCEL = 10
CODE_SHUTDOWN = 11
CODE_REPLACED = 12

# OPEN kinds
KIND_TCP = 1
KIND_SSH = 2
KIND_PTY = 3

# HELLO settings
SETTING_MAX_FRAME_PAYLOAD = 1
SETTING_INITIAL_WINDOW = 2
SETTING_MAX_STREAMS = 3

# Limits
DEFAULT_FRAME_PAYLOAD = 64 * 1024
DEFAULT_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
MAX_CONTROL = 1024 * 1024
DEFAULT_MAX_STREAMS = 1024
PING_SIZE = 8

_HDR = struct.Struct(">BBHII")


class ProtoError(Exception):
    pass


def header(ftype, flags, stream, length, version=VERSION):
    """Packs a 12-byte header; no validation, so tests can build wrong ones."""
    return _HDR.pack(version, ftype, flags, stream, length)


def frame(ftype, stream=0, payload=b"", flags=0, version=VERSION):
    return header(ftype, flags, stream, len(payload), version) + payload


def unpack_header(buf, off=0):
    """Returns (version, type, flags, stream, length)."""
    if len(buf) - off < HEADER_SIZE:
        raise ProtoError("short header")
    return _HDR.unpack_from(buf, off)


class Frame:
    __slots__ = ("type", "flags", "stream", "payload")

    def __init__(self, ftype, flags, stream, payload):
        self.type = ftype
        self.flags = flags
        self.stream = stream
        self.payload = payload

    @property
    def name(self):
        return TYPE_NAMES.get(self.type, "UNKNOWN(%d)" % self.type)

    @property
    def fin(self):
        return bool(self.flags & FLAG_FIN)

    def reason(self):
        """(code, text) of OPEN_FAIL or RST."""
        return decode_reason(self.payload)

    def goaway(self):
        """(last_stream, code, text) of GOAWAY."""
        return decode_goaway(self.payload)

    def credit(self):
        return decode_credit(self.payload)

    def control(self):
        return json.loads(self.payload.decode("utf-8"))

    def hello(self):
        return decode_hello(self.payload)

    def __repr__(self):
        extra = ""
        if self.type in (OPEN_FAIL, RST):
            extra = " %r" % (self.reason(),)
        elif self.type == GOAWAY:
            extra = " %r" % (self.goaway(),)
        elif self.type == CREDIT:
            extra = " offset=%d" % self.credit()
        elif self.type == DATA:
            extra = " len=%d%s" % (len(self.payload), " FIN" if self.fin else "")
        elif self.type == CONTROL:
            extra = " %s" % self.payload[:200]
        return "<%s stream=%d%s>" % (self.name, self.stream, extra)


def parse_message(msg):
    """Splits one binary websocket message into frames. A frame may not span messages."""
    frames = []
    off = 0
    n = len(msg)
    while off < n:
        if n - off < HEADER_SIZE:
            raise ProtoError("message ends inside a header")
        ver, ftype, flags, stream, length = _HDR.unpack_from(msg, off)
        if ver != VERSION:
            raise ProtoError("bad version %d" % ver)
        off += HEADER_SIZE
        if n - off < length:
            raise ProtoError("message ends inside a payload")
        frames.append(Frame(ftype, flags, stream, bytes(msg[off:off + length])))
        off += length
    return frames


# ---- payloads ----

def encode_hello(max_frame_payload=DEFAULT_FRAME_PAYLOAD, initial_window=DEFAULT_WINDOW,
                 max_streams=DEFAULT_MAX_STREAMS):
    return (struct.pack(">HI", SETTING_MAX_FRAME_PAYLOAD, max_frame_payload) +
            struct.pack(">HI", SETTING_INITIAL_WINDOW, initial_window) +
            struct.pack(">HI", SETTING_MAX_STREAMS, max_streams))


def decode_hello(p):
    if len(p) % 6 or len(p) > 96:
        raise ProtoError("bad HELLO length")
    out = {"max_frame_payload": DEFAULT_FRAME_PAYLOAD, "initial_window": DEFAULT_WINDOW,
           "max_streams": DEFAULT_MAX_STREAMS}
    names = {SETTING_MAX_FRAME_PAYLOAD: "max_frame_payload",
             SETTING_INITIAL_WINDOW: "initial_window", SETTING_MAX_STREAMS: "max_streams"}
    for i in range(0, len(p), 6):
        sid, val = struct.unpack_from(">HI", p, i)
        if sid in names:
            out[names[sid]] = val
    return out


def hello_frame(**kw):
    return frame(HELLO, 0, encode_hello(**kw))


def encode_open_tcp(port, host="127.0.0.1"):
    h = host.encode("ascii")
    return struct.pack(">BBH", KIND_TCP, 0, 0) + struct.pack(">HB", port, len(h)) + h


def open_tcp_frame(stream, port, host="127.0.0.1"):
    return frame(OPEN, stream, encode_open_tcp(port, host))


def encode_reason(code, text=""):
    return struct.pack(">I", code) + text.encode("utf-8")


def decode_reason(p):
    if len(p) < 4:
        raise ProtoError("short reason")
    return struct.unpack_from(">I", p)[0], p[4:].decode("utf-8", "replace")


def encode_goaway(last_stream, code, text=""):
    return struct.pack(">II", last_stream, code) + text.encode("utf-8")


def decode_goaway(p):
    if len(p) < 8:
        raise ProtoError("short GOAWAY")
    last, code = struct.unpack_from(">II", p)
    return last, code, p[8:].decode("utf-8", "replace")


def encode_credit(offset):
    return struct.pack(">Q", offset)


def decode_credit(p):
    if len(p) != 8:
        raise ProtoError("CREDIT payload must be 8 bytes")
    return struct.unpack(">Q", p)[0]


def credit_frame(stream, offset):
    return frame(CREDIT, stream, encode_credit(offset))


def data_frame(stream, data=b"", fin=False):
    return frame(DATA, stream, data, FLAG_FIN if fin else 0)


def rst_frame(stream, code, text=""):
    return frame(RST, stream, encode_reason(code, text))


def ping_frame(opaque=b"\0" * 8):
    return frame(PING, 0, opaque)


def pong_frame(opaque):
    return frame(PONG, 0, opaque)


def goaway_frame(last_stream, code, text=""):
    return frame(GOAWAY, 0, encode_goaway(last_stream, code, text))


def control_frame(obj):
    if isinstance(obj, (bytes, bytearray)):
        payload = bytes(obj)
    else:
        payload = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return frame(CONTROL, 0, payload)


def agent_hello_control(version="0.0-hostile", hostname="hostile", os_="linux", arch="x86_64"):
    return control_frame({"type": "hello", "version": version, "os": os_, "arch": arch,
                          "hostname": hostname, "capabilities": ["tcp"]})


def manifest_control(workspace):
    return control_frame({"type": "manifest", "workspace": workspace})


# ---- pty streams (PROTOCOL.md 3.2) ----

PTY_ID_SIZE = 16
PTY_OPT_ZLIB = 0x01
MAX_PTY_COMMAND = 4096
PTYREC_DATA = 1
PTYREC_RESIZE = 2
PTYREC_EXIT = 3
PTYREC_MAX_BODY = 65535


def encode_open_pty(pty_id, rows, cols, options=PTY_OPT_ZLIB, command=b""):
    """OPEN pty payload; no validation, so tests can build wrong ones."""
    if isinstance(command, str):
        command = command.encode("utf-8")
    return (struct.pack(">BBH", KIND_PTY, 0, 0) + bytes(pty_id) +
            struct.pack(">HHBBH", rows, cols, options, 0, len(command)) + command)


def decode_open(p):
    """An OPEN payload as a dict: kind, and port/host (tcp) or id/rows/cols/options/command
    (pty, command as bytes)."""
    if len(p) < 4:
        raise ProtoError("short OPEN")
    kind, flags, reserved = struct.unpack_from(">BBH", p)
    out = {"kind": kind, "flags": flags, "reserved": reserved}
    body = p[4:]
    if kind == KIND_TCP:
        port, hl = struct.unpack_from(">HB", body)
        out.update(port=port, host=body[3:3 + hl].decode("ascii"))
    elif kind == KIND_PTY:
        if len(body) < 24:
            raise ProtoError("short pty OPEN")
        rows, cols, options, res, cl = struct.unpack_from(">HHBBH", body, 16)
        if len(body) != 24 + cl:
            raise ProtoError("pty OPEN: cmd_len %d, %d bytes follow" % (cl, len(body) - 24))
        out.update(id=bytes(body[:16]), rows=rows, cols=cols, options=options,
                   pty_reserved=res, command=bytes(body[24:]))
    return out


def ptyrec(rtype, body=b""):
    """One pty record: type u8, length u16, body (not checked, so tests can break rules)."""
    return struct.pack(">BH", rtype, len(body)) + bytes(body)


def ptyrec_data(data):
    """DATA records for any amount of bytes (split at PTYREC_MAX_BODY)."""
    return b"".join(ptyrec(PTYREC_DATA, data[i:i + PTYREC_MAX_BODY])
                    for i in range(0, len(data), PTYREC_MAX_BODY))


def ptyrec_resize(rows, cols):
    return ptyrec(PTYREC_RESIZE, struct.pack(">HH", rows, cols))


def ptyrec_exit(value, signal=False):
    return ptyrec(PTYREC_EXIT, bytes([1 if signal else 0, value]))


class PtyRecords:
    """Reassembles records from a pty stream's bytes (inflated first when zlib is on).
    feed() returns the complete records as (type, body) tuples."""

    def __init__(self, use_zlib=True):
        self.z = zlib.decompressobj() if use_zlib else None
        self.buf = bytearray()

    def feed(self, data):
        if self.z is not None:
            data = self.z.decompress(data)
        self.buf += data
        out = []
        while len(self.buf) >= 3:
            rtype, n = struct.unpack_from(">BH", self.buf)
            if len(self.buf) < 3 + n:
                break
            out.append((rtype, bytes(self.buf[3:3 + n])))
            del self.buf[:3 + n]
        return out

    @property
    def partial(self):
        """Bytes of a record not complete yet."""
        return len(self.buf)


class PtyDeflater:
    """The sending side of a pty stream with zlib: each chunk() ends with Z_SYNC_FLUSH."""

    def __init__(self, level=6, wbits=15):
        self.z = zlib.compressobj(level, zlib.DEFLATED, wbits)

    def chunk(self, data):
        return self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)


def _selftest():
    # The worked examples of PROTOCOL.md section 15.
    assert hello_frame().hex() == (
        "010100000000000000000012" "000100010000" "000200040000" "000300000400")
    assert open_tcp_frame(2, 8080).hex() == (
        "010200000000000200000010" "01000000" "1f90" "09" + b"127.0.0.1".hex())
    assert frame(OPEN_FAIL, 2, encode_reason(CODE_REFUSED, "connection refused")).hex() == (
        "010400000000000200000016" "00000004" + b"connection refused".hex())
    assert data_frame(2, b"hello", fin=True).hex() == "010500010000000200000005" + b"hello".hex()
    assert credit_frame(2, 393216).hex() == "010600000000000200000008" "0000000000060000"
    fs = parse_message(hello_frame() + data_frame(2, b"hello", fin=True))
    assert [f.type for f in fs] == [HELLO, DATA] and fs[1].fin and fs[1].payload == b"hello"
    assert fs[0].hello()["initial_window"] == DEFAULT_WINDOW
    pid = bytes(range(1, 17))
    o = decode_open(encode_open_pty(pid, 24, 80, PTY_OPT_ZLIB, "top"))
    assert (o["kind"], o["id"], o["rows"], o["cols"], o["options"], o["command"]) == (
        KIND_PTY, pid, 24, 80, PTY_OPT_ZLIB, b"top")
    d = PtyDeflater()
    r = PtyRecords()
    wire = d.chunk(ptyrec_data(b"x" * 70000) + ptyrec_exit(9, signal=True))
    recs = r.feed(wire[:5]) + r.feed(wire[5:])
    assert [(t, len(b)) for t, b in recs] == [(1, 65535), (1, 4465), (3, 2)] and not r.partial


_selftest()
