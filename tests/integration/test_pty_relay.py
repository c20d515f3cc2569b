"""The relay's reconnecting-terminal endpoint /api/v1/workspaces/NAME/pty (PROTOCOL.md 14.7).

A scripted agent (Python, tetherproto + wspeer) holds workspace alpha's tunnel and plays the
agent's side of pty streams (PROTOCOL.md 3.2): it checks the OPEN the relay sends, answers
with zlib-compressed records under the relay's credit, and reads what the client typed as
records. The client is python websockets, as a browser terminal would be.
"""
import asyncio
import json
import os
import random
import socket
import urllib.parse
import uuid
import zlib

import pytest
import websockets
import websockets.exceptions

import tetherproto as tp
from conftest import proc_rss_kib, wait_until
from wspeer import Peer

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def env(module_env):
    return module_env


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- the scripted agent ----------------------------------------------------------------

async def connect_agent(env):
    ws = await websockets.connect(
        env.relay.url + "/api/v1/agent", subprotocols=["tether.v1"],
        extra_headers={"Authorization": "Bearer " + env.tokens.agent["alpha"]},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)
    peer = Peer(ws)
    await peer.send(tp.hello_frame(), tp.control_frame({
        "type": "hello", "version": "0.0-scripted", "os": "linux", "arch": "x86_64",
        "hostname": "scripted", "capabilities": ["pty"]}))
    await peer.until(lambda f: f.type == tp.CONTROL and f.control().get("type") == "manifest",
                     what="manifest")
    return peer


def query(pty_id=None, rows=24, cols=80, command=None, extra=()):
    args = [("id", str(pty_id or uuid.uuid4())), ("rows", str(rows)), ("cols", str(cols))]
    if command is not None:
        args.append(("command", command))
    args += list(extra)
    return "&".join("%s=%s" % (k, urllib.parse.quote(v, safe="")) for k, v in args)


async def pty_client(env, q, ws_name="alpha", token=None):
    return await websockets.connect(
        "%s/api/v1/workspaces/%s/pty?%s" % (env.relay.url, ws_name, q),
        extra_headers={"Authorization": "Bearer " + (token or env.tokens.user_token())},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


class PtySide:
    """The agent's end of one pty stream: records in, compressed records out, credit kept."""

    def __init__(self, peer, sid, open_):
        self.peer = peer
        self.sid = sid
        self.open = open_
        self.rx = tp.PtyRecords()
        self.records = []       # (type, body) typed by the client, in order
        self.frames_seen = 0
        self.tx = tp.PtyDeflater()
        self.sent = 0

    def take_input(self):
        """Parses the relay's DATA frames received so far, frame by frame: each must end at a
        flush point, so whole records come out of every frame."""
        data_frames = [f for f in self.peer.frames if f.type == tp.DATA and f.stream == self.sid]
        for f in data_frames[self.frames_seen:]:
            self.records += self.rx.feed(f.payload)
            assert self.rx.partial == 0, "a DATA frame from the relay ends inside a record"
        self.frames_seen = len(data_frames)
        return self.records

    def typed(self):
        return b"".join(b for t, b in self.take_input() if t == tp.PTYREC_DATA)

    async def until_records(self, pred, timeout=10, what="records"):
        await self.peer.until_state(lambda: pred(self.take_input()), timeout=timeout, what=what)

    def credit(self):
        st = self.peer.stream(self.sid)
        return st.credit if st.credit is not None else self.peer.peer_hello["initial_window"]

    async def send_records(self, raw, chunk=32 * 1024, fin=False, timeout=60):
        """Deflates raw records in chunks (one DATA frame each, flushed) and sends them
        within the relay's credit, waiting for CREDIT as needed."""
        mfp = self.peer.peer_hello["max_frame_payload"]
        for i in range(0, len(raw), chunk):
            z = self.tx.chunk(raw[i:i + chunk])
            assert len(z) <= mfp
            if self.sent + len(z) > self.credit():
                await self.peer.until_state(lambda: self.sent + len(z) <= self.credit(),
                                            timeout=timeout, what="CREDIT from the relay")
            await self.peer.send(tp.data_frame(self.sid, z))
            self.sent += len(z)
        if fin:
            await self.peer.send(tp.data_frame(self.sid, b"", fin=True))

    async def send_raw_z(self, z, fin=False):
        """Sends bytes as they are (one frame), within credit."""
        assert self.sent + len(z) <= self.credit()
        await self.peer.send(tp.data_frame(self.sid, z, fin=fin))
        self.sent += len(z)


async def open_pty(env, peer, q, ok=True):
    """A client attaches with query q; returns (client, PtySide) once the relay's OPEN came."""
    client = await pty_client(env, q)
    f = await peer.until(lambda f: f.type == tp.OPEN, what="the relay's OPEN")
    assert f.stream % 2 == 0 and f.stream != 0
    side = PtySide(peer, f.stream, tp.decode_open(f.payload))
    if ok:
        await peer.send(tp.frame(tp.OPEN_OK, f.stream))
    return client, side


async def client_until_close(client, timeout=20):
    """Reads the client websocket to its close: (output bytes, text messages, code, reason,
    index in texts/out order: list of ('b', n) / ('t', s))."""
    out = bytearray()
    texts = []
    order = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(10000000):
        left = deadline - loop.time()
        assert left > 0, "client websocket did not close within %ss" % timeout
        try:
            m = await asyncio.wait_for(client.recv(), left)
        except websockets.exceptions.ConnectionClosed as e:
            return bytes(out), texts, e.code, e.reason, order
        if isinstance(m, str):
            texts.append(m)
            order.append(("t", m))
        else:
            out += m
            order.append(("b", len(m)))
    raise AssertionError("unreachable")


async def client_read(client, nbytes, timeout=20):
    """Reads binary output until nbytes arrived."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < nbytes:
        m = await asyncio.wait_for(client.recv(), max(deadline - loop.time(), 0.01))
        assert isinstance(m, bytes), "text before the output was complete: %r" % m
        got += m
    return bytes(got)


# ---- the OPEN ---------------------------------------------------------------------------

def test_open_carries_id_size_command_and_zlib(env):
    pty_id = uuid.UUID("8f14e45f-ceea-467a-9575-7f3d2a1b0c9e")
    command = "printf 'a+b=%s&c' \"$HOME\" && echo h\u00e9llo # 100%"

    async def go():
        peer = await connect_agent(env)
        q = query(str(pty_id).upper(), rows=40, cols=132, command=command)
        client, side = await open_pty(env, peer, q)
        await client.close()
        await peer.ws.close()
        return side.open
    o = run(go())
    assert o["kind"] == tp.KIND_PTY and o["flags"] == 0 and o["reserved"] == 0
    assert o["id"] == pty_id.bytes
    assert (o["rows"], o["cols"]) == (40, 132)
    assert o["options"] == tp.PTY_OPT_ZLIB and o["pty_reserved"] == 0
    assert o["command"] == command.encode("utf-8")


def test_open_long_multibyte_command(env):
    """A command of PROTOCOL.md's most, 4096 bytes of UTF-8 (12,288 characters
    percent-encoded), arrives byte for byte (lws's header limit, WSCTX_MAX_HEADER_DATA, is
    16 KiB on the context)."""
    command = "\u00e9\u4e2d" * 819 + "a"

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query(command=command))
        await client.close()
        await peer.ws.close()
        return side.open
    o = run(go())
    assert len(o["command"]) == 4096 and o["command"] == command.encode("utf-8")


@pytest.mark.parametrize("raw_query,rows,cols,command", [
    ("rows=24&cols=80", 24, 80, b""),                       # no command: the login shell
    ("rows=24&cols=80&command=", 24, 80, b""),              # empty: the same
    ("rows=0&cols=99999", 1, 65535, b""),                   # clamped into 1..65535
    ("rows=007&cols=65535&x=1&command=echo+hi%2B1", 7, 65535, b"echo hi+1"),  # '+' is a space
])
def test_open_query_forms(env, raw_query, rows, cols, command):
    pty_id = uuid.uuid4()

    async def go():
        peer = await connect_agent(env)
        client = await pty_client(env, "id=%s&%s" % (pty_id, raw_query))
        f = await peer.until(lambda f: f.type == tp.OPEN, what="OPEN")
        await client.close()
        await peer.ws.close()
        return tp.decode_open(f.payload)
    o = run(go())
    assert o["id"] == pty_id.bytes
    assert (o["rows"], o["cols"], o["command"]) == (rows, cols, command)


# ---- agent -> client --------------------------------------------------------------------

@pytest.mark.parametrize("how,value,status", [(0, 0, 0), (0, 3, 3), (1, 9, 137)])
def test_output_then_exit_then_1000(env, how, value, status):
    """Compressed DATA records become binary messages with exactly their bytes (records of
    other types are skipped), then {"exit": N}, then close 1000; the relay ends the stream
    with its own FIN."""
    big = random.Random(5).randbytes(300 * 1024)
    expect = b"$ make\r\n" + big + b"done\r\n"

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query(rows=30, cols=100))
        reader = asyncio.ensure_future(client_until_close(client, timeout=40))
        raw = (tp.ptyrec_data(b"$ make\r\n") + tp.ptyrec(99, b"from a later version") +
               tp.ptyrec_data(big) + tp.ptyrec_resize(1, 1) + tp.ptyrec_data(b"done\r\n") +
               tp.ptyrec_exit(value, signal=bool(how)))
        await side.send_records(raw, fin=True)
        out, texts, code, reason, order = await reader
        st = peer.stream(side.sid)
        await peer.until_state(lambda: st.fin or st.rst is not None, what="the relay's FIN")
        await peer.ws.close()
        return out, texts, code, order, st
    out, texts, code, order, st = run(go())
    assert out == expect
    assert texts == ['{"exit":%d}' % status] and json.loads(texts[0]) == {"exit": status}
    assert order[-1][0] == "t", "the exit status must come after all output"
    assert code == 1000
    assert st.fin and st.rst is None


def test_stream_end_without_exit_closes_1000_without_status(env):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await side.send_records(tp.ptyrec_data(b"bye\r\n"), fin=True)
        out, texts, code, _, _ = await client_until_close(client)
        await peer.ws.close()
        return out, texts, code
    out, texts, code = run(go())
    assert (out, texts, code) == (b"bye\r\n", [], 1000)


def test_large_output_flows_under_credit(env):
    """8 MiB of output, far more than the relay's window: the relay grants credit as the
    client reads it, and every byte arrives in order."""
    data = random.Random(11).randbytes(8 * MiB)

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        window = peer.peer_hello["initial_window"]
        reader = asyncio.ensure_future(client_until_close(client, timeout=90))
        await side.send_records(tp.ptyrec_data(data) + tp.ptyrec_exit(0), fin=True, timeout=60)
        out, texts, code, _, _ = await reader
        st = peer.stream(side.sid)
        await peer.ws.close()
        return out, texts, code, window, st.credits
    out, texts, code, window, credits = run(go(), timeout=150)
    assert len(out) == len(data) and out == data
    assert texts == ['{"exit":0}'] and code == 1000
    assert credits and max(credits) > window


# ---- client -> agent --------------------------------------------------------------------

def test_input_and_resize_arrive_as_records(env):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await client.send(b"")                                         # no input at all
        await client.send(json.dumps({"data": "ls -l\r"}))
        await client.send(b"\x03raw")                                  # binary: raw input
        await client.send(json.dumps({"rows": 50, "cols": 200}))
        await client.send(json.dumps({"cols": 2, "data": "\u00e9\u0000x", "rows": 1,
                                      "unknown": {"nested": [1]}}))
        await client.send(json.dumps({"rows": 0, "cols": -3}))         # clamped
        await client.send(json.dumps({"data": "y" * 100000}))          # over one record
        want = 6
        await side.until_records(lambda r: len(r) >= want + 1, what="%d records" % want)
        recs = side.take_input()
        await client.close()
        await peer.ws.close()
        return recs
    recs = run(go())
    assert recs[:6] == [
        (tp.PTYREC_DATA, b"ls -l\r"),
        (tp.PTYREC_DATA, b"\x03raw"),
        (tp.PTYREC_RESIZE, b"\x00\x32\x00\xc8"),
        (tp.PTYREC_DATA, "\u00e9\u0000x".encode("utf-8")),             # input goes first
        (tp.PTYREC_RESIZE, b"\x00\x01\x00\x02"),
        (tp.PTYREC_RESIZE, b"\x00\x01\x00\x01"),
    ]
    assert recs[6:] == [(tp.PTYREC_DATA, b"y" * 65535), (tp.PTYREC_DATA, b"y" * 34465)]


def test_bad_json_is_ignored_and_the_session_goes_on(env):
    bad = ["not json", "[1,2]", '"text"', '{"data": 5}', '{"rows": "24", "cols": 80}',
           '{"rows": 24}', '{"rows": 24.5, "cols": 80}', '{"data": "x"} trailing', ""]

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        for m in bad:
            await client.send(m)
        await client.send(json.dumps({"data": "still here"}))
        await side.until_records(lambda r: len(r) >= 1, what="the good message")
        await peer.drain_for(0.3)
        recs = side.take_input()
        # and output still flows the other way
        await side.send_records(tp.ptyrec_data(b"ok\r\n") + tp.ptyrec_exit(0), fin=True)
        out, texts, code, _, _ = await client_until_close(client)
        await peer.ws.close()
        return recs, out, texts, code
    recs, out, texts, code = run(go())
    assert recs == [(tp.PTYREC_DATA, b"still here")]
    assert (out, texts, code) == (b"ok\r\n", ['{"exit":0}'], 1000)
    wait_until(lambda: env.relay.proc.stderr().count("client message ignored") >= len(bad),
               timeout=5, what="a log line per ignored message")


def test_oversized_json_is_ignored(env):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await client.send(json.dumps({"data": "z" * (1024 * 1024)}))   # over 1 MiB
        await client.send(json.dumps({"data": "small"}))
        await side.until_records(lambda r: len(r) >= 1, what="the small message")
        await peer.drain_for(0.3)
        recs = side.take_input()
        await client.close()
        await peer.ws.close()
        return recs
    assert run(go()) == [(tp.PTYREC_DATA, b"small")]
    assert env.relay.proc.alive()


def test_client_close_detaches_with_rst_cancel(env):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await client.close()
        st = peer.stream(side.sid)
        await peer.until_state(lambda: st.rst is not None, what="RST")
        await peer.ws.close()
        return st.rst
    code, _ = run(go())
    assert code == tp.CODE_CANCEL


# ---- failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("code,text,expect", [
    (tp.CODE_UNSUPPORTED, "this agent serves no PTYs", 4007),
    (tp.CODE_STREAM_LIMIT, "too many PTYs", 4003),
])
def test_open_fail_closes_4000_plus_code(env, code, text, expect):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query(), ok=False)
        await peer.send(tp.frame(tp.OPEN_FAIL, side.sid, tp.encode_reason(code, text)))
        out, texts, c, reason, _ = await client_until_close(client)
        await peer.ws.close()
        return out, texts, c, reason
    out, texts, c, reason = run(go())
    assert (out, texts, c, reason) == (b"", [], expect, text)


@pytest.mark.parametrize("code,expect", [(tp.CODE_FLOW, 4002), (tp.CODE_INTERNAL, 4009),
                                         (250, 4009)])
def test_rst_closes_4000_plus_code(env, code, expect):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await side.send_records(tp.ptyrec_data(b"partial"))
        assert await client_read(client, 7) == b"partial"
        await peer.send(tp.rst_frame(side.sid, code, "client too slow"))
        out, texts, c, reason, _ = await client_until_close(client)
        await peer.ws.close()
        return texts, c, reason
    texts, c, reason = run(go())
    assert (texts, c, reason) == ([], expect, "client too slow")


@pytest.mark.parametrize("name,payload", [
    ("empty DATA record", lambda d: d.chunk(tp.ptyrec(tp.PTYREC_DATA, b""))),
    ("EXIT of 3 bytes", lambda d: d.chunk(tp.ptyrec(tp.PTYREC_EXIT, b"\0\1\2"))),
    ("EXIT how 7", lambda d: d.chunk(tp.ptyrec(tp.PTYREC_EXIT, b"\7\1"))),
    ("RESIZE of 1 byte", lambda d: d.chunk(tp.ptyrec(tp.PTYREC_RESIZE, b"\1"))),
    ("not zlib", lambda d: tp.ptyrec_data(b"plain records on a zlib stream")),
    ("zlib garbage", lambda d: d.chunk(b"")[:2] + b"\xff" * 40),
])
def test_malformed_stream_rst_protocol_and_4001(env, name, payload):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await side.send_records(tp.ptyrec_data(b"before\r\n"))
        assert await client_read(client, 8) == b"before\r\n"
        await side.send_raw_z(payload(side.tx))
        st = peer.stream(side.sid)
        await peer.until_state(lambda: st.rst is not None, what="RST from the relay")
        out, texts, c, reason, _ = await client_until_close(client)
        # the tunnel itself is fine: other streams go on
        await peer.send(tp.ping_frame(b"stillup!"))
        await peer.until(lambda f: f.type == tp.PONG, what="PONG")
        assert peer.goaway is None
        await peer.ws.close()
        return st.rst, texts, c
    rst, texts, c = run(go())
    assert rst[0] == tp.CODE_PROTOCOL, rst
    assert texts == [] and c == 4001


def test_agent_tunnel_drop_closes_4010(env):
    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        await peer.ws.close()
        return await client_until_close(client)
    _, texts, c, _, _ = run(go())
    assert texts == [] and c == 4010


@pytest.mark.plain_build
def test_zlib_bomb_keeps_relay_memory_bounded(env):
    """128 MiB of output from ~130 KB of compressed bytes (within one window), sent while
    the client does not read: the relay inflates only what its bounded queue takes, so its
    memory stays far below the output's size, and once the client reads, every byte
    arrives."""
    nrec = 2048
    total = nrec * tp.PTYREC_MAX_BODY
    zeros = bytes(tp.PTYREC_MAX_BODY)

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        window = peer.peer_hello["initial_window"]
        d = zlib.compressobj(9)
        frames = []
        cur = b""
        for i in range(nrec):
            cur += d.compress(tp.ptyrec(tp.PTYREC_DATA, zeros))
            if len(cur) > 16 * 1024 or i == nrec - 1:
                frames.append(cur + d.flush(zlib.Z_SYNC_FLUSH))
                cur = b""
        frames.append(d.compress(tp.ptyrec_exit(0)) + d.flush(zlib.Z_SYNC_FLUSH))
        assert sum(map(len, frames)) < window, "premise: the bomb fits in one window"
        before = proc_rss_kib(env.relay.pid)
        for fr in frames:
            await peer.send(tp.data_frame(side.sid, fr))
        await peer.send(tp.data_frame(side.sid, b"", fin=True))
        await peer.drain_for(2.0)          # the relay now holds it; the client reads nothing
        grown = proc_rss_kib(env.relay.pid) - before
        st = peer.stream(side.sid)
        assert st.rst is None and peer.goaway is None
        out, texts, code, _, _ = await client_until_close(client, timeout=120)
        await peer.ws.close()
        return grown, out, texts, code
    grown, out, texts, code = run(go(), timeout=180)
    assert grown < 24 * 1024, "relay RSS grew by %d KiB while holding a zlib bomb" % grown
    assert len(out) == total and out.count(0) == total
    assert texts == ['{"exit":0}'] and code == 1000


def test_credit_withheld_until_the_client_reads(env):
    """With a client that does not read, the relay grants no credit beyond what it wrote
    to the client's socket: the scripted agent, respecting credit, gets stuck well before
    all of its output is out, and gets going again once the client reads."""
    data = os.urandom(24 * MiB)  # incompressible: credit counts roughly output bytes

    async def go():
        peer = await connect_agent(env)
        client, side = await open_pty(env, peer, query())
        sender = asyncio.ensure_future(side.send_records(tp.ptyrec_data(data) +
                                                         tp.ptyrec_exit(0), fin=True,
                                                         timeout=120))
        await asyncio.sleep(3.0)
        stuck_at = side.sent
        assert not sender.done(), "the agent sent 24 MiB to a client that reads nothing"
        out, texts, code, _, _ = await client_until_close(client, timeout=120)
        await sender
        await peer.ws.close()
        return stuck_at, out, texts, code
    stuck_at, out, texts, code = run(go(), timeout=240)
    assert stuck_at < 20 * MiB
    assert out == data and texts == ['{"exit":0}'] and code == 1000


# ---- refusals before the upgrade --------------------------------------------------------

def raw_upgrade(relay, path, token):
    """Sends a websocket upgrade by hand; returns (status, body)."""
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=15)
    try:
        req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n" % (path, relay.port))
        if token is not None:
            req += "Authorization: Bearer %s\r\n" % token
        s.sendall((req + "\r\n").encode())
        data = b""
        while len(data) < 65536:
            b = s.recv(4096)
            if not b:
                break
            data += b
            if b"\r\n\r\n" in data:
                head, body = data.split(b"\r\n\r\n", 1)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        if len(body) >= int(line.split(b":")[1]):
                            return int(head.split()[1]), body.decode()
        head, _, body = data.partition(b"\r\n\r\n")
        return (int(head.split()[1]) if head else 0), body.decode("latin-1")
    finally:
        s.close()


GOOD_ID = "123e4567-e89b-12d3-a456-426614174000"


@pytest.mark.parametrize("q,why", [
    ("", "id is missing"),
    ("rows=24&cols=80", "id is missing"),
    ("id=%s&cols=80" % GOOD_ID, "rows is missing"),
    ("id=%s&rows=24" % GOOD_ID, "cols is missing"),
    ("id=123e4567e89b12d3a456426614174000&rows=24&cols=80", "UUID"),
    ("id=123e4567-e89b-12d3-a456-42661417400&rows=24&cols=80", "UUID"),
    ("id=123e4567-e89b-12d3-a456-4266141740000&rows=24&cols=80", "UUID"),
    ("id=123e4567-e89b-12d3-a456-42661417400g&rows=24&cols=80", "UUID"),
    ("id=123e4567_e89b-12d3-a456-426614174000&rows=24&cols=80", "UUID"),
    ("id=00000000-0000-0000-0000-000000000000&rows=24&cols=80", "nil UUID"),
    ("id=%s&rows=abc&cols=80" % GOOD_ID, "rows must be a decimal number"),
    ("id=%s&rows=-1&cols=80" % GOOD_ID, "rows must be a decimal number"),
    ("id=%s&rows=24&cols=" % GOOD_ID, "cols must be a decimal number"),
    ("id=%s&rows=24&cols=1234567890" % GOOD_ID, "cols must be a decimal number"),
    ("id=%s&rows=24&cols=8%%200" % GOOD_ID, "cols must be a decimal number"),
    ("id=%s&id=%s&rows=24&cols=80" % (GOOD_ID, GOOD_ID), "id is given twice"),
    ("id=%s&rows=24&cols=80&command=a&command=b" % GOOD_ID, "command is given twice"),
    ("id=%s&rows=24&cols=80&command=%s" % (GOOD_ID, "%C3%A9" * 2048 + "a"),
     "an argument is over 4104 bytes (command: at most 4096)"),
])
def test_bad_query_400(env, q, why):
    status, body = raw_upgrade(env.relay, "/api/v1/workspaces/alpha/pty?" + q,
                               env.tokens.user_token())
    assert status == 400, (status, body)
    assert json.loads(body) == {"error": "bad pty query: " + why} or why in body, body
    assert "bad pty query: " in body


def test_bad_query_with_python_websockets_400(env):
    async def go():
        try:
            await pty_client(env, "id=nope&rows=1&cols=1")
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
        return 101
    assert run(go()) == 400


def test_refusal_order(env):
    """401 before anything else, 404 before the query is looked at, 400 before 503."""
    bad = "/api/v1/workspaces/%s/pty?id=bad&rows=1&cols=1"
    good = "/api/v1/workspaces/%s/pty?" + query()
    tok = env.tokens.user_token()
    assert raw_upgrade(env.relay, bad % "alpha", None)[0] == 401
    assert raw_upgrade(env.relay, bad % "alpha", "wrong")[0] == 401
    assert raw_upgrade(env.relay, bad % "nosuch", tok)[0] == 404
    assert raw_upgrade(env.relay, bad % "beta", env.tokens.user_token("only_a"))[0] == 404
    # alpha has no agent in this module unless a test holds it
    wait_until(lambda: not env.relay.connected("alpha"), timeout=10, what="alpha offline")
    assert raw_upgrade(env.relay, bad % "alpha", tok)[0] == 400
    assert raw_upgrade(env.relay, good % "alpha", tok)[0] == 503
    assert raw_upgrade(env.relay, "/api/v1/workspaces/alpha/pty/x?" + query(), tok)[0] == 404


def test_text_still_refused_on_tcp_endpoint(env):
    async def go():
        ws = await websockets.connect(
            "%s/api/v1/workspaces/beta/tcp/%d" % (env.relay.url, env.echo.port),
            extra_headers={"Authorization": "Bearer " + env.tokens.user_token()},
            open_timeout=15, close_timeout=5)
        await ws.send('{"data": "x"}')
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.exceptions.ConnectionClosed as e:
            return e.code
        return None
    assert run(go()) == 1003


# ---- end to end: the real agent (workspace beta) ----------------------------------------

def test_real_agent_command_size_and_exit_status(env):
    async def go():
        c = await pty_client(env, query(rows=33, cols=91, command="stty size; exit 3"),
                             ws_name="beta")
        return await client_until_close(c, timeout=30)
    out, texts, code, _, _ = run(go())
    assert b"33 91" in out, out
    assert texts == ['{"exit":3}'] and code == 1000


def test_real_agent_input_resize_and_reattach(env):
    pty_id = uuid.uuid4()

    async def go():
        c = await pty_client(env, query(pty_id, command="cat"), ws_name="beta")
        await c.send(json.dumps({"data": "first\r"}))
        got = bytearray()
        while got.count(b"first") < 2:             # the echo and cat's copy
            got += await asyncio.wait_for(c.recv(), 15)
        await c.close()                            # detaches; the PTY lives on
        c = await pty_client(env, query(pty_id, command="ignored on attach"), ws_name="beta")
        replay = bytearray()
        while b"first" not in replay:
            replay += await asyncio.wait_for(c.recv(), 15)
        await c.send(json.dumps({"rows": 40, "cols": 100, "data": "second\r"}))
        await c.send(b"\x04")                      # EOF for cat: it exits 0
        out, texts, code, _, _ = await client_until_close(c, timeout=30)
        return bytes(replay + out), texts, code
    out, texts, code = run(go())
    assert b"first" in out and b"second" in out
    assert texts == ['{"exit":0}'] and code == 1000
