"""Reconnecting PTYs in the real agent, driven by a scripted relay (PROTOCOL.md 3.2).

The scripted relay opens pty streams with a client-chosen id, speaks records through zlib,
detaches (RST CANCEL), reattaches, drops the whole tunnel, and checks what a user would
notice: output replayed once and in order, two clients seeing the same bytes, the shell's
state surviving a tunnel drop, exit statuses, the TTL, the session limit, slow clients."""
import asyncio
import os
import struct
import uuid
import zlib

import pytest

import tetherproto as tp
from test_hostile_relay import FakeRelay, agent_handshake, run

pytestmark = pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs /bin/sh")

REC_DATA, REC_RESIZE, REC_EXIT = 1, 2, 3


@pytest.fixture
def agent_runner(harness, tmp_path):
    def start(fake, extra=()):
        return harness.agent(None, "alpha", wait=False, url="ws://127.0.0.1:%d" % fake.port,
                             extra=["--state-dir", str(tmp_path / "state")] + list(extra))
    return start


def open_pty_frame(sid, pty_id, rows=24, cols=80, command="", zlib_on=True):
    cmd = command.encode()
    body = pty_id + struct.pack(">HHBBH", rows, cols, 1 if zlib_on else 0, 0, len(cmd)) + cmd
    return tp.frame(tp.OPEN, sid, struct.pack(">BBH", tp.KIND_PTY, 0, 0) + body)


class PtyClient:
    """One attachment: a pty stream on the scripted relay's connection."""

    def __init__(self, peer, sid, pty_id, zlib_on=True):
        self.peer, self.sid, self.pty_id, self.zlib_on = peer, sid, pty_id, zlib_on
        self.comp = zlib.compressobj(6, zlib.DEFLATED, 15)
        self.decomp = zlib.decompressobj()
        self.plain = b""     # inflated bytes not yet parsed
        self.output = b""    # DATA records' bodies
        self.exit = None     # (how, value)
        self.consumed = 0    # stream bytes received
        self.granted = tp.DEFAULT_WINDOW

    async def open(self, rows=24, cols=80, command="", expect_ok=True):
        await self.peer.send(open_pty_frame(self.sid, self.pty_id, rows, cols, command,
                                            self.zlib_on))
        f = await self.peer.until(lambda f: f.stream == self.sid and f.type in (
            tp.OPEN_OK, tp.OPEN_FAIL), what="answer to pty OPEN %d" % self.sid)
        if expect_ok:
            assert f.type == tp.OPEN_OK, f.reason() if f.type == tp.OPEN_FAIL else f
        # The replay may have come in the same message as OPEN_OK.
        self.pump([g for g in self.peer.frames if g.stream == self.sid and g.type == tp.DATA])
        return f

    def _records(self, data):
        data = self.decomp.decompress(data) if self.zlib_on else data
        self.plain += data
        while len(self.plain) >= 3:
            t, n = self.plain[0], struct.unpack(">H", self.plain[1:3])[0]
            if len(self.plain) < 3 + n:
                break
            body = self.plain[3:3 + n]
            self.plain = self.plain[3 + n:]
            if t == REC_DATA:
                self.output += body
            elif t == REC_EXIT:
                self.exit = (body[0], body[1])

    def pump(self, frames):
        """Feeds received frames of this stream; returns a CREDIT frame to send if due."""
        for f in frames:
            if f.stream == self.sid and f.type == tp.DATA and f.payload:
                self._records(f.payload)
                self.consumed += len(f.payload)
        if self.consumed > self.granted - tp.DEFAULT_WINDOW // 2:
            self.granted = self.consumed + tp.DEFAULT_WINDOW
            return tp.credit_frame(self.sid, self.granted)
        return None

    def _wire(self, plain):
        if not self.zlib_on:
            return plain
        return self.comp.compress(plain) + self.comp.flush(zlib.Z_SYNC_FLUSH)

    async def send_input(self, text):
        b = text.encode() if isinstance(text, str) else text
        await self.peer.send(tp.data_frame(self.sid, self._wire(
            struct.pack(">BH", REC_DATA, len(b)) + b)))

    async def resize(self, rows, cols):
        await self.peer.send(tp.data_frame(self.sid, self._wire(
            struct.pack(">BHHH", REC_RESIZE, 4, rows, cols))))

    async def detach(self):
        await self.peer.send(tp.rst_frame(self.sid, tp.CODE_CANCEL, "client went away"))


async def pump_until(peer, clients, pred, timeout=15, what="output"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError("timed out waiting for %s; output so far: %r" % (
                what, [c.output[-300:] for c in clients]))
        try:
            frames = await peer.recv_message(min(left, 0.5))
        except asyncio.TimeoutError:
            continue
        credits = [c for c in (cl.pump(frames) for cl in clients) if c]
        if credits:
            await peer.send(*credits)


def new_id():
    return uuid.uuid4().bytes


def test_attach_type_and_see_output(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            c = PtyClient(peer, 2, new_id())
            await c.open(rows=30, cols=100)
            await c.send_input("echo marker-$((6*7)); stty size\n")
            await pump_until(peer, [c], lambda: b"marker-42" in c.output and b"30 100" in
                             c.output, what="the echo and the size")
            await c.resize(40, 120)
            await c.send_input("stty size\n")
            await pump_until(peer, [c], lambda: b"40 120" in c.output, what="the new size")
            await c.send_input("exit 3\n")
            await pump_until(peer, [c], lambda: c.exit is not None, what="the exit record")
            assert c.exit == (0, 3)
            await peer.until_state(lambda: peer.stream(2).fin, what="FIN after EXIT")
        finally:
            await fake.stop()
    run(go())


def test_detach_replay_once_and_two_clients(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            pid = new_id()
            a = PtyClient(peer, 2, pid)
            await a.open()
            await a.send_input("(sleep 1; echo while-de''tached) &\n")
            await pump_until(peer, [a], lambda: b"(sleep 1" in a.output, what="the echo")
            await a.detach()
            await asyncio.sleep(2)
            b = PtyClient(peer, 4, pid)
            await b.open()
            await pump_until(peer, [b], lambda: b"while-detached" in b.output,
                             what="the replay")
            assert b.output.count(b"while-detached") == 1
            # A second client on the same PTY: both see input from either.
            c = PtyClient(peer, 6, pid)
            await c.open()
            await b.send_input("echo from-b-$((1+1))\n")
            await c.send_input("echo from-c-$((2+2))\n")
            await pump_until(peer, [b, c], lambda: all(
                b"from-b-2" in x.output and b"from-c-4" in x.output for x in (b, c)),
                what="both outputs on both clients")
        finally:
            await fake.stop()
    run(go())


def test_shell_state_survives_a_tunnel_drop(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            pid = new_id()
            a = PtyClient(peer, 2, pid)
            await a.open()
            await a.send_input("cd /tmp && echo moved-$((3*3))\n")
            await pump_until(peer, [a], lambda: b"moved-9" in a.output, what="cd")
            await peer.ws.close()  # the tunnel drops; the agent dials again
            peer = await agent_handshake(fake, harness)
            b = PtyClient(peer, 2, pid)
            await b.open()
            await b.send_input("pwd\n")
            # pwd's own line (the shell may put an escape sequence before it).
            await pump_until(peer, [b], lambda: b"/tmp\r\n" in b.output, what="pwd in /tmp")
        finally:
            await fake.stop()
        assert proc.alive()
    run(go())


def test_exit_while_detached_then_gone(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake)
        try:
            peer = await agent_handshake(fake, harness)
            pid = new_id()
            a = PtyClient(peer, 2, pid)
            await a.open(command="sleep 0.5; echo last-words; exit 5")
            await a.detach()
            await asyncio.sleep(1.5)
            b = PtyClient(peer, 4, pid)
            await b.open()
            await pump_until(peer, [b], lambda: b.exit is not None, what="the exit")
            assert b"last-words" in b.output
            assert b.exit == (0, 5)
            # The session is gone: the same id starts a new process.
            c = PtyClient(peer, 6, pid)
            await c.open(command="echo fresh-start; exit 0")
            await pump_until(peer, [c], lambda: c.exit is not None, what="the new session")
            assert b"fresh-start" in c.output and b"last-words" not in c.output
        finally:
            await fake.stop()
    run(go())


def test_ttl_ends_a_detached_session(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        agent_runner(fake, extra=["--pty-ttl", "1s"])
        try:
            peer = await agent_handshake(fake, harness)
            a = PtyClient(peer, 2, new_id())
            await a.open(command="echo PID=$$; exec sleep 300")
            await pump_until(peer, [a], lambda: b"PID=" in a.output and b"\n" in
                             a.output.split(b"PID=")[1], what="the pid")
            pid = int(a.output.split(b"PID=")[1].split()[0])
            assert os.path.exists("/proc/%d" % pid)
            await a.detach()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while os.path.exists("/proc/%d" % pid) and loop.time() < deadline:
                await asyncio.sleep(0.1)
            assert not os.path.exists("/proc/%d" % pid), "the TTL did not end the process"
        finally:
            await fake.stop()
    run(go())


def test_session_limit_and_malformed_records(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake, extra=["--max-ptys", "1"])
        try:
            peer = await agent_handshake(fake, harness)
            a = PtyClient(peer, 2, new_id())
            await a.open()
            b = PtyClient(peer, 4, new_id())
            f = await b.open(expect_ok=False)
            assert f.type == tp.OPEN_FAIL
            code, text = f.reason()
            assert code == tp.CODE_STREAM_LIMIT and "too many PTYs" in text
            # An empty DATA record is malformed: RST PROTOCOL on that stream only.
            await peer.send(tp.data_frame(2, a._wire(struct.pack(">BH", REC_DATA, 0))))
            await peer.until_state(lambda: peer.stream(2).rst is not None, what="RST")
            assert peer.stream(2).rst[0] == tp.CODE_PROTOCOL
            # The PTY lives on: attach again, plain this time.
            c = PtyClient(peer, 6, a.pty_id, zlib_on=False)
            await c.open()
            await c.send_input("echo still-$((5*5))\n")
            await pump_until(peer, [c], lambda: b"still-25" in c.output, what="output")
        finally:
            await fake.stop()
        assert proc.alive()
    run(go())


def test_slow_client_is_dropped_and_can_reattach(harness, agent_runner):
    async def go():
        fake = await FakeRelay().start()
        proc = agent_runner(fake, extra=["--pty-replay", "65536"])
        try:
            peer = await agent_handshake(fake, harness)
            pid = new_id()
            a = PtyClient(peer, 2, pid, zlib_on=False)
            await a.open(command="head -c 8000000 /dev/urandom | od -An -tx1; sleep 300")
            # Never grant credit: the agent queues up to its bound, then drops us.
            await peer.until_state(lambda: peer.stream(2).rst is not None, timeout=30,
                                   what="RST for the slow client")
            assert peer.stream(2).rst[0] == tp.CODE_FLOW
            b = PtyClient(peer, 4, pid, zlib_on=False)
            await b.open()
            await pump_until(peer, [b], lambda: len(b.output) >= 60000,
                             what="the replay after reattaching")
        finally:
            await fake.stop()
        assert proc.alive()
    run(go())
