"""A fake relay that serves only the reconnecting-terminal endpoint of PROTOCOL.md §14.7,
for testing `tether attach` without a relay and an agent.

    /api/v1/workspaces/NAME/pty?id=UUID&rows=R&cols=C[&command=CMD]

It runs a python websockets server on 127.0.0.1 in a thread of its own, checks the bearer
token and the query as the relay does (401, 404 for another workspace, 400 for a malformed
id/rows/cols), and records what each connection sends: input bytes (from {"data": ...}
text messages and binary messages), resizes, and every message as it came. Like the real
relay it keeps, per id, what it sent as output and replays it to a later connection with
the same id. Tests drive a connection from their own thread: send output, send
{"exit": N}, close with a code, or drop the TCP connection without a close.
"""
import asyncio
import http
import json
import re
import threading
import time
import urllib.parse

import websockets
import websockets.exceptions

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}")
PATH_RE = re.compile(r"/api/v1/workspaces/([A-Za-z0-9._-]+)/pty")


class PtyConn:
    """One attachment: what the client sent, and the means to answer it."""

    def __init__(self, relay, ws, path, query):
        self.relay = relay
        self.ws = ws
        self.path = path
        self.query = query
        self.id = query.get("id")
        self.rows = int(query["rows"])
        self.cols = int(query["cols"])
        self.command = query.get("command")
        self.authorization = ws.request_headers.get("Authorization")
        self.input = bytearray()    # every input byte, in order
        self.messages = []          # ("text", parsed JSON) or ("binary", bytes), in order
        self.resizes = []           # (rows, cols) from resize messages
        self.closed = None          # (code, reason) once the websocket is gone
        self.cond = threading.Condition()

    # ---- from the test's thread ----

    def send_output(self, data):
        """Sends raw terminal output (one binary message); the relay keeps it for replay."""
        data = bytes(data)
        self.relay.history.setdefault(self.id, bytearray()).extend(data)
        self.relay.call(self.ws.send(data))

    def send_text(self, text):
        self.relay.call(self.ws.send(text))

    def send_exit(self, status, close=True):
        """{"exit": status}, then close 1000 as the relay does when the process ended."""
        self.relay.call(self.ws.send(json.dumps({"exit": status})))
        if close:
            self.close(1000, "")

    def close(self, code=1000, reason=""):
        self.relay.call(self.ws.close(code, reason))

    def drop(self):
        """Cuts the TCP connection without a close handshake (a relay that died)."""
        def abort():
            self.ws.transport.abort()
        self.relay.loop.call_soon_threadsafe(abort)

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("fake relay: timed out after %.1fs waiting for %s; "
                                         "input so far %r, messages %r" % (
                                             timeout, what, bytes(self.input),
                                             self.messages[-10:]))
                self.cond.wait(min(left, 0.5))

    def wait_input(self, expected, timeout=15):
        """Waits until the input received so far contains `expected` (bytes)."""
        self._wait(lambda: expected in self.input, timeout, "input %r" % (expected,))
        return bytes(self.input)

    def wait_resize(self, rows, cols, timeout=15):
        self._wait(lambda: (rows, cols) in self.resizes, timeout,
                   "a resize to %dx%d (got %r)" % (rows, cols, self.resizes))

    def wait_closed(self, timeout=15):
        self._wait(lambda: self.closed is not None, timeout, "the client to close")
        return self.closed

    # ---- on the loop ----

    def _record(self, message):
        with self.cond:
            if isinstance(message, bytes):
                self.messages.append(("binary", message))
                self.input += message
            else:
                try:
                    obj = json.loads(message)
                except ValueError:
                    obj = {"invalid": message}
                self.messages.append(("text", obj))
                if isinstance(obj, dict):
                    if isinstance(obj.get("data"), str):
                        self.input += obj["data"].encode("utf-8")
                    if isinstance(obj.get("rows"), int) and isinstance(obj.get("cols"), int):
                        self.resizes.append((obj["rows"], obj["cols"]))
            self.cond.notify_all()
        if self.relay.echo and isinstance(message, bytes):
            return message
        if self.relay.echo and isinstance(message, str):
            try:
                data = json.loads(message).get("data")
            except (ValueError, AttributeError):
                data = None
            if isinstance(data, str):
                return data.encode("utf-8")
        return None


class FakePtyRelay:
    """The fake relay. refuse: an HTTP status to answer every upgrade with, or a function
    (attempt number from 0) -> status or None. echo: input comes back as output.
    greeting: output sent on the first connection of each id."""

    def __init__(self, token, workspace="alpha", refuse=None, echo=False,
                 greeting=b"fake-pty$ "):
        self.token = token
        self.workspace = workspace
        self.refuse = refuse
        self.echo = echo
        self.greeting = greeting
        self.attempts = []      # (path, HTTP status answered or 101), every upgrade request
        self.conns = []
        self.history = {}       # id -> every output byte sent for it (the replay)
        self.cond = threading.Condition()
        self.loop = None
        self.server = None
        self.port = None
        self._thread = None

    @property
    def url(self):
        return "ws://127.0.0.1:%d" % self.port

    def start(self):
        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(websockets.serve(
                self._handler, "127.0.0.1", 0, process_request=self._process_request,
                max_size=None, ping_interval=None, close_timeout=2))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake relay did not start"
        return self

    def stop(self):
        if not self.loop:
            return

        async def shutdown():
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        try:
            self.call(shutdown(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, coro, timeout=10):
        """Runs a coroutine on the relay's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_conn(self, index=0, timeout=15):
        """The index-th connection that was upgraded (0 = the first)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.conns) <= index:
                left = deadline - time.monotonic()
                assert left > 0, "fake relay: no connection #%d after %.1fs (attempts %r)" % (
                    index, timeout, self.attempts)
                self.cond.wait(min(left, 0.5))
            return self.conns[index]

    def wait_attempts(self, n, timeout=15):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.attempts) < n:
                left = deadline - time.monotonic()
                assert left > 0, "fake relay: %d upgrade requests, expected %d" % (
                    len(self.attempts), n)
                self.cond.wait(min(left, 0.5))

    # ---- on the loop ----

    def _answer(self, path, headers):
        url = urllib.parse.urlsplit(path)
        if headers.get("Authorization") != "Bearer " + self.token:
            return 401
        m = PATH_RE.fullmatch(url.path)
        if not m or m.group(1) != self.workspace:
            return 404
        q = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if not UUID_RE.fullmatch(q.get("id", "")) or not q.get("rows", "").isdigit() or \
                not q.get("cols", "").isdigit():
            return 400
        refuse = self.refuse(len(self.attempts)) if callable(self.refuse) else self.refuse
        return refuse or 101

    async def _process_request(self, path, headers):
        status = self._answer(path, headers)
        with self.cond:
            self.attempts.append((path, status))
            self.cond.notify_all()
        if status == 101:
            return None
        return (http.HTTPStatus(status), [("Content-Type", "text/plain")],
                b"refused by the fake relay\n")

    async def _handler(self, ws, path):
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        conn = PtyConn(self, ws, path, query)
        replay = bytes(self.history.get(conn.id, b""))
        with self.cond:
            self.conns.append(conn)
            self.cond.notify_all()
        try:
            if replay:
                await ws.send(replay)
            elif self.greeting:
                self.history.setdefault(conn.id, bytearray()).extend(self.greeting)
                await ws.send(self.greeting)
            async for message in ws:
                echo = conn._record(message)
                if echo:
                    self.history.setdefault(conn.id, bytearray()).extend(echo)
                    await ws.send(echo)
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            with conn.cond:
                conn.closed = (ws.close_code, ws.close_reason)
                conn.cond.notify_all()
