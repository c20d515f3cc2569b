"""A hostile client against the relay (issue 6, item 3: the third position).

The relay's user-facing endpoints face the network: the JSON API and /metrics, the client
websockets /tcp/PORT, /ssh and /pty, and the web terminal's pages and login form. Each test
here attacks one of them the way a hostile or broken client would, with raw sockets and
hand-written websocket frames where a websocket library refuses to send malformed things,
and asserts three things:

  - the documented answer (an HTTP status, a websocket close code, or the connection closed);
  - nobody else is affected meanwhile: the API answers promptly and an echo through another
    workspace's forward (gamma) stays byte-exact;
  - the relay's RSS stays bounded (before/after, and the peak sampled meanwhile).

The last section turns the generic websocket attacks on the other two positions: against
the relay's agent endpoint (with a valid agent token) and against the agent's websocket
client (a raw TCP server that answers the upgrade and then misbehaves).

What libwebsockets 4.1.6 does on its own (tunnel/wsctx.c sets none of these but the header
limit, so lws's defaults apply; read from lws's source and measured here):
  - a connection's request headers must be complete within timeout_secs_ah_idle = 10 s of
    the connection (PENDING_TIMEOUT_HOLDING_AH, set when the header table is attached at
    accept; bytes arriving do not extend it);
  - a request body must keep arriving: each piece re-arms PENDING_TIMEOUT_HTTP_CONTENT with
    the context's timeout_secs = 5 s, so a trickle of one byte a second never trips it (the
    relay bounds bodies itself, see test_slow_body_is_cut);
  - an idle keep-alive HTTP connection is closed after keepalive_timeout = 5 s;
  - request headers are at most max_http_header_data = 16384 bytes (WSCTX_MAX_HEADER_DATA,
    set on the context: lws 4.1 ignores it on a vhost); past that lws drops the connection
    without an answer (no 414 or 431);
  - an established websocket has no timeout (lws's validity check is pushed out to 65535 s;
    the tunnel has its own keepalive, and an idle client stream is the client's business);
  - malformed frames are answered by a close 1002 with lws's reason ("bad cont", "bad opc",
    "frag ctl", "rsv bits") or by dropping the connection (control frames over 125 bytes,
    a 64-bit length with its top bit set); unmasked client frames are accepted (RFC 6455
    5.1 says close), which does no harm here.

Every loop is bounded in count and time; every socket is closed by the test that opened it.
"""
import asyncio
import base64
import hashlib
import json
import os
import random
import selectors
import socket
import struct
import threading
import time
import urllib.parse
import uuid

import pytest
import websockets
import websockets.exceptions

import tetherproto as tp
from conftest import (TcpServer, connection_closed, echo_roundtrip, free_port, proc_rss_kib,
                      wait_until, write_private)
from wspeer import Peer

MiB = 1024 * 1024
KiB = 1024

# The relay's RSS may grow by at most this much across an attack (after it, measured once
# the attacking connections are gone) ...
RSS_BOUND_KIB = 16 * 1024
# ... and by at most this much at any moment during it (sampled every 50 ms).
RSS_PEAK_BOUND_KIB = 32 * 1024
# A legitimate API request during an attack must be answered within this many seconds.
PROMPT_S = 2.0
# Connections that never finish their request headers must be closed within this many
# seconds (lws: timeout_secs_ah_idle, 10 s, plus slack for a loaded machine).
HEADER_DEADLINE_S = 20.0
# A request body that trickles in must be cut within this many seconds (the relay's own
# WEB_BODY_TIMEOUT_MS, 10 s, plus slack).
BODY_DEADLINE_S = 20.0

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

FIGURES = []  # (what, before, peak, after) in KiB, reported at the end of the module


# ---------------------------------------------------------------------------------------
# the environment: a relay with real agents for beta and gamma (module_env), an echo server
# reached through beta, and a forward through gamma that must keep working meanwhile


@pytest.fixture(scope="module")
def env(module_env):
    e = module_env
    e.gamma_forward = e.harness.forward(e.relay, "gamma", e.echo.port)
    yield e
    if FIGURES:
        lines = ["relay RSS under attack (KiB): before / peak / after (growth)"]
        for what, before, peak, after in FIGURES:
            lines.append("  %-44s %7d / %7d / %7d (%+d)" % (what, before, peak, after,
                                                          after - before))
        print("\n" + "\n".join(lines))


def others_ok(env, nbytes=64 * KiB):
    """The relay is alive, answers the API promptly, and an echo through gamma is exact."""
    assert env.relay.proc.alive(), "relay died:\n" + env.relay.proc.describe()
    t = time.monotonic()
    st, _ = env.relay.api("/api/v1/workspaces", timeout=10)
    took = time.monotonic() - t
    assert st == 200, st
    assert took < PROMPT_S, "the API took %.2fs to answer" % took
    echo_roundtrip(env.gamma_forward.port, nbytes=nbytes, seed=random.randrange(1 << 30),
                   timeout=30)
    for ws in ("beta", "gamma"):
        assert env.relay.connected(ws), "workspace %s lost its agent" % ws


def sanitized(pid):
    """Is the process built with AddressSanitizer? Its quarantine keeps freed memory (up to
    256 MiB), so RSS bounds mean nothing there: figures are still reported, not asserted."""
    with open("/proc/%d/maps" % pid) as f:
        return any("libasan" in line for line in f)


class RssWatch:
    """Samples a process's RSS every 50 ms from creation to stop(); asserts the bounds."""

    def __init__(self, pid, what):
        self.pid = pid
        self.what = what
        self.before = proc_rss_kib(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        for _ in range(200000):  # 50 ms each: bounded far beyond any test's length
            if self._stop.wait(0.05):
                return
            try:
                self.peak = max(self.peak, proc_rss_kib(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self, settle=0.5):
        time.sleep(settle)
        self._stop.set()
        self._thread.join(5)
        after = proc_rss_kib(self.pid)
        self.peak = max(self.peak, after)
        FIGURES.append((self.what, self.before, self.peak, after))
        if sanitized(self.pid):
            return after - self.before
        assert after - self.before < RSS_BOUND_KIB, "%s: relay RSS grew by %d KiB" % (
            self.what, after - self.before)
        assert self.peak - self.before < RSS_PEAK_BOUND_KIB, (
            "%s: relay RSS peaked %d KiB above where it started" % (
                self.what, self.peak - self.before))
        return after - self.before


# ---------------------------------------------------------------------------------------
# raw HTTP


def http_raw(port, data, read_timeout=15.0, send_timeout=15.0, after_send=None):
    """Sends data (bytes, or a list of pieces), then reads until EOF or read_timeout.

    Returns (status or None, head bytes, closed, seconds until closed or None). A relay that
    stops reading and resets the connection while we still send is "closed" too.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=send_timeout)
    t0 = time.monotonic()
    got = b""
    closed_at = None
    try:
        try:
            for piece in (data if isinstance(data, list) else [data]):
                s.sendall(piece)
            if after_send:
                after_send(s)
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic()
        except socket.timeout:
            pass  # the relay stopped reading without closing: see what it answered
        s.settimeout(0.5)
        deadline = time.monotonic() + read_timeout
        for _ in range(100000):
            if time.monotonic() >= deadline:
                break
            try:
                b = s.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_at = closed_at or time.monotonic()
                break
            if not b:
                closed_at = closed_at or time.monotonic()
                break
            got += b
            if len(got) > 4 * MiB:
                break
    finally:
        s.close()
    status = None
    if got.startswith(b"HTTP/1."):
        try:
            status = int(got.split(b" ", 2)[1])
        except (IndexError, ValueError):
            pass
    return status, got.split(b"\r\n\r\n")[0], closed_at is not None, (
        closed_at - t0 if closed_at else None)


def auth(env, user_token=None):
    return "Authorization: Bearer %s\r\n" % (user_token or env.tokens.user_token())


# ---------------------------------------------------------------------------------------
# raw websocket (RFC 6455), client side


def xor_mask(data, key):
    n = len(data)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def ws_frame(opcode, payload=b"", fin=True, masked=True, length=None, rsv=0, key=None):
    """One frame as a client would send it; length overrides the header's payload length."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    m = 0x80 if masked else 0
    if n < 126:
        hdr = bytes([b0, m | n])
    elif n < 65536:
        hdr = struct.pack(">BBH", b0, m | 126, n)
    else:
        hdr = struct.pack(">BBQ", b0, m | 127, n)
    if not masked:
        return hdr + payload
    key = key if key is not None else os.urandom(4)
    return hdr + key + xor_mask(payload, key)


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def close_payload(code, reason=b""):
    return struct.pack(">H", code) + reason


class Closed(Exception):
    """The connection ended: close = (code, reason) if a close frame came first."""

    def __init__(self, close):
        super().__init__("closed: %r" % (close,))
        self.close = close


class RawWS:
    """A websocket client on a plain socket: hand-written frames out, frames parsed in."""

    def __init__(self, sock, leftover):
        self.sock = sock
        self.buf = bytearray(leftover)
        self.close = None       # (code, reason) of the peer's close frame
        self.eof = False
        self.pongs = 0
        self.texts = []

    @classmethod
    def connect(cls, port, path, headers="", timeout=15.0):
        """Returns (status, RawWS or None, response head)."""
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        req = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
               % (path.encode(), port, key)) + headers.encode() + b"\r\n"
        s.sendall(req)
        head = b""
        for _ in range(1000):
            if b"\r\n\r\n" in head or len(head) > 65536:
                break
            b = s.recv(65536)
            if not b:
                break
            head += b
        head, _, rest = head.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            s.close()
            raise AssertionError("no HTTP status in %r" % head[:200])
        if status != 101:
            s.close()
            return status, None, head
        want = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert want in head, "bad Sec-WebSocket-Accept in %r" % head
        return status, cls(s, rest), head

    def send(self, data):
        self.sock.sendall(data)

    def send_frame(self, *a, **kw):
        self.sock.sendall(ws_frame(*a, **kw))

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no frame within the time given")
            self.sock.settimeout(min(left, 1.0))
            try:
                b = self.sock.recv(1024 * 1024)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                b = b""
            if not b:
                self.eof = True
                raise Closed(self.close)
            self.buf += b

    def recv_frame(self, timeout=15.0):
        """(fin, opcode, payload) of the next frame; raises Closed or socket.timeout."""
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        off = 2
        if n == 126:
            self._fill(4, deadline)
            n = struct.unpack_from(">H", self.buf, 2)[0]
            off = 4
        elif n == 127:
            self._fill(10, deadline)
            n = struct.unpack_from(">Q", self.buf, 2)[0]
            off = 10
        assert not b1 & 0x80, "the server masked a frame"
        assert n <= 64 * MiB, "the server announced a %d-byte frame" % n
        self._fill(off + n, deadline)
        payload = bytes(self.buf[off:off + n])
        del self.buf[:off + n]
        op = b0 & 0x0F
        if op == OP_CLOSE and self.close is None:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
            self.close = (code, payload[2:].decode("utf-8", "replace"))
        elif op == OP_PONG:
            self.pongs += 1
        elif op == OP_TEXT:
            self.texts.append(payload.decode("utf-8", "replace"))
        return bool(b0 & 0x80), op, payload

    def read_data(self, nbytes, timeout=15.0):
        """Binary payload until nbytes arrived (pongs and texts are counted on the way)."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        for _ in range(1000000):
            if len(got) >= nbytes:
                return bytes(got)
            _, op, payload = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            if op in (OP_BINARY, OP_CONT):
                got += payload
            elif op == OP_CLOSE:
                raise Closed(self.close)
        return bytes(got)

    def read_until(self, needle, timeout=15.0):
        """Binary payload until needle appears in it."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        for _ in range(1000000):
            if needle in got:
                return bytes(got)
            try:
                _, op, payload = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            except socket.timeout:
                raise AssertionError("no %r within %ss; got %r" % (needle, timeout,
                                                                  bytes(got[-300:])))
            if op in (OP_BINARY, OP_CONT):
                got += payload
            elif op == OP_CLOSE:
                raise AssertionError("closed %r while waiting for %r" % (self.close, needle))
        return bytes(got)

    def wait_closed(self, timeout=15.0):
        """Reads (and drops) frames until the connection ends. Returns (close, seconds)
        where close is the close frame's (code, reason), or None for a bare TCP close.
        Raises AssertionError if the connection is still open after timeout."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        for _ in range(10000000):
            try:
                self.recv_frame(max(deadline - time.monotonic(), 0.01))
            except Closed:
                return self.close, time.monotonic() - t0
            except socket.timeout:
                raise AssertionError("the connection is still open after %.0fs (close %r)" % (
                    timeout, self.close))
            if self.close is not None:
                # answer the close as a client does, then wait for the TCP close
                try:
                    self.send(ws_frame(OP_CLOSE, close_payload(self.close[0] or 1000)))
                except OSError:
                    pass
        raise AssertionError("unreachable")

    def shut(self):
        try:
            self.sock.close()
        except OSError:
            pass


def ws_path(ws, what):
    return "/api/v1/workspaces/%s/%s" % (ws, what)


def open_tcp(env, port=None, ws="beta"):
    st, c, head = RawWS.connect(env.relay.port, ws_path(ws, "tcp/%d" % (port or env.echo.port)),
                                auth(env))
    assert st == 101, head
    return c


def echo_check(c, nbytes=32 * KiB, seed=None):
    """Sends bytes on a /tcp websocket to the echo server and expects them back exactly."""
    data = random.Random(seed).randbytes(nbytes)
    c.send_frame(OP_BINARY, data)
    got = c.read_data(len(data), timeout=20)
    assert got == data, "echo mismatch: %d bytes back of %d" % (len(got), len(data))


PTY_SHELL_ID = str(uuid.uuid4())


def open_pty(env, pty_id=PTY_SHELL_ID, command=None, ws="beta"):
    q = "id=%s&rows=24&cols=80" % pty_id
    if command:
        q += "&command=" + urllib.parse.quote(command, safe="")
    st, c, head = RawWS.connect(env.relay.port, ws_path(ws, "pty?" + q), auth(env))
    assert st == 101, head
    return c


def pty_check(c, tag):
    """Types a command into the shell; its output must come back."""
    n = random.randrange(1000, 9999)
    c.send_frame(OP_TEXT, json.dumps({"data": "echo %s-$((%d+1))\r" % (tag, n)}).encode())
    c.read_until(("%s-%d" % (tag, n + 1)).encode(), timeout=20)


def accepted_close(close, codes):
    """A close frame with one of codes, or the TCP connection dropped without one."""
    return close is None or close[0] in codes


# ---------------------------------------------------------------------------------------
# 1. slowloris


SLOW_CONNS = 200
IDLE_CONNS = 50


def test_slowloris_headers_and_silent_connections(env):
    """200 connections send a request line and headers one byte a second, 50 connect and
    send nothing: legitimate requests are answered promptly meanwhile, and the relay closes
    all 250 within HEADER_DEADLINE_S (lws: timeout_secs_ah_idle, 10 s).

    Regression: lws reports such a connection's end (LWS_CALLBACK_CLOSED_HTTP) with no
    per-session data, and the relay dereferenced it: one half-sent request line crashed the
    relay (SIGSEGV) ten seconds later."""
    watch = RssWatch(env.relay.pid, "slowloris: 200 slow + 50 silent")
    prefix = (b"GET /api/v1/workspaces HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
              + b"a" * 200)  # never finished
    sel = selectors.DefaultSelector()
    slow, idle = [], []
    for i in range(SLOW_CONNS + IDLE_CONNS):
        s = socket.create_connection(("127.0.0.1", env.relay.port), timeout=10)
        s.setblocking(False)
        (slow if i < SLOW_CONNS else idle).append(s)
        sel.register(s, selectors.EVENT_READ)
    t0 = time.monotonic()
    closed_at = {}
    answered = {}
    latencies = []
    try:
        for tick in range(int(HEADER_DEADLINE_S) + 10):
            tick_end = t0 + tick + 1
            for s in slow:
                if s not in closed_at:
                    try:
                        s.send(prefix[tick:tick + 1])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        closed_at[s] = time.monotonic() - t0
                        sel.unregister(s)
            t = time.monotonic()
            st, _ = env.relay.api("/api/v1/workspaces", timeout=10)
            latencies.append(time.monotonic() - t)
            assert st == 200, st
            if tick % 4 == 0:
                echo_roundtrip(env.gamma_forward.port, nbytes=32 * KiB, seed=tick, timeout=20)
            for _ in range(1000):
                left = tick_end - time.monotonic()
                if left <= 0:
                    break
                for key, _ in sel.select(left):
                    s = key.fileobj
                    try:
                        b = s.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        b = b""
                    if b:
                        answered[s] = answered.get(s, b"") + b
                        continue
                    closed_at[s] = time.monotonic() - t0
                    sel.unregister(s)
            if len(closed_at) == len(slow) + len(idle):
                break
    finally:
        for s in slow + idle:
            s.close()
        sel.close()
    slow_t = sorted(closed_at[s] for s in slow if s in closed_at)
    idle_t = sorted(closed_at[s] for s in idle if s in closed_at)
    print("\nslowloris: slow closed %d/%d (first %.1fs, median %.1fs, last %.1fs); silent "
          "closed %d/%d (first %.1fs, last %.1fs); API latency max %.3fs; %d answered first" % (
              len(slow_t), len(slow), slow_t[0] if slow_t else -1,
              slow_t[len(slow_t) // 2] if slow_t else -1, slow_t[-1] if slow_t else -1,
              len(idle_t), len(idle), idle_t[0] if idle_t else -1,
              idle_t[-1] if idle_t else -1, max(latencies), len(answered)))
    assert len(slow_t) == len(slow), "%d slow connections still open after %.0fs" % (
        len(slow) - len(slow_t), time.monotonic() - t0)
    assert len(idle_t) == len(idle), "%d silent connections still open after %.0fs" % (
        len(idle) - len(idle_t), time.monotonic() - t0)
    assert slow_t[-1] <= HEADER_DEADLINE_S and idle_t[-1] <= HEADER_DEADLINE_S
    assert max(latencies) < PROMPT_S, "the API took %.2fs during the attack" % max(latencies)
    others_ok(env)
    watch.stop()


def trickle(sock, data, seconds, stop):
    """Sends data one byte a second for at most `seconds`; returns when the peer closed."""
    for i in range(min(len(data), int(seconds))):
        if stop.is_set():
            return
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return
        if stop.wait(1.0):
            return


@pytest.mark.parametrize("what", ["login_post", "unwanted_body", "oversized_login"])
def test_slow_body_is_cut(env, what):
    """A request body sent one byte a second. lws re-arms its 5 s content timeout on every
    piece, so only the relay can bound it: the login form's body must arrive within
    WEB_BODY_TIMEOUT_MS, and a body the relay does not read (a POST to the API, a login
    body over 4096 bytes answered 413) is not waited for at all."""
    watch = RssWatch(env.relay.pid, "slow body: 20 x %s" % what)
    if what == "login_post":
        head = b"POST /w/beta/login HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n" \
               b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    elif what == "unwanted_body":
        head = b"POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\n" \
               b"Content-Length: 1000000000000\r\n\r\n"
    else:
        head = b"POST /w/beta/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    n = 20
    stop = threading.Event()
    socks, threads = [], []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", env.relay.port), timeout=10)
        s.sendall(head)
        socks.append(s)
        t = threading.Thread(target=trickle, args=(s, b"token=" + b"x" * 3990,
                                                  BODY_DEADLINE_S + 15, stop), daemon=True)
        t.start()
        threads.append(t)
    t0 = time.monotonic()
    closed_at = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    try:
        for tick in range(int(BODY_DEADLINE_S) + 10):
            if len(closed_at) == n:
                break
            others_ok(env, nbytes=16 * KiB)
            tick_end = t0 + tick + 1
            for _ in range(1000):
                left = tick_end - time.monotonic()
                if left <= 0:
                    break
                for key, _ in sel.select(left):
                    s = key.fileobj
                    try:
                        b = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        b = b""
                    if not b:
                        closed_at[s] = time.monotonic() - t0
                        sel.unregister(s)
    finally:
        stop.set()
        for s in socks:
            s.close()
        sel.close()
        for t in threads:
            t.join(5)
    times = sorted(closed_at.values())
    print("\nslow body %s: %d/%d closed, last after %.1fs" % (
        what, len(times), n, times[-1] if times else -1))
    assert len(times) == n, "%d of %d connections trickling a body still open after %.0fs" % (
        n - len(times), n, time.monotonic() - t0)
    assert times[-1] <= BODY_DEADLINE_S
    others_ok(env)
    watch.stop()


# ---------------------------------------------------------------------------------------
# 2. oversized and lying requests


def _big_url():
    return b"GET /api/v1/workspaces/" + b"a" * MiB + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def _many_headers():
    return (b"GET /api/v1/workspaces HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(10000)) + b"\r\n")


def _big_auth():
    return (b"GET /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"a" * MiB + b"\r\n\r\n")


def _big_cookie():
    return (b"GET /w/beta HTTP/1.1\r\nHost: x\r\nCookie: tether_token="
            + b"%41" * (MiB // 3) + b"\r\n\r\n")


def _login(cl, body, extra=b""):
    return (b"POST /w/beta/login HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + (b"Content-Length: %s\r\n" % cl if cl is not None else b"") + extra + b"\r\n"
            + body)


def _get(env, path):
    return ("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, auth(env))).encode()


# (name, request bytes, acceptable statuses (None: closed without an answer), must close)
OVERSIZED = [
    ("url_1MiB", lambda e: _big_url(), {None, 400, 404, 414, 431}, True),
    ("headers_10000", lambda e: _many_headers(), {None, 400, 431}, True),
    ("authorization_1MiB", lambda e: _big_auth(), {None, 400, 401, 431}, True),
    ("cookie_1MiB", lambda e: _big_cookie(), {None, 303, 400, 431}, True),
    ("login_content_length_absurd", lambda e: _login(b"1000000000000000000", b"token=x"),
     {413}, False),
    ("login_content_length_overflows", lambda e: _login(b"99999999999999999999999999", b"token=x"),
     {None, 400, 413}, False),
    ("login_content_length_negative", lambda e: _login(b"-1", b"token=x"), {None, 400, 401, 413},
     False),
    ("login_content_length_4097", lambda e: _login(b"4097", b"token=" + b"a" * 4091), {413},
     False),
    ("login_content_length_4096_is_read", lambda e: _login(b"4096", b"token=" + b"a" * 4090),
     {401}, False),
    ("login_body_longer_than_declared",
     lambda e: _login(b"7", b"token=x" + b"GARBAGE" * 1000), {401}, False),
    ("login_chunked", lambda e: _login(None, b"7\r\ntoken=x\r\n0\r\n\r\n",
                                     b"Transfer-Encoding: chunked\r\n"), {None, 400, 401, 411},
     False),
    ("logs_after_3000_digits",
     lambda e: _get(e, "/api/v1/workspaces/beta/logs?after=" + "9" * 3000), {400}, False),
    ("logs_400_arguments", lambda e: _get(e, "/api/v1/workspaces/beta/logs?" + "&".join(
        "a%d=1" % i for i in range(400))), {None, 200, 400}, False),  # lws: too many fragments
    ("metrics_post_with_body", lambda e: b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000, {401, 405}, True),
    ("metrics_pipelined_200", lambda e: _get(e, "/metrics") * 200, {200}, False),
]


@pytest.mark.parametrize("name,make,statuses,must_close", OVERSIZED,
                         ids=[c[0] for c in OVERSIZED])
def test_oversized_and_lying_requests(env, name, make, statuses, must_close):
    watch = RssWatch(env.relay.pid, "request: " + name)
    status, head, closed, took = http_raw(env.relay.port, make(env), read_timeout=15)
    print("\n%s: status %r, closed %r after %s s; %r" % (name, status, closed, took,
                                                          head[:80]))
    assert status in statuses, "%s: answered %r (%r), wanted one of %r" % (
        name, status, head[:200], statuses)
    if status is None or must_close:
        assert closed, "%s: neither answered nor closed" % name
    others_ok(env)
    watch.stop()


def test_content_length_bigger_than_sent(env):
    """A login POST declaring 4000 bytes and sending 7, then nothing: no answer can come, and
    the relay must drop the connection (lws's content timeout, 5 s)."""
    watch = RssWatch(env.relay.pid, "request: content-length lie (short body)")
    status, head, closed, took = http_raw(env.relay.port, _login(b"4000", b"token=x"),
                                          read_timeout=30)
    print("\nshort body: status %r, closed %r after %s s" % (status, closed, took))
    assert closed and took is not None and took < 15, (status, closed, took)
    assert status in (None, 400, 401, 408), status
    others_ok(env)
    watch.stop()


# ---------------------------------------------------------------------------------------
# 3. websocket abuse on /tcp/PORT and /pty


def test_ws_payload_length_2_63(env):
    """A frame whose 64-bit length has its top bit set (RFC 6455 forbids it): dropped."""
    watch = RssWatch(env.relay.pid, "ws: length 2^63")
    other = open_tcp(env)
    echo_check(other)
    c = open_tcp(env)
    try:
        c.send(struct.pack(">BBQ", 0x82, 0xFF, 1 << 63) + os.urandom(4) + b"x" * 1000)
        close, took = c.wait_closed(15)
        assert accepted_close(close, {1002, 1009}), close
        echo_check(other)
    finally:
        c.shut()
        other.shut()
    others_ok(env)
    watch.stop()


def test_ws_payload_length_lie(env):
    """A frame announcing 2^63-1 bytes of which 1 MiB come: the relay streams what arrives
    (the echo comes back) and holds none of the rest; dropping the socket cleans up."""
    watch = RssWatch(env.relay.pid, "ws: length 2^63-1, 1 MiB sent")
    c = open_tcp(env)
    try:
        key = os.urandom(4)
        data = random.Random(5).randbytes(MiB)
        c.send(struct.pack(">BBQ", 0x82, 0xFF, (1 << 63) - 1) + key + xor_mask(data, key))
        got = c.read_data(len(data), timeout=30)
        assert got == data
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


def test_ws_fragmented_message_never_ends(env):
    """A binary message of 2048 fragments (4 MiB) that never gets its final one: on /tcp,
    message boundaries mean nothing, so the bytes flow; nothing piles up in the relay."""
    watch = RssWatch(env.relay.pid, "ws: 4 MiB of fragments, no final")
    c = open_tcp(env)
    try:
        rnd = random.Random(9)
        pieces = [rnd.randbytes(2 * KiB) for _ in range(2048)]
        result = {}

        def reader():
            try:
                result["got"] = c.read_data(4 * MiB, timeout=60)
            except Exception as e:  # noqa: BLE001
                result["err"] = e
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        c.send_frame(OP_BINARY, pieces[0], fin=False)
        for p in pieces[1:]:
            c.send_frame(OP_CONT, p, fin=False)
        t.join(70)
        assert "err" not in result, result.get("err")
        assert result.get("got") == b"".join(pieces)
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


# Frames a client must not send. (name, frames, close codes accepted besides a bare drop)
BAD_FRAMES = [
    ("continuation_without_start", lambda: ws_frame(OP_CONT, b"abc"), {1002, 1003}),
    ("control_frame_126_bytes", lambda: ws_frame(OP_PING, b"p" * 126), {1002}),
    ("control_frame_64k", lambda: ws_frame(OP_PING, b"p" * 65536), {1002, 1009}),
    ("fragmented_ping", lambda: ws_frame(OP_PING, b"p", fin=False), {1002}),
    ("close_frame_200_bytes", lambda: ws_frame(OP_CLOSE, close_payload(1000, b"r" * 198)),
     {1000, 1002}),
    ("reserved_opcode_3", lambda: ws_frame(3, b"abc"), {1002}),
    ("reserved_opcode_11", lambda: ws_frame(11, b"abc"), {1002}),
    ("rsv1_without_extension", lambda: ws_frame(OP_BINARY, b"abc", rsv=4), {1002}),
    ("new_message_inside_fragmented_one",
     lambda: ws_frame(OP_BINARY, b"a", fin=False) + ws_frame(OP_BINARY, b"b"), {1002}),
    ("text_invalid_utf8", lambda: ws_frame(OP_TEXT, b"\xff\xfe\xc0\x80"), {1003, 1007}),
    ("text_message", lambda: ws_frame(OP_TEXT, b"hello"), {1003}),
]


@pytest.mark.parametrize("name,make,codes", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_ws_bad_frames_tcp(env, name, make, codes):
    """Each malformed frame on /tcp gets a close with its code, or the connection dropped;
    another stream of the same workspace goes on, the relay stays up."""
    watch = RssWatch(env.relay.pid, "ws /tcp: " + name)
    other = open_tcp(env)
    c = open_tcp(env)
    try:
        echo_check(c, 1024)
        c.send(make())
        close, took = c.wait_closed(15)
        print("\n%s: close %r after %.2fs" % (name, close, took))
        assert accepted_close(close, codes), "%s: closed with %r, wanted %r or a drop" % (
            name, close, codes)
        echo_check(other)
    finally:
        c.shut()
        other.shut()
    others_ok(env)
    watch.stop()


def test_ws_unmasked_client_frame(env):
    """RFC 6455 5.1: a server must close on an unmasked client frame. Whatever lws does
    with it (close, or take it), the bytes do not corrupt anything and the relay stays up."""
    c = open_tcp(env)
    try:
        c.send(ws_frame(OP_BINARY, b"unmasked!", masked=False))
        try:
            _, op, payload = c.recv_frame(5)
            outcome = ("echoed" if payload == b"unmasked!" else "frame %d %r" % (op, payload))
        except Closed:
            outcome = "closed %r" % (c.close,)
        except socket.timeout:
            outcome = "nothing"
        print("\nunmasked client frame: %s" % outcome)
        assert not outcome.startswith("frame"), outcome
    finally:
        c.shut()
    others_ok(env)


def test_ws_ping_flood(env):
    """10,000 pings in a row without reading: lws answers (keeping one pong pending, not
    10,000), the stream still echoes exactly, memory stays flat."""
    watch = RssWatch(env.relay.pid, "ws: 10,000 pings")
    c = open_tcp(env)
    try:
        key = os.urandom(4)
        flood = b"".join(ws_frame(OP_PING, struct.pack(">Q", i), key=key) for i in range(10000))
        for i in range(0, len(flood), 64 * KiB):
            c.send(flood[i:i + 64 * KiB])
        echo_check(c, 64 * KiB)
        print("\nping flood: %d pongs seen before the echo came back" % c.pongs)
        assert c.pongs >= 1
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


class StreamingServer(TcpServer):
    """Sends bytes to each connection until it fails (the relay's stream for it ended)."""

    def __init__(self):
        super().__init__(self._handle)

    def _handle(self, conn, idx):
        chunk = b"s" * 65536
        for _ in range(100000):  # at most 6.5 GB, far more than the test ever takes
            try:
                conn.sendall(chunk)
            except OSError:
                return


def test_ws_client_reset_mid_download_tcp(env):
    """Clients that vanish with a reset while the relay is writing a download to them: the
    relay's write fails (before or after the socket is full) and it drops them, 20 in a
    row, and stays healthy."""
    server = StreamingServer()
    watch = RssWatch(env.relay.pid, "ws: 20 clients reset mid-download")
    try:
        for i in range(20):
            c = open_tcp(env, port=server.port)
            got = c.read_data(64 * KiB if i % 2 else 1, timeout=20)
            assert got, "no data before the reset"
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.sock.close()
        wait_until(lambda: server.accepted == 20, timeout=15, what="20 streams to the server")
    finally:
        server.close()
    others_ok(env)
    watch.stop()


class CountingServer(TcpServer):
    """Counts the bytes each connection receives, live."""

    def __init__(self):
        self.counts = {}
        super().__init__(self._handle)

    def _handle(self, conn, idx):
        self.counts[idx] = 0
        for _ in range(1000000):
            try:
                b = conn.recv(65536)
            except OSError:
                return
            if not b:
                return
            self.counts[idx] += len(b)


def test_ws_send_after_close_tcp(env):
    """Bytes sent after the client's close frame never reach the port."""
    counter = CountingServer()
    c = open_tcp(env, port=counter.port)
    try:
        c.send_frame(OP_BINARY, b"a" * 1000)
        wait_until(lambda: counter.counts.get(0) == 1000, timeout=15,
                   what="the first 1000 bytes at the port")
        c.send(ws_frame(OP_CLOSE, close_payload(1000)) +
               b"".join(ws_frame(OP_BINARY, b"b" * 1000) for _ in range(50)))
        close, _ = c.wait_closed(15)
        assert accepted_close(close, {1000}), close
        time.sleep(1.0)
        assert counter.counts.get(0) == 1000, counter.counts
    finally:
        c.shut()
        counter.close()
    others_ok(env)


def test_ws_ssh_endpoint_garbage(env):
    """/ssh is a byte pipe like /tcp: garbage instead of SSH makes the agent's SSH server
    give up at once; its end of stream (an empty message) comes, and after ours the relay
    closes with 1000 (PROTOCOL.md 14.5, 14.6). Nothing else is touched."""
    st, c, head = RawWS.connect(env.relay.port, ws_path("beta", "ssh"), auth(env))
    assert st == 101, head
    try:
        c.send_frame(OP_BINARY, b"this is not ssh\r\n" * 100)
        got = b""
        for _ in range(100):
            _, op, payload = c.recv_frame(15)
            assert op == OP_BINARY, (op, payload)
            if not payload:
                break  # the agent's end of stream
            got += payload
        assert got.startswith(b"SSH-2.0-"), got[:100]
        c.send_frame(OP_BINARY, b"")
        close, _ = c.wait_closed(15)
        assert close is not None and close[0] == 1000, close
    finally:
        c.shut()
    others_ok(env)


# ---- /pty: JSON text input (PROTOCOL.md 14.7), 1 MiB per message


@pytest.fixture(scope="module")
def shell(env):
    """A shell PTY in beta, attached once to prove it works."""
    c = open_pty(env)
    try:
        pty_check(c, "hc-ready")
    finally:
        c.shut()
    return PTY_SHELL_ID


@pytest.mark.parametrize("data", ["random", "compressible"])
def test_pty_binary_16mib_backpressure(env, shell, data):
    """A 16 MiB binary message (raw input) to a PTY whose program does not read. Random
    bytes: the relay deflates them toward the agent only as fast as the agent grants credit,
    so it buffers little and the sender stalls. Compressible bytes (16 MiB of one letter
    deflate to some 16 KiB) pass the relay's credit easily: then the agent must not inflate
    them all into memory. Either way everyone else goes on; closing detaches."""
    watch = RssWatch(env.relay.pid, "pty: 16 MiB %s binary to a stalled PTY" % data)
    agent_pid = env.agents["beta"].pid
    agent_before = proc_rss_kib(agent_pid)
    # Raw mode: a full input queue throttles the writer (in canonical mode the line
    # discipline would discard what does not fit, and the agent could write on forever).
    c = open_pty(env, pty_id=str(uuid.uuid4()), command="stty raw -echo; sleep 600")
    sent = 0
    try:
        key = os.urandom(4)
        body = (random.Random(16).randbytes(16 * MiB) if data == "random"
                else b"y" * (16 * MiB))
        body = xor_mask(body, key)
        c.sock.settimeout(3.0)
        c.send(struct.pack(">BBQ", 0x82, 0xFF, 16 * MiB) + key)
        for i in range(0, len(body), 64 * KiB):
            try:
                c.sock.sendall(body[i:i + 64 * KiB])
            except socket.timeout:
                break
            sent = i + 64 * KiB
        time.sleep(1.0)
        agent_after = proc_rss_kib(agent_pid)
        print("\npty 16 MiB %s: the relay took %d KiB before the sender stalled; agent RSS "
              "%d -> %d KiB" % (data, sent // KiB, agent_before, agent_after))
        if data == "random":
            assert sent < 16 * MiB, "the relay took all 16 MiB for a PTY that reads nothing"
        assert sanitized(agent_pid) or agent_after - agent_before < RSS_BOUND_KIB, (
            "the agent's RSS grew by %d KiB" % (agent_after - agent_before))
        others_ok(env)
        c2 = open_pty(env, pty_id=shell)
        try:
            pty_check(c2, "hc-bp")
        finally:
            c2.shut()
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


def test_pty_text_16mib_ignored(env, shell):
    """A 16 MiB text message is over the 1 MiB limit: ignored as a whole (nothing of it is
    typed), the same connection's next message works."""
    watch = RssWatch(env.relay.pid, "pty: 16 MiB text message")
    c = open_pty(env, pty_id=shell)
    try:
        msg = b'{"data": "' + b"touch /nonexistent/x; " * (16 * MiB // 22) + b'"}'
        c.send_frame(OP_TEXT, msg)
        pty_check(c, "hc-16m")
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


def test_pty_text_fragments_never_end(env, shell):
    """A text message of 4 MiB in fragments without a final one: the relay drops it past
    1 MiB and buffers nothing more; after the socket goes, the PTY works."""
    watch = RssWatch(env.relay.pid, "pty: 4 MiB text fragments, no final")
    c = open_pty(env, pty_id=shell)
    try:
        c.send_frame(OP_TEXT, b'{"data": "', fin=False)
        key = os.urandom(4)
        piece = ws_frame(OP_CONT, b"z" * (16 * KiB), fin=False, key=key)
        for _ in range(256):
            c.send(piece)
        time.sleep(0.5)
        assert env.relay.proc.alive()
    finally:
        c.shut()
    c = open_pty(env, pty_id=shell)
    try:
        pty_check(c, "hc-frag")
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


@pytest.mark.parametrize("name,frame", [
    ("invalid_utf8", lambda: ws_frame(OP_TEXT, b'{"data": "\xff\xfe"}')),
    ("not_json", lambda: ws_frame(OP_TEXT, b"{not json")),
    ("not_object", lambda: ws_frame(OP_TEXT, b"[1, 2, 3]")),
    ("data_not_string", lambda: ws_frame(OP_TEXT, b'{"data": 5}')),
    ("rows_only", lambda: ws_frame(OP_TEXT, b'{"rows": 5}')),
    ("huge_sizes", lambda: ws_frame(OP_TEXT, b'{"rows": 1e300, "cols": -99999999999999999999}')),
    ("continuation_without_start", lambda: ws_frame(OP_CONT, b'{"data": "x"}')),
    ("empty_binary", lambda: ws_frame(OP_BINARY, b"")),
])
def test_pty_bad_messages_ignored(env, shell, name, frame):
    """Messages PROTOCOL.md 14.7 says are ignored: the same connection's next one works.
    (A continuation frame without a start may instead close the connection, 1002.)"""
    c = open_pty(env, pty_id=shell)
    try:
        c.send(frame())
        if name == "continuation_without_start":
            try:
                pty_check(c, "hc-" + name)
            except (AssertionError, Closed):
                close, _ = c.wait_closed(10)
                assert accepted_close(close, {1002, 1003}), close
        else:
            pty_check(c, "hc-" + name.replace("_", ""))
    finally:
        c.shut()
    others_ok(env)


def test_pty_send_after_close(env, shell, tmp_path):
    """Input sent after the client's close frame is never typed."""
    marker = tmp_path / "typed-after-close"
    c = open_pty(env, pty_id=shell)
    try:
        pty_check(c, "hc-pre")
        c.send(ws_frame(OP_CLOSE, close_payload(1000)) +
               ws_frame(OP_TEXT, json.dumps({"data": "touch %s\r" % marker}).encode()))
        close, _ = c.wait_closed(15)
        assert accepted_close(close, {1000}), close
    finally:
        c.shut()
    c = open_pty(env, pty_id=shell)
    try:
        pty_check(c, "hc-post")
    finally:
        c.shut()
    assert not marker.exists(), "input sent after the close frame was typed"


# ---------------------------------------------------------------------------------------
# 4. JSON bombs


def _deep(n):
    return b"[" * n + b"]" * n


JSON_BOMBS = [
    ("nesting_100000", lambda: _deep(100000)),
    ("nesting_100000_in_data", lambda: b'{"data": ' + _deep(100000) + b"}"),
    ("nesting_objects_100000", lambda: b'{"a":' * 100000 + b"1" + b"}" * 100000),
    ("string_10MiB", lambda: b'{"data": "' + b"a" * (10 * MiB) + b'"}'),
    ("keys_60000", lambda: b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(60000)) + b"}"),
    ("same_key_60000", lambda: b"{" + b",".join(b'"rows":%d' % i for i in range(60000)) + b"}"),
    ("escapes_just_under_1MiB", lambda: b'{"x": "' + b"\\u0000" * (MiB // 6 - 4) + b'"}'),
]


@pytest.mark.parametrize("name,make", JSON_BOMBS, ids=[c[0] for c in JSON_BOMBS])
def test_pty_json_bomb(env, shell, name, make):
    """Each is refused or parsed within bounds: the same connection's next message is typed
    within seconds, and the relay's memory stays bounded."""
    watch = RssWatch(env.relay.pid, "pty json: " + name)
    c = open_pty(env, pty_id=shell)
    try:
        t = time.monotonic()
        c.send_frame(OP_TEXT, make())
        pty_check(c, "hc-bomb")
        took = time.monotonic() - t
        print("\n%s: next input typed after %.2fs" % (name, took))
        assert took < 10
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


LOGIN_BOMBS = [
    ("json_in_token", b"token=" + b"%5B" * 1300, 401),
    ("fields_1000", b"&".join(b"f%d=1" % i for i in range(700))[:4096], 401),
    ("token_over_1KiB", b"token=" + b"a" * 4000, 401),
    ("token_nul", b"token=abc%00def", 401),
    ("many_tokens", b"&".join([b"token=a"] * 500), 401),
    ("body_1MiB", b"token=" + b"a" * MiB, 413),
]


@pytest.mark.parametrize("name,body,status", LOGIN_BOMBS, ids=[c[0] for c in LOGIN_BOMBS])
def test_login_form_bomb(env, name, body, status):
    """Hostile login bodies: 401 with no cookie, or 413 over 4096 bytes."""
    watch = RssWatch(env.relay.pid, "login form: " + name)
    got, head, closed, _ = http_raw(env.relay.port, _login(b"%d" % len(body), body),
                                    read_timeout=10)
    assert got == status, (name, got, head[:200])
    assert b"set-cookie" not in head.lower()
    others_ok(env)
    watch.stop()


# ---------------------------------------------------------------------------------------
# 5. many clients


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


async def _ws_client(url, token, payload, hold, results, i):
    try:
        ws = await websockets.connect(url, extra_headers={"Authorization": "Bearer " + token},
                                      max_size=None, ping_interval=None, open_timeout=60,
                                      close_timeout=5)
    except websockets.exceptions.InvalidStatusCode as e:
        results[i] = ("status", e.status_code)
        return
    except Exception as e:  # noqa: BLE001
        results[i] = ("error", repr(e))
        return
    try:
        if payload is not None:
            await ws.send(payload)
            got = b""
            while len(got) < len(payload):
                got += await asyncio.wait_for(ws.recv(), 60)
            results[i] = ("echo", got == payload)
            await hold.wait()
        else:
            # nothing comes on these streams: recv ends with the close
            await asyncio.wait_for(ws.recv(), 120)
            results[i] = ("open", None)
    except websockets.exceptions.ConnectionClosed as e:
        results[i] = ("closed", e.code)
    except Exception as e:  # noqa: BLE001
        results[i] = ("error", repr(e))
    finally:
        await ws.close()


def test_500_clients_one_workspace(env):
    """500 websockets to beta's /tcp/ECHO at once, each echoing 1 KiB: every one is served
    (the agent's max_streams is 1024), within bounded time; afterwards the relay's fds and
    memory are back near where they were."""
    n = 500
    fds_before = fd_count(env.relay.pid)
    watch = RssWatch(env.relay.pid, "500 clients to one workspace")
    url = "%s%s" % (env.relay.url, ws_path("beta", "tcp/%d" % env.echo.port))
    results = {}

    async def go():
        hold = asyncio.Event()
        tasks = [asyncio.ensure_future(_ws_client(url, env.tokens.user_token(),
                                                  os.urandom(1024), hold, results, i))
                 for i in range(n)]
        for _ in range(1200):
            if len(results) == n or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(go(), 180))
    took = time.monotonic() - t0
    kinds = {}
    for k, v in results.values():
        kinds[(k, v)] = kinds.get((k, v), 0) + 1
    print("\n500 clients: %r in %.1fs" % (kinds, took))
    assert kinds.get(("echo", True), 0) == n, kinds
    wait_until(lambda: fd_count(env.relay.pid) <= fds_before + 5, timeout=20,
               what="the relay's fds to come back (%d before)" % fds_before)
    others_ok(env)
    watch.stop(settle=1.0)


async def _scripted_agent(env, max_streams):
    ws = await websockets.connect(
        env.relay.url + "/api/v1/agent", subprotocols=["tether.v1"],
        extra_headers={"Authorization": "Bearer " + env.tokens.agent["alpha"]},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)
    peer = Peer(ws)
    await peer.send(tp.hello_frame(max_streams=max_streams), tp.agent_hello_control())
    await peer.until(lambda f: f.type == tp.CONTROL and f.control().get("type") == "manifest",
                     what="manifest")
    return peer


def test_500_clients_over_max_streams(env):
    """A (scripted) agent for alpha allows 50 streams: of 500 clients at once, the relay
    opens 50 and closes the other 450 with 1013 (PROTOCOL.md 14.5); the agent refuses 20 of
    its 50 with OPEN_FAIL STREAM_LIMIT (close 4003 and its text), accepts 30 and drops the
    tunnel (4010). Nothing else is disturbed."""
    n, limit = 500, 50
    watch = RssWatch(env.relay.pid, "500 clients, agent max_streams 50")
    url = "%s%s" % (env.relay.url, ws_path("alpha", "tcp/4321"))
    results = {}

    async def go():
        peer = await _scripted_agent(env, limit)
        hold = asyncio.Event()
        tasks = [asyncio.ensure_future(_ws_client(url, env.tokens.user_token(), None, hold,
                                                  results, i)) for i in range(n)]
        opens = []

        def is_open(f):
            if f.type == tp.OPEN:
                opens.append(f.stream)
            return False
        # every client either got a stream (OPEN at the agent) or its 1013
        for _ in range(600):
            try:
                await peer.until(is_open, timeout=0.1)
            except AssertionError:
                pass
            refused = sum(1 for k, v in results.values() if (k, v) == ("closed", 1013))
            if len(opens) + refused >= n:
                break
        assert len(opens) == limit, "the relay opened %d streams, max_streams %d" % (
            len(opens), limit)
        for sid in opens[:20]:
            await peer.send(tp.frame(tp.OPEN_FAIL, sid,
                                     tp.encode_reason(tp.CODE_STREAM_LIMIT, "too many")))
        for sid in opens[20:]:
            await peer.send(tp.frame(tp.OPEN_OK, sid))
        await peer.drain_for(1.0)
        await peer.ws.close()
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(asyncio.wait_for(go(), 180))
    kinds = {}
    for k, v in results.values():
        kinds[(k, v)] = kinds.get((k, v), 0) + 1
    print("\n500 clients over max_streams 50: %r" % kinds)
    assert kinds.get(("closed", 1013), 0) == n - limit, kinds
    assert kinds.get(("closed", 4003), 0) == 20, kinds
    assert kinds.get(("closed", 4010), 0) == limit - 20, kinds
    others_ok(env)
    watch.stop(settle=1.0)


# ---------------------------------------------------------------------------------------
# 6. the same websocket attacks in the other positions


AGENT_ATTACKS = [
    ("length_2_63", lambda: struct.pack(">BBQ", 0x82, 0xFF, 1 << 63) + os.urandom(4)),
    ("control_frame_126_bytes", lambda: ws_frame(OP_PING, b"p" * 126)),
    ("reserved_opcode_3", lambda: ws_frame(3, b"abc")),
    ("continuation_without_start", lambda: ws_frame(OP_CONT, b"abc")),
    ("fragments_never_end_4MiB", lambda: ws_frame(OP_BINARY, b"", fin=False) + b"".join(
        ws_frame(OP_CONT, b"\0" * (64 * KiB), fin=False) for _ in range(64))),
    ("ping_flood", lambda: b"".join(ws_frame(OP_PING, b"12345678") for _ in range(10000))),
]


@pytest.mark.parametrize("name,make", AGENT_ATTACKS, ids=[c[0] for c in AGENT_ATTACKS])
def test_agent_endpoint_ws_attacks(env, name, make):
    """Against /api/v1/agent with alpha's valid token: the relay drops the bad connection
    (GOAWAY or close), or for the ping flood keeps it; beta and gamma are unaffected."""
    watch = RssWatch(env.relay.pid, "agent endpoint: " + name)
    st, c, head = RawWS.connect(env.relay.port, "/api/v1/agent",
                                "Authorization: Bearer %s\r\nSec-WebSocket-Protocol: tether.v1"
                                "\r\n" % env.tokens.agent["alpha"])
    assert st == 101, head
    try:
        c.send_frame(OP_BINARY, tp.hello_frame() + tp.agent_hello_control())
        try:
            c.send(make())
        except (BrokenPipeError, ConnectionResetError):
            pass
        if name == "ping_flood":
            # the tunnel still works: PING (the protocol's) is answered by PONG
            c.send_frame(OP_BINARY, tp.ping_frame(b"stillup!"))
            got = b""
            for _ in range(100):
                _, op, payload = c.recv_frame(15)
                if op == OP_BINARY:
                    got += payload
                    if any(f.type == tp.PONG and f.payload == b"stillup!"
                           for f in tp.parse_message(payload)):
                        break
            else:
                raise AssertionError("no PONG after the ping flood")
        elif name == "fragments_never_end_4MiB":
            time.sleep(1.0)  # the relay may hold it (a message may be fragmented) or drop it
        else:
            close, _ = c.wait_closed(15)
            print("\n%s: close %r" % (name, close))
            assert accepted_close(close, {1002, 1003, 1009}), close
    finally:
        c.shut()
    others_ok(env)
    watch.stop()


class RawRelay:
    """A TCP server that answers one websocket upgrade the way the relay does (subprotocol
    tether.v1), sends `attack` bytes and counts the connections it gets (the agent dials
    again after a failure)."""

    def __init__(self, attack):
        self.attack = attack
        self.conns = 0
        self.closed_after = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for _ in range(100000):
            if self._stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns += 1
            try:
                self._serve(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _serve(self, conn):
        conn.settimeout(10)
        head = b""
        for _ in range(1000):
            if b"\r\n\r\n" in head:
                break
            b = conn.recv(65536)
            if not b:
                return
            head += b
        key = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                     b"\r\nSec-WebSocket-Protocol: tether.v1\r\n\r\n")
        # server frames are not masked
        t0 = time.monotonic()
        try:
            conn.sendall(self.attack)
        except OSError:
            pass
        for _ in range(1000):
            if self._stop.is_set() or time.monotonic() - t0 > 20:
                break
            try:
                if not conn.recv(65536):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        self.closed_after.append(time.monotonic() - t0)

    def close(self):
        self._stop.set()
        self.sock.close()
        self.thread.join(10)


def _server_frame(opcode, payload=b"", fin=True, length=None):
    return ws_frame(opcode, payload, fin=fin, masked=False, length=length)


RELAY_ATTACKS = [
    ("length_2_63", lambda: struct.pack(">BBQ", 0x82, 0x7F, 1 << 63)),
    ("control_frame_126_bytes", lambda: _server_frame(OP_PING, b"p" * 126)),
    ("reserved_opcode_3", lambda: _server_frame(3, b"abc")),
    ("masked_server_frame", lambda: ws_frame(OP_BINARY, tp.hello_frame())),
    ("text_message", lambda: _server_frame(OP_TEXT, b"hello")),
]


@pytest.mark.parametrize("name,make", RELAY_ATTACKS, ids=[c[0] for c in RELAY_ATTACKS])
def test_agent_ws_client_attacks(harness, name, make):
    """A raw "relay" answers the agent's upgrade and sends one malformed frame: the agent
    drops that connection and dials again; it does not crash or grow."""
    fake = RawRelay(make())
    try:
        proc = harness.agent(None, "alpha", wait=False, url="ws://127.0.0.1:%d" % fake.port)
        wait_until(lambda: fake.conns >= 1 and fake.closed_after, timeout=30,
                   what="the agent to drop the first connection")
        rss1 = proc_rss_kib(proc.pid)
        wait_until(lambda: fake.conns >= 2, timeout=60, what="the agent to dial again")
        assert proc.alive(), proc.describe()
        rss2 = proc_rss_kib(proc.pid)
        print("\nagent vs %s: dropped after %.2fs; %d connections; RSS %d -> %d KiB" % (
            name, fake.closed_after[0], fake.conns, rss1, rss2))
        assert fake.closed_after[0] < 15
        assert sanitized(proc.pid) or rss2 - rss1 < 4 * 1024
    finally:
        fake.close()


# The agent's own SSH listener (--ssh-listen) faces whoever can reach it, before any key is
# checked. Key-only authentication needs no time for a human to type: the default grace is
# 30 s (OpenSSH allows 120 s, LoginGraceTime, for passwords); these tests use 3 s.
SSH_LOGIN_GRACE_S = 3


def ssh_listen_agent(harness, tmp_path):
    """An agent with --ssh-listen (grace SSH_LOGIN_GRACE_S) and no relay; its port."""
    port = free_port()
    keys = write_private(tmp_path / "authorized_keys", "")
    agent = harness.agent(None, "alpha", wait=False, url="ws://127.0.0.1:%d" % free_port(),
                          extra=["--ssh-listen", "127.0.0.1:%d" % port, "--authorized-keys",
                                 keys, "--ssh-login-grace", "%ds" % SSH_LOGIN_GRACE_S])

    def listening():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    wait_until(listening, timeout=15, what="the agent's SSH listener")
    return agent, port


def test_agent_ssh_listen_slowloris(harness, tmp_path):
    """20 silent connections and 20 that send half an SSH banner to the agent's
    --ssh-listen port: all closed within SSH_LOGIN_GRACE_S; a full SSH banner still gets
    the server's banner meanwhile."""
    agent, port = ssh_listen_agent(harness, tmp_path)
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b"SSH-2.0-slow")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    t0 = time.monotonic()
    closed = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
            probe.sendall(b"SSH-2.0-probe\r\n")
            assert probe.recv(100).startswith(b"SSH-2.0-")
        for _ in range(100000):
            if closed == len(socks) or time.monotonic() - t0 > SSH_LOGIN_GRACE_S + 5:
                break
            for key, _ in sel.select(1.0):
                try:
                    b = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    b = b""
                if not b:
                    closed += 1
                    sel.unregister(key.fileobj)
    finally:
        for s in socks:
            s.close()
        sel.close()
    took = time.monotonic() - t0
    assert closed == len(socks), "%d of %d unauthenticated SSH connections still open after " \
        "%.0fs" % (len(socks) - closed, len(socks), took)
    assert took >= SSH_LOGIN_GRACE_S - 1, "closed after %.1fs, before the grace time" % took
    wait_until(lambda: "not authenticated within 3000 ms" in agent.stderr(), timeout=10,
               what="the agent to log why it closed them")
    assert agent.alive(), agent.describe()


def test_tunnel_ssh_stream_that_never_logs_in_is_ended_after_the_grace(harness, tmp_path):
    """The grace time holds for SSH over the tunnel too: a websocket to /ssh that stops
    after the agent's banner (no key exchange, no login) is ended by the agent after
    --ssh-login-grace, its reason logged; a new stream gets a banner meanwhile."""
    relay = harness.relay()
    agent = harness.agent(relay, "alpha",
                          extra=["--ssh-login-grace", "%ds" % SSH_LOGIN_GRACE_S])
    url = "%s/api/v1/workspaces/alpha/ssh" % relay.url
    headers = {"Authorization": "Bearer " + harness.tokens.user_token()}

    async def go():
        silent = await websockets.connect(url, extra_headers=headers, max_size=None,
                                          ping_interval=None, open_timeout=15)
        probe = await websockets.connect(url, extra_headers=headers, max_size=None,
                                         ping_interval=None, open_timeout=15)
        banner = await asyncio.wait_for(probe.recv(), 10)
        await probe.close()
        # The stream's end reaches the client as an empty message (PROTOCOL.md: the byte
        # stream's EOF), or as the close.
        t0, got = time.monotonic(), b""
        try:
            for _ in range(1000):
                m = await asyncio.wait_for(silent.recv(), SSH_LOGIN_GRACE_S + 10)
                if not m:
                    break
                got += m
        except websockets.exceptions.ConnectionClosed:
            pass
        await silent.close()
        return banner, got, time.monotonic() - t0
    banner, got, secs = asyncio.run(go())
    assert bytes(banner).startswith(b"SSH-2.0-"), banner
    assert got.startswith(b"SSH-2.0-"), got[:100]
    assert secs >= SSH_LOGIN_GRACE_S - 1, "ended after %.1fs, before the grace time" % secs
    wait_until(lambda: "a tunnel connection was not authenticated within 3000 ms" in
               agent.stderr(), timeout=10, what="the agent to log why it ended the stream")
    assert agent.alive(), agent.describe()


def test_agent_ssh_listen_caps_unauthenticated_connections(harness, tmp_path):
    """Past SSHD_MAX_UNAUTHENTICATED (64) silent connections at once, the next are closed at
    accept with one log line per burst; once the grace time has closed the others, a new
    connection is served again."""
    agent, port = ssh_listen_agent(harness, tmp_path)
    socks = []
    try:
        for _ in range(64):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # Each held one has had the server's banner: all 64 are accepted and being served.
        for s in socks:
            s.settimeout(10)
            assert s.recv(100).startswith(b"SSH-2.0-")
        extra = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        for s in extra:
            assert connection_closed(s, timeout=10), "the 65th and later were not refused"
            s.close()
        log = agent.stderr()
        assert log.count("local connections refused while 64 are not authenticated") == 1, log
        for s in socks:
            assert connection_closed(s, timeout=SSH_LOGIN_GRACE_S + 10)
    finally:
        for s in socks:
            s.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
        probe.sendall(b"SSH-2.0-probe\r\n")
        probe.settimeout(10)
        assert probe.recv(100).startswith(b"SSH-2.0-")
    assert agent.alive(), agent.describe()



@pytest.mark.parametrize("value", ["0", "999ms", "11m", "abc", "-1s"])
def test_ssh_login_grace_is_validated(harness, value):
    r = harness.run("agent", "--url", "ws://127.0.0.1:1", "--token-file",
                    harness.tokens.agent_file("alpha"), "--ssh-login-grace", value, timeout=30)
    assert r.returncode == 2, (value, r.returncode, r.stderr)
    assert r.stderr.strip() == "tether: bad --ssh-login-grace '%s' (e.g. 30s, 2m; from 1s to " \
        "10m)" % value, r.stderr
