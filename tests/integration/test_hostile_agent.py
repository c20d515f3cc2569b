"""A hostile agent against the relay.

The Python peer connects to /api/v1/agent with workspace alpha's valid agent token and breaks
one rule of PROTOCOL.md per test. Each connection fault must be answered with GOAWAY
PROTOCOL (type 10, code 1) and a closed websocket; afterwards the relay is alive and the
other workspaces (beta's real agent, through a real `tether forward`) work as before.
"""
import asyncio
import struct

import pytest
import websockets

import tetherproto as tp
from conftest import echo_roundtrip, proc_rss_kib
from test_hostile_client import OP_BINARY, OP_CLOSE, close_payload, ws_frame
from wspeer import Peer, PeerClosed


@pytest.fixture(scope="module")
def env(module_env):
    return module_env


async def connect_agent(env, token=None, subprotocols=("tether.v1",)):
    token = token or env.tokens.agent["alpha"]
    ws = await websockets.connect(
        env.relay.url + "/api/v1/agent", subprotocols=list(subprotocols) or None,
        extra_headers={"Authorization": "Bearer " + token}, max_size=None, ping_interval=None,
        open_timeout=15, close_timeout=5)
    return Peer(ws)


async def handshake(peer):
    """HELLO + control hello; waits for the relay's HELLO and manifest."""
    await peer.send(tp.hello_frame(), tp.agent_hello_control())
    first = await peer.until(lambda f: True, what="the relay's first frame")
    assert first.type == tp.HELLO, "relay's first frame is %r, not HELLO" % first
    await peer.until(lambda f: f.type == tp.CONTROL and f.control().get("type") == "manifest",
                     what="manifest")
    assert peer.controls[-1]["workspace"] == "alpha"


def others_still_work(env):
    assert env.relay.proc.alive(), "relay died:\n" + env.relay.proc.describe()
    echo_roundtrip(env.forward.port, nbytes=128 * 1024)
    for ws in ("beta", "gamma"):
        assert env.relay.connected(ws), "workspace %s lost its agent" % ws


def run(coro, timeout=40):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# Each case: (name, list of raw websocket messages to send after the handshake).
# bytes = one binary message; str = one text message.
H = tp.header
CASES = [
    ("oversized_data_length", [H(tp.DATA, 0, 1, 0xFFFFFFF0) + b"x" * 64]),
    # one byte over the max_frame_payload the relay advertised, with the whole payload sent
    ("oversized_data_just_over", lambda peer: [
        H(tp.DATA, 0, 1, peer.peer_hello["max_frame_payload"] + 1)
        + b"x" * (peer.peer_hello["max_frame_payload"] + 1)]),
    ("oversized_control", [H(tp.CONTROL, 0, 0, tp.MAX_CONTROL + 1) + b"{"]),
    ("hello_length_not_multiple_of_6", [H(tp.HELLO, 0, 0, 7) + b"\0" * 7]),
    ("unknown_type_12", [tp.frame(12, 0, b"")]),
    ("unknown_type_0", [tp.frame(0, 0, b"")]),
    ("unknown_type_255", [tp.frame(255, 1, b"abc")]),
    ("bad_version", [tp.frame(tp.PING, 0, b"\0" * 8, version=2)]),
    ("undefined_flag_on_ping", [tp.frame(tp.PING, 0, b"\0" * 8, flags=0x0002)]),
    ("fin_flag_on_credit", [tp.frame(tp.CREDIT, 1, tp.encode_credit(1), flags=tp.FLAG_FIN)]),
    ("undefined_flag_on_data", [tp.frame(tp.DATA, 1, b"x", flags=0x8000)]),
    ("session_frame_on_stream", [tp.frame(tp.PING, 3, b"\0" * 8)]),
    ("stream_frame_on_stream_0", [tp.frame(tp.DATA, 0, b"x")]),
    ("data_never_opened_even", [tp.data_frame(4, b"hello")]),
    ("data_never_opened_odd", [tp.data_frame(7, b"hello")]),
    ("credit_never_opened", [tp.credit_frame(6, 1 << 20)]),
    ("rst_never_opened", [tp.rst_frame(8, tp.CODE_CANCEL)]),
    ("open_ok_never_opened", [tp.frame(tp.OPEN_OK, 2, b"")]),
    ("open_wrong_parity", [tp.open_tcp_frame(2, 80)]),
    ("open_malformed_payload", [tp.frame(tp.OPEN, 1, b"\x01\x00\x00\x00\x00\x00\x00")]),
    ("malformed_control_json", [tp.control_frame(b"{not json")]),
    ("control_not_object", [tp.control_frame(b"[1,2,3]")]),
    ("control_type_not_string", [tp.control_frame(b'{"type": 5}')]),
    ("control_duplicate_keys", [tp.control_frame(b'{"type":"x","type":"y"}')]),
    ("control_hello_breaks_schema", [tp.control_frame({"type": "hello", "version": 1})]),
    ("second_hello", [tp.hello_frame()]),
    ("text_message", ["this is not a binary message"]),
    ("partial_payload_at_message_end", [H(tp.PING, 0, 0, 8) + b"\0" * 4]),
    ("partial_header_at_message_end", [H(tp.PING, 0, 0, 8)[:6]]),
    ("valid_frame_then_partial", [tp.ping_frame(b"12345678") + H(tp.PING, 0, 0, 8)]),
    ("goaway_text_with_control_char", [tp.frame(tp.GOAWAY, 0, tp.encode_goaway(0, 0, "a\nb"))]),
]


@pytest.mark.parametrize("name,messages", CASES, ids=[c[0] for c in CASES])
def test_connection_fault_goaway(env, name, messages):
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        for m in (messages(peer) if callable(messages) else messages):
            await peer.send_raw(m)
        g = await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
        return g
    last, code, text = run(go())
    assert code == tp.CODE_PROTOCOL
    others_still_work(env)


def test_frame_before_hello(env):
    """A fresh connection whose first frame is not HELLO."""
    async def go():
        peer = await connect_agent(env)
        await peer.send(tp.ping_frame(b"abcdefgh"))
        return await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
    run(go())
    others_still_work(env)


def test_open_before_hello(env):
    async def go():
        peer = await connect_agent(env)
        await peer.send(tp.open_tcp_frame(1, 80))
        return await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
    run(go())
    others_still_work(env)


def test_hello_setting_out_of_range(env):
    async def go():
        peer = await connect_agent(env)
        bad = struct.pack(">HI", tp.SETTING_INITIAL_WINDOW, 1)  # below 16 KiB
        await peer.send(tp.frame(tp.HELLO, 0, bad))
        return await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
    run(go())
    others_still_work(env)


def test_agent_open_refused_unsupported(env):
    """Agents open no streams in v1: a well-formed OPEN (odd id) gets OPEN_FAIL UNSUPPORTED
    and the connection goes on."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        await peer.send(tp.open_tcp_frame(1, 80))
        f = await peer.until(lambda f: f.stream == 1 and f.type in (tp.OPEN_FAIL, tp.OPEN_OK,
                                                                    tp.GOAWAY), what="answer")
        assert f.type == tp.OPEN_FAIL, f
        assert f.reason()[0] == tp.CODE_UNSUPPORTED
        # the connection is still usable: PING is answered
        await peer.send(tp.ping_frame(b"pingpong"))
        f = await peer.until(lambda f: f.type in (tp.PONG, tp.GOAWAY), what="PONG")
        assert f.type == tp.PONG and f.payload == b"pingpong"
        await peer.ws.close()
    run(go())


def test_open_reused_id(env):
    """OPEN 1 (refused: UNSUPPORTED), then OPEN 1 again: ids are never reused -> GOAWAY."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        await peer.send(tp.open_tcp_frame(1, 80))
        f = await peer.until(lambda f: f.stream == 1, what="answer to OPEN 1")
        assert f.type == tp.OPEN_FAIL, f
        await peer.send(tp.open_tcp_frame(1, 80))
        return await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
    run(go())
    others_still_work(env)


def test_open_decreasing_id(env):
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        await peer.send(tp.open_tcp_frame(5, 80))
        f = await peer.until(lambda f: f.stream == 5, what="answer to OPEN 5")
        assert f.type == tp.OPEN_FAIL, f
        await peer.send(tp.open_tcp_frame(3, 80))
        return await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
    run(go())
    others_still_work(env)


def test_frame_for_closed_stream_ignored(env):
    """DATA for a stream that was opened and has finished (id <= highest opened) is ignored,
    not a connection error."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        await peer.send(tp.open_tcp_frame(3, 80))
        f = await peer.until(lambda f: f.stream == 3, what="answer to OPEN 3")
        assert f.type == tp.OPEN_FAIL
        await peer.send(tp.data_frame(3, b"late"), tp.data_frame(1, b"older"),
                        tp.ping_frame(b"stillok?"))
        f = await peer.until(lambda f: f.type in (tp.PONG, tp.GOAWAY), what="PONG")
        assert f.type == tp.PONG, "frame for a closed stream was treated as a fault: %r" % (
            peer.goaway,)
        await peer.ws.close()
    run(go())


def test_hostile_agent_replaced_by_real_one(env):
    """While a hostile agent holds alpha, a real agent connecting for alpha replaces it with
    GOAWAY REPLACED."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        agent = env.harness.agent(env.relay, "alpha", wait=False)
        try:
            g = await peer.expect_goaway_and_close(tp.CODE_REPLACED, timeout=20)
        finally:
            agent.kill()
        return g
    run(go())
    others_still_work(env)


def test_wrong_token_and_wrong_class(env):
    async def status_of(token):
        try:
            ws = await websockets.connect(
                env.relay.url + "/api/v1/agent", subprotocols=["tether.v1"],
                extra_headers={"Authorization": "Bearer " + token}, open_timeout=15)
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
        await ws.close()
        return 101
    for tok in ("nope", env.tokens.user_token()):
        line = None
        try:
            st = run(status_of(tok))
        except websockets.exceptions.InvalidMessage:
            # the status code itself, read off the wire (see test_ws_client for the
            # handshake-version check)
            from test_ws_client import raw_upgrade
            line = raw_upgrade(env.relay, "/api/v1/agent", tok).split("\r\n")[0]
            st = int(line.split()[1])
        assert st == 401, (tok[:6], st, line)
    others_still_work(env)


@pytest.mark.plain_build
def test_flood_of_bad_connections_does_not_grow_relay(env):
    """50 hostile connections in a row: the relay stays alive and its memory flat."""
    before = proc_rss_kib(env.relay.pid)

    async def one(i):
        peer = await connect_agent(env)
        await peer.send(tp.hello_frame(), tp.agent_hello_control())
        await peer.send(H(tp.DATA, 0, 1, 0xFFFFFFFF))
        try:
            await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
        except AssertionError:
            raise

    async def go():
        for i in range(50):
            await one(i)
    run(go(), timeout=120)
    after = proc_rss_kib(env.relay.pid)
    assert after - before < 16 * 1024, "relay RSS grew by %d KiB" % (after - before)
    others_still_work(env)


# ---- the relay's side of streams, seen from a (scripted) agent --------------------------

async def client_ws(env, port, ws_name="alpha"):
    return await websockets.connect(
        "%s/api/v1/workspaces/%s/tcp/%d" % (env.relay.url, ws_name, port),
        extra_headers={"Authorization": "Bearer " + env.tokens.user_token()},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


async def client_close_code(client, timeout=10):
    """Reads the client websocket until it closes; returns (code, reason, bytes received)."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(100000):
        left = deadline - loop.time()
        assert left > 0, "client websocket did not close within %ss" % timeout
        try:
            m = await asyncio.wait_for(client.recv(), left)
        except websockets.exceptions.ConnectionClosed as e:
            return e.code, e.reason, bytes(got)
        got += m
    raise AssertionError("unreachable")


async def scripted_open(env, peer, port):
    """A client connects to alpha:port; returns (client websocket, stream id the relay
    opened)."""
    client = await client_ws(env, port)
    f = await peer.until(lambda f: f.type == tp.OPEN, what="the relay's OPEN")
    assert f.stream % 2 == 0 and f.stream != 0, "relay opened stream %d (must be even)" % f.stream
    # tcp 127.0.0.1:port
    assert f.payload == tp.encode_open_tcp(port, "127.0.0.1"), f.payload
    return client, f.stream


@pytest.mark.parametrize("code,text,expect_code", [
    (tp.CODE_REFUSED, "connection refused", 4004),
    (tp.CODE_FORBIDDEN, "not by policy", 4008),
    (tp.CODE_UNREACHABLE, "no route", 4005),
    (0, "zero", 4001),  # OPEN_FAIL 0 must never read as success: treated as PROTOCOL
])
def test_open_fail_maps_to_client_close_code(env, code, text, expect_code):
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        client, sid = await scripted_open(env, peer, 4321)
        await peer.send(tp.frame(tp.OPEN_FAIL, sid, tp.encode_reason(code, text)))
        c, reason, got = await client_close_code(client)
        await peer.ws.close()
        return c, reason, got
    c, reason, got = run(go())
    assert c == expect_code, (c, reason)
    if code:
        assert reason == text
    assert got == b""


@pytest.mark.parametrize("code,expect_code", [(tp.CODE_FLOW, 4002), (tp.CODE_CANCEL, 4010),
                                              (200, 4009)])
def test_rst_maps_to_client_close_code(env, code, expect_code):
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        client, sid = await scripted_open(env, peer, 4322)
        await peer.send(tp.frame(tp.OPEN_OK, sid), tp.data_frame(sid, b"partial"))
        await peer.send(tp.rst_frame(sid, code, "reset by test"))
        c, reason, got = await client_close_code(client)
        await peer.ws.close()
        return c, reason, got
    c, reason, got = run(go())
    assert c == expect_code, (c, reason)
    assert reason == "reset by test"


def test_agent_tunnel_drop_closes_clients_4010(env):
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        client, sid = await scripted_open(env, peer, 4323)
        await peer.send(tp.frame(tp.OPEN_OK, sid), tp.data_frame(sid, b"hello"))
        await peer.ws.close()  # the agent's tunnel goes away
        return await client_close_code(client)
    c, reason, got = run(go())
    assert c == 4010, (c, reason)
    assert got == b"hello"


def test_agent_frames_after_its_close_frame_go_nowhere(env):
    """The agent's close frame ends what the relay takes from it: DATA in the same write
    before the close reaches the client, DATA after it (which lws still passes on) does
    not, and the client is then closed 4010 as for any tunnel drop."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        client, sid = await scripted_open(env, peer, 4324)
        await peer.send(tp.frame(tp.OPEN_OK, sid))
        raw = (ws_frame(OP_BINARY, tp.data_frame(sid, b"before")) +
               ws_frame(OP_CLOSE, close_payload(1000)) +
               ws_frame(OP_BINARY, tp.data_frame(sid, b"after")))
        peer.ws.transport.write(raw)  # one write: the relay reads all three at once
        return await client_close_code(client)
    c, reason, got = run(go())
    assert got == b"before", got
    assert c == 4010, (c, reason)


def test_relay_respects_agent_window_and_frame_size(env):
    """The scripted agent advertises max_frame_payload 16 KiB and initial_window 64 KiB and
    grants no credit: the relay forwards exactly 64 KiB of the client's upload, in DATA frames
    of at most 16 KiB, then stops; one CREDIT lets exactly that much more through; the client's
    end-of-stream arrives as FIN after all its bytes."""
    window, mfp = 65536, 16384
    upload = bytes(range(256)) * (1024 * 3)  # 768 KiB

    async def go():
        peer = await connect_agent(env)
        await peer.send(tp.hello_frame(max_frame_payload=mfp, initial_window=window),
                        tp.agent_hello_control())
        await peer.until(lambda f: f.type == tp.CONTROL, what="manifest")
        client, sid = await scripted_open(env, peer, 4324)
        await peer.send(tp.frame(tp.OPEN_OK, sid))
        await client.send(upload)
        await client.send(b"")  # end of stream
        st = peer.stream(sid)
        await peer.until_state(lambda: st.data_len >= window, timeout=10,
                               what="the first window of DATA")
        await peer.drain_for(2.0)
        assert st.data_len == window, "relay sent %d bytes with %d credit" % (st.data_len, window)
        sizes = [len(f.payload) for f in peer.frames if f.type == tp.DATA and f.stream == sid]
        assert max(sizes) <= mfp, "DATA frame of %d bytes > max_frame_payload %d" % (
            max(sizes), mfp)
        assert not st.fin
        # grant the rest in steps, as a receiver draining its socket would
        granted = window
        for _ in range(200):
            if st.fin or granted >= len(upload) + window:
                break
            granted += window
            await peer.send(tp.credit_frame(sid, granted))
            await peer.until_state(lambda: st.data_len >= min(granted, len(upload)),
                                   timeout=10, what="DATA up to %d" % granted)
        await peer.until_state(lambda: st.fin, timeout=10, what="FIN")
        assert bytes(st.data) == upload
        assert st.rst is None and peer.goaway is None
        # our side ends too: the relay closes the client with 1000
        await peer.send(tp.data_frame(sid, b"bye", fin=True))
        c, reason, got = await client_close_code(client)
        await peer.ws.close()
        return c, got
    c, got = run(go(), timeout=90)
    assert got == b"bye"
    assert c == 1000


def test_relay_flow_violation_by_agent_rst_flow(env):
    """The scripted agent sends more DATA than the relay's window: RST FLOW for that stream,
    the client is closed with 4002, and the tunnel stays up."""
    async def go():
        peer = await connect_agent(env)
        await handshake(peer)
        window = peer.peer_hello["initial_window"]
        mfp = peer.peer_hello["max_frame_payload"]
        client, sid = await scripted_open(env, peer, 4325)
        await peer.send(tp.frame(tp.OPEN_OK, sid))
        # The client does not read; send window + 16 MiB without waiting for credit. The
        # relay grants credit for what the client's socket takes, and loopback's buffers
        # and the client library's queue take a few MiB before the socket is full.
        total = window + 16 * 1024 * 1024
        frames = [tp.data_frame(sid, b"\x11" * mfp) for _ in range(total // mfp)]
        for i in range(0, len(frames), 8):
            await peer.send(*frames[i:i + 8])
        st = peer.stream(sid)
        await peer.until_state(lambda: st.rst is not None or peer.goaway is not None,
                               timeout=10, what="RST FLOW")
        granted = max([window] + st.credits)
        assert total > granted, "premise: sent %d within credit %d" % (total, granted)
        assert peer.goaway is None, peer.goaway
        assert st.rst[0] == tp.CODE_FLOW, st.rst
        c, reason, _ = await client_close_code(client)
        await peer.send(tp.ping_frame(b"still-up"))
        f = await peer.until(lambda f: f.type == tp.PONG, what="PONG")
        await peer.ws.close()
        return c
    c = run(go(), timeout=60)
    assert c == 4002, c
