"""A hostile relay against the real agent.

A python websockets *server* plays the relay: the real `tether agent` dials it. It checks the
agent's handshake (path, bearer token, subprotocol), does HELLO, opens tcp streams to local
target servers, and then breaks a rule. Stream faults must be answered with RST on that
stream (the connection goes on); connection faults with GOAWAY PROTOCOL, after which the
agent closes and dials again by itself.
"""
import asyncio
import hashlib
import random
import socket
import threading
import time

import pytest
import websockets

import tetherproto as tp
from conftest import SourceServer, TcpServer, echo_handler
from wspeer import Peer, PeerClosed

MiB = 1024 * 1024


class FakeRelay:
    """websockets.serve on 127.0.0.1:0; each agent connection is queued as a Peer."""

    def __init__(self):
        self.conns = asyncio.Queue()
        self.count = 0
        self.handshakes = []
        self.server = None
        self.port = None
        self._done = []

    async def start(self):
        self.server = await websockets.serve(
            self._handler, "127.0.0.1", 0, subprotocols=["tether.v1"], max_size=None,
            ping_interval=None, close_timeout=5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handler(self, ws, path):
        self.count += 1
        self.handshakes.append({"path": path,
                                "authorization": ws.request_headers.get("Authorization"),
                                "subprotocol": ws.subprotocol,
                                "offered": ws.request_headers.get("Sec-WebSocket-Protocol")})
        done = asyncio.Event()
        self._done.append(done)
        await self.conns.put(Peer(ws))
        # keep the connection until the test is done with it or it closes
        closed = asyncio.ensure_future(ws.wait_closed())
        finished = asyncio.ensure_future(done.wait())
        await asyncio.wait([closed, finished], return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        finished.cancel()

    async def accept(self, timeout=15):
        return await asyncio.wait_for(self.conns.get(), timeout)

    async def stop(self):
        for d in self._done:
            d.set()
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 10)


@pytest.fixture
def agent_runner(harness):
    """start(fake_relay) -> the agent process dialing the fake relay."""
    def start(fake, extra=()):
        return harness.agent(None, "alpha", wait=False, url="ws://127.0.0.1:%d" % fake.port,
                             extra=extra)
    return start


async def agent_handshake(fake, harness, window=tp.DEFAULT_WINDOW, max_frame=tp.DEFAULT_FRAME_PAYLOAD):
    """Accepts the agent, checks its handshake, exchanges HELLO/hello/manifest."""
    peer = await fake.accept()
    hs = fake.handshakes[-1]
    assert hs["path"] == "/api/v1/agent", hs
    assert hs["authorization"] == "Bearer " + harness.tokens.agent["alpha"], hs
    assert hs["subprotocol"] == "tether.v1", hs
    first = await peer.until(lambda f: True, what="the agent's first frame")
    assert first.type == tp.HELLO, "agent's first frame is %r" % first
    await peer.send(tp.hello_frame(max_frame_payload=max_frame, initial_window=window))
    f = await peer.until(lambda f: f.type == tp.CONTROL, what="the agent's hello message")
    hello = f.control()
    assert hello["type"] == "hello", hello
    for k in ("version", "os", "arch", "hostname"):
        assert isinstance(hello.get(k), str) and hello[k], hello
    await peer.send(tp.manifest_control("alpha"))
    return peer


async def open_stream(peer, sid, port):
    await peer.send(tp.open_tcp_frame(sid, port))
    f = await peer.until(lambda f: f.stream == sid and f.type in (tp.OPEN_OK, tp.OPEN_FAIL,
                                                                  tp.RST),
                         what="answer to OPEN %d" % sid)
    assert f.type == tp.OPEN_OK, "OPEN %d answered %r" % (sid, f)


async def echo_check(peer, sid, port, nbytes=100 * 1024):
    """Opens stream sid to the echo server, sends bytes + FIN within the agent's credit,
    grants credit for what comes back, and expects the same bytes + FIN."""
    await open_stream(peer, sid, port)
    data = random.Random(sid).randbytes(nbytes)
    mfp = peer.peer_hello["max_frame_payload"]
    st = peer.stream(sid)
    window = tp.DEFAULT_WINDOW  # what our HELLO granted the agent
    granted = window
    sent = 0
    fin_sent = False

    async def loop():
        nonlocal granted, sent, fin_sent
        for _ in range(100000):
            if st.fin or st.rst is not None:
                return
            limit = st.credit if st.credit is not None else peer.peer_hello["initial_window"]
            frames = []
            while sent < len(data) and sent < limit:
                n = min(mfp, len(data) - sent, limit - sent)
                frames.append(tp.data_frame(sid, data[sent:sent + n]))
                sent += n
            if sent == len(data) and not fin_sent:
                frames.append(tp.data_frame(sid, b"", fin=True))
                fin_sent = True
            if st.data_len > granted - window // 2:
                granted = st.data_len + window
                frames.append(tp.credit_frame(sid, granted))
            if frames:
                await peer.send(*frames)
            await peer.recv_message(10)
    await asyncio.wait_for(loop(), 30)
    assert st.rst is None, "echo stream %d reset: %r" % (sid, st.rst)
    assert bytes(st.data) == data


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def echo(servers):
    return servers.echo()


def blackhole_handler(stop):
    """Accepts and never reads."""
    def handle(conn, idx):
        stop.wait(60)
    return handle


def test_handshake_and_echo(harness, agent_runner, echo):
    """The baseline: the fake relay works with the real agent."""
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await echo_check(peer, 2, echo.port)
            await echo_check(peer, 4, echo.port, nbytes=MiB)
        finally:
            await fake.stop()
        assert proc.alive()
    run(go())


def test_data_beyond_credit_rst_flow(harness, agent_runner, servers, echo):
    """Send far more than the agent's window on a stream whose target does not read: the
    agent must answer RST FLOW for that stream, and the connection goes on."""
    stop = threading.Event()
    hole = servers.custom(blackhole_handler(stop), rcvbuf=4096)

    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            window = peer.peer_hello["initial_window"]
            mfp = peer.peer_hello["max_frame_payload"]
            await open_stream(peer, 2, hole.port)
            chunk = b"\xab" * mfp
            total = window + 8 * MiB
            sent = 0
            st = peer.stream(2)
            while sent < total and st.rst is None:
                await peer.send(tp.data_frame(2, chunk))
                sent += len(chunk)
                # keep reading (CREDIT, RST) without blocking
                try:
                    await peer.recv_message(0.001)
                except asyncio.TimeoutError:
                    pass
            await peer.until_state(lambda: st.rst is not None, timeout=15,
                                   what="RST on stream 2")
            granted = max([window] + st.credits)
            assert sent > granted, "premise: we sent %d, within the %d granted" % (sent, granted)
            assert st.rst[0] == tp.CODE_FLOW, "RST code %r, wanted FLOW" % (st.rst,)
            assert peer.goaway is None, "a stream fault must not end the connection: %r" % (
                peer.goaway,)
            # the connection still works
            await echo_check(peer, 4, echo.port)
            assert fake.count == 1
        finally:
            stop.set()
            await fake.stop()
        assert proc.alive(), proc.describe()
    run(go(), timeout=90)


@pytest.mark.parametrize("offsets", [
    pytest.param("backwards", id="credit_backwards"),
    pytest.param("below_initial", id="credit_below_initial_window"),
    pytest.param("too_far_ahead", id="credit_more_than_16MiB_ahead"),
])
def test_bad_credit_rst_flow(harness, agent_runner, echo, offsets):
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            w = tp.DEFAULT_WINDOW
            await open_stream(peer, 2, echo.port)
            if offsets == "backwards":
                frames = [tp.credit_frame(2, w + 65536), tp.credit_frame(2, w + 1000)]
            elif offsets == "below_initial":
                frames = [tp.credit_frame(2, 1000)]
            else:
                frames = [tp.credit_frame(2, tp.MAX_WINDOW + 1)]
            await peer.send(*frames)
            st = peer.stream(2)
            await peer.until_state(lambda: st.rst is not None or peer.goaway is not None,
                                   timeout=10, what="RST on stream 2")
            assert peer.goaway is None, peer.goaway
            assert st.rst[0] == tp.CODE_FLOW, st.rst
            await echo_check(peer, 4, echo.port)
        finally:
            await fake.stop()
        assert proc.alive(), proc.describe()
    run(go())


def test_equal_credit_is_fine(harness, agent_runner, echo):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await open_stream(peer, 2, echo.port)
            await peer.send(tp.credit_frame(2, tp.DEFAULT_WINDOW),
                            tp.credit_frame(2, tp.DEFAULT_WINDOW + 10),
                            tp.credit_frame(2, tp.DEFAULT_WINDOW + 10))
            await peer.drain_for(1.0)
            assert peer.stream(2).rst is None and peer.goaway is None
            await echo_check(peer, 4, echo.port)
        finally:
            await fake.stop()
    run(go())


CONNECTION_FAULTS = [
    ("reused_stream_id", lambda port: [tp.open_tcp_frame(2, port)]),  # stream 2 is open
    ("wrong_parity_open", lambda port: [tp.open_tcp_frame(3, port)]),
    ("decreasing_id", lambda port: [tp.open_tcp_frame(6, port), tp.open_tcp_frame(4, port)]),
    ("unknown_type", lambda port: [tp.frame(12, 0, b"")]),
    ("oversized_data", lambda port: [tp.header(tp.DATA, 0, 2, 0x7FFFFFFF)]),
    ("data_never_opened", lambda port: [tp.data_frame(10, b"x")]),
    ("malformed_manifest", lambda port: [tp.control_frame({"type": "manifest"})]),
    ("malformed_json", lambda port: [tp.control_frame(b"{{")]),
    ("second_hello", lambda port: [tp.hello_frame()]),
    ("partial_frame", lambda port: [tp.header(tp.PING, 0, 0, 8) + b"abc"]),
    ("text_message", lambda port: ["text"]),
]


@pytest.mark.parametrize("name,make", CONNECTION_FAULTS, ids=[c[0] for c in CONNECTION_FAULTS])
def test_connection_fault_goaway_and_reconnect(harness, agent_runner, echo, name, make):
    """Open stream 2, then break a connection rule: GOAWAY PROTOCOL, the websocket closes,
    the agent stays alive and dials again."""
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await open_stream(peer, 2, echo.port)
            for m in make(echo.port):
                if isinstance(m, str):
                    await peer.send_raw(m)
                else:
                    await peer.send(m)
            await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
            # the agent reconnects by itself (backoff starts at 100 ms)
            peer2 = await agent_handshake(fake, harness)
            assert fake.count == 2
            await echo_check(peer2, 2, echo.port)
        finally:
            await fake.stop()
        assert proc.alive(), proc.describe()
    run(go())


def test_open_before_hello_is_fault(harness, agent_runner, echo):
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await fake.accept()
            await peer.send(tp.open_tcp_frame(2, echo.port))
            await peer.expect_goaway_and_close(tp.CODE_PROTOCOL)
            peer2 = await agent_handshake(fake, harness)
            await echo_check(peer2, 2, echo.port)
        finally:
            await fake.stop()
        assert proc.alive(), proc.describe()
    run(go())


def test_open_refused_and_unknown_kind(harness, agent_runner):
    """OPEN to a closed port: OPEN_FAIL REFUSED. Unknown kind: OPEN_FAIL UNSUPPORTED."""
    from conftest import free_port

    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await peer.send(tp.open_tcp_frame(2, free_port()))
            f = await peer.until(lambda f: f.stream == 2, what="answer to OPEN 2")
            assert f.type == tp.OPEN_FAIL and f.reason()[0] == tp.CODE_REFUSED, f
            await peer.send(tp.frame(tp.OPEN, 4, bytes([200, 0, 0, 0]) + b"whatever"))
            f = await peer.until(lambda f: f.stream == 4, what="answer to OPEN 4")
            assert f.type == tp.OPEN_FAIL and f.reason()[0] == tp.CODE_UNSUPPORTED, f
            assert peer.goaway is None
        finally:
            await fake.stop()
    run(go())


@pytest.mark.parametrize("window", [tp.DEFAULT_WINDOW, 65536])
def test_consumer_stops_reading_agent_sends_exactly_window(harness, agent_runner, servers,
                                                           window):
    """The fake relay never grants credit: the agent must send exactly the initial window it
    was given (our HELLO), then nothing more; one CREDIT later lets exactly that much more
    through."""
    src = servers.source(64 * MiB, seed=21)

    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness, window=window)
            st = peer.stream(2)
            st.keep_data = True
            await open_stream(peer, 2, src.port)
            await peer.until_state(lambda: st.data_len >= window, timeout=15,
                                   what="the first window of DATA")
            await peer.drain_for(2.5)
            assert st.data_len == window, "agent sent %d bytes with %d credit" % (
                st.data_len, window)
            assert st.rst is None and peer.goaway is None
            more = 100000
            await peer.send(tp.credit_frame(2, window + more))
            await peer.until_state(lambda: st.data_len >= window + more, timeout=15,
                                   what="DATA for the new credit")
            await peer.drain_for(1.5)
            assert st.data_len == window + more, st.data_len
            # what arrived is the source's stream, in order
            expect = b"".join(bytes(c) for c in src.gen.chunks(window + more))
            assert bytes(st.data) == expect
        finally:
            await fake.stop()
        assert proc.alive(), proc.describe()
    run(go())


def test_agent_rst_on_target_close_is_clean(harness, agent_runner, servers):
    """A target that sends a little and closes: DATA then FIN, no RST."""
    def handler(conn, idx):
        conn.sendall(b"bye now")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    srv = servers.custom(handler)

    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await open_stream(peer, 2, srv.port)
            st = peer.stream(2)
            await peer.until_state(lambda: st.fin or st.rst, timeout=10, what="FIN")
            assert st.fin and st.rst is None, (st.fin, st.rst)
            assert bytes(st.data) == b"bye now"
            await peer.send(tp.data_frame(2, b"", fin=True))
            await peer.drain_for(1.0)
            assert st.rst is None, st.rst
        finally:
            await fake.stop()
    run(go())


def test_agent_answers_ping(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await peer.send(tp.ping_frame(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
            f = await peer.until(lambda f: f.type == tp.PONG, what="PONG")
            assert f.payload == b"\x01\x02\x03\x04\x05\x06\x07\x08"
        finally:
            await fake.stop()
    run(go())


def test_relay_shutdown_goaway_agent_reconnects(harness, agent_runner, echo):
    """A graceful GOAWAY SHUTDOWN from the relay and a close: the agent dials again."""
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await peer.send(tp.goaway_frame(0, tp.CODE_SHUTDOWN, "bye"))
            await peer.ws.close()
            peer2 = await agent_handshake(fake, harness)
            await echo_check(peer2, 2, echo.port)
        finally:
            await fake.stop()
        assert proc.alive()
    run(go())


def test_agent_respects_max_frame_payload(harness, agent_runner, servers):
    """Our HELLO says max_frame_payload 16 KiB: every DATA frame from the agent is at most
    that, and the bytes are the source's, in order."""
    mfp = 16384
    total = 2 * MiB
    src = servers.source(total, seed=22)

    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness, max_frame=mfp)
            st = peer.stream(2)
            await open_stream(peer, 2, src.port)
            granted = tp.DEFAULT_WINDOW
            for _ in range(100000):
                if st.fin or st.rst is not None:
                    break
                await peer.recv_message(10)
                if st.data_len > granted - tp.DEFAULT_WINDOW // 2:
                    granted = st.data_len + tp.DEFAULT_WINDOW
                    await peer.send(tp.credit_frame(2, granted))
            assert st.fin and st.rst is None, (st.fin, st.rst)
            sizes = [len(f.payload) for f in peer.frames if f.type == tp.DATA and f.stream == 2]
            assert max(sizes) <= mfp, "DATA frame of %d bytes > %d" % (max(sizes), mfp)
            assert len(st.data) == total
            assert hashlib.sha256(st.data).hexdigest() == src.digests[0]
        finally:
            await fake.stop()
    run(go())


def test_shutdown_control_stops_agent(harness, agent_runner, echo):
    """PROTOCOL.md 12.4: on a `shutdown` control message the agent ends its sessions, sends
    GOAWAY SHUTDOWN, closes the connection and does not reconnect."""
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            await open_stream(peer, 2, echo.port)
            await peer.send(tp.control_frame({"type": "shutdown", "reason": "workspace stopped"}))
            await peer.expect_goaway_and_close(tp.CODE_SHUTDOWN, timeout=10)
            # no new connection for a while (the first retry would come after 100-200 ms)
            try:
                await fake.accept(timeout=3)
                reconnected = True
            except asyncio.TimeoutError:
                reconnected = False
            assert not reconnected, "the agent reconnected after being asked to shut down"
        finally:
            await fake.stop()
        return proc
    run(go())
