"""An asyncio helper that speaks tether.v1 frames over a python websockets connection.

Used both as a hostile agent (client of the relay) and as a hostile relay (server the real
agent dials). It keeps per-stream accounting of what the peer sent (DATA bytes, CREDIT
offsets, FIN, RST) and answers PING with PONG, so that tests only state their scenario.
"""
import asyncio

import websockets
import websockets.exceptions

import tetherproto as tp


class PeerClosed(Exception):
    def __init__(self, code, reason, frames):
        super().__init__("websocket closed: %r %r" % (code, reason))
        self.code = code
        self.reason = reason
        self.frames = frames


class StreamState:
    def __init__(self):
        self.data = bytearray()
        self.data_len = 0
        self.keep_data = True
        self.credit = None
        self.credits = []
        self.fin = False
        self.rst = None
        self.open_ok = False
        self.open_fail = None


class Peer:
    def __init__(self, ws):
        self.ws = ws
        self.frames = []          # every frame received, in order
        self.streams = {}
        self.peer_hello = None
        self.controls = []
        self.goaway = None
        self.closed = None        # (code, reason) once the websocket closed
        self.auto_pong = True

    def stream(self, sid):
        st = self.streams.get(sid)
        if st is None:
            st = self.streams[sid] = StreamState()
        return st

    # ---- sending ----

    async def send(self, *frames):
        """Sends frames batched in one binary message."""
        await self.ws.send(b"".join(frames))

    async def send_each(self, *frames):
        for f in frames:
            await self.ws.send(f)

    async def send_raw(self, message):
        await self.ws.send(message)

    # ---- receiving ----

    def _account(self, f):
        self.frames.append(f)
        if f.type == tp.HELLO:
            if self.peer_hello is None:
                self.peer_hello = f.hello()
        elif f.type == tp.CONTROL:
            self.controls.append(f.control())
        elif f.type == tp.GOAWAY:
            self.goaway = f.goaway()
        elif f.type == tp.DATA:
            st = self.stream(f.stream)
            if st.keep_data:
                st.data += f.payload
            st.data_len += len(f.payload)
            if f.fin:
                st.fin = True
        elif f.type == tp.CREDIT:
            st = self.stream(f.stream)
            st.credit = f.credit()
            st.credits.append(st.credit)
        elif f.type == tp.RST:
            self.stream(f.stream).rst = f.reason()
        elif f.type == tp.OPEN_OK:
            self.stream(f.stream).open_ok = True
        elif f.type == tp.OPEN_FAIL:
            self.stream(f.stream).open_fail = f.reason()

    async def recv_message(self, timeout):
        """Receives one message; returns its frames, or raises PeerClosed / TimeoutError."""
        if self.closed is not None:
            raise PeerClosed(self.closed[0], self.closed[1], self.frames)
        try:
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.exceptions.ConnectionClosed as e:
            self.closed = (e.code, e.reason)
            raise PeerClosed(e.code, e.reason, self.frames) from None
        if isinstance(msg, str):
            raise AssertionError("peer sent a text message: %r" % msg[:100])
        frames = tp.parse_message(msg)
        pongs = []
        for f in frames:
            self._account(f)
            if f.type == tp.PING and self.auto_pong:
                pongs.append(tp.pong_frame(f.payload))
        if pongs and self.closed is None:
            try:
                await self.ws.send(b"".join(pongs))
            except websockets.exceptions.ConnectionClosed:
                pass
        return frames

    async def until(self, pred, timeout=10.0, what="a frame"):
        """Receives until pred(frame) is true for a received frame; returns that frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(1000000):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                frames = await self.recv_message(left)
            except asyncio.TimeoutError:
                break
            for f in frames:
                if pred(f):
                    return f
        raise AssertionError("timed out after %.1fs waiting for %s; last frames: %r" % (
            timeout, what, self.frames[-10:]))

    async def until_state(self, pred, timeout=10.0, what="a state"):
        """Receives until pred() is true (checked after every message)."""
        if pred():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(1000000):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await self.recv_message(left)
            except asyncio.TimeoutError:
                break
            if pred():
                return
        raise AssertionError("timed out after %.1fs waiting for %s; last frames: %r" % (
            timeout, what, self.frames[-10:]))

    async def drain_for(self, seconds):
        """Receives (and accounts) everything that arrives within `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for _ in range(1000000):
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await self.recv_message(left)
            except asyncio.TimeoutError:
                return

    async def expect_goaway_and_close(self, code=tp.CODE_PROTOCOL, timeout=10.0):
        """Expects a GOAWAY with `code`, then the websocket closing. Returns the GOAWAY."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.until(lambda f: f.type == tp.GOAWAY, timeout=timeout, what="GOAWAY")
        except PeerClosed as e:
            raise AssertionError("websocket closed (%r %r) without a GOAWAY; frames: %r" % (
                e.code, e.reason, e.frames[-10:])) from None
        assert self.goaway[1] == code, "GOAWAY code %d (%r), wanted %d" % (
            self.goaway[1], self.goaway, code)
        # then the websocket must close (the GOAWAY's sender closes after flushing)
        for _ in range(100000):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await self.recv_message(max(left, 0.01))
            except PeerClosed:
                return self.goaway
            except asyncio.TimeoutError:
                break
        raise AssertionError("GOAWAY %r arrived but the websocket did not close within %.0fs"
                             % (self.goaway, timeout))
