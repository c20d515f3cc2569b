"""The relay's client endpoint /api/v1/workspaces/NAME/tcp/PORT, driven with python websockets."""
import asyncio
import hashlib
import random
import re
import socket

import pytest
import websockets
import websockets.exceptions

from conftest import ADMIN, ONLY_A, free_port

MiB = 1024 * 1024


def ws_url(relay, ws, port):
    return "ws://127.0.0.1:%d/api/v1/workspaces/%s/tcp/%d" % (relay.port, ws, port)


def headers(token):
    return {"Authorization": "Bearer " + token} if token is not None else {}


def connect(relay, ws, port, token):
    return websockets.connect(ws_url(relay, ws, port), extra_headers=headers(token),
                              open_timeout=15, close_timeout=10, max_size=None,
                              ping_interval=None)


def upgrade_status(relay, ws, port, token):
    async def go():
        try:
            async with connect(relay, ws, port, token):
                return 101
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
        except websockets.exceptions.InvalidMessage as e:
            raise AssertionError(
                "the relay's refusal of the upgrade is not a valid websocket handshake "
                "response (%r, caused by %r); raw status line: %r" % (
                    e, e.__cause__, raw_status_line(relay, ws, port, token)))
    return asyncio.run(asyncio.wait_for(go(), 30))


def raw_upgrade(relay, path, token):
    """Sends a websocket upgrade by hand; returns the raw response head."""
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=15)
    try:
        req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n" % (path, relay.port))
        if token is not None:
            req += "Authorization: Bearer %s\r\n" % token
        s.sendall((req + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            b = s.recv(4096)
            if not b:
                break
            head += b
        return head.split(b"\r\n\r\n")[0].decode("latin-1")
    finally:
        s.close()


def raw_status_line(relay, ws, port, token):
    path = "/api/v1/workspaces/%s/tcp/%d" % (ws, port)
    return raw_upgrade(relay, path, token).split("\r\n")[0]


def test_upgrade_401_without_token(relay, agent):
    assert upgrade_status(relay, "alpha", 80, None) == 401


def test_upgrade_401_wrong_token(relay, agent):
    assert upgrade_status(relay, "alpha", 80, "wrong") == 401


def test_upgrade_401_agent_token(relay, agent):
    assert upgrade_status(relay, "alpha", 80, relay.tokens.agent["alpha"]) == 401


def test_upgrade_404_unknown_workspace(relay, agent):
    assert upgrade_status(relay, "nosuch", 80, relay.tokens.user_token()) == 404


def test_upgrade_404_forbidden_workspace(relay, agent):
    assert upgrade_status(relay, "beta", 80, relay.tokens.user_token(ONLY_A)) == 404


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", "80x"])
def test_upgrade_404_bad_port(relay, agent, port):
    async def go():
        try:
            async with websockets.connect(
                    "ws://127.0.0.1:%d/api/v1/workspaces/alpha/tcp/%s" % (relay.port, port),
                    extra_headers=headers(relay.tokens.user_token()), open_timeout=15):
                return 101
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
        except websockets.exceptions.InvalidMessage as e:
            raise AssertionError("invalid handshake response (%r, caused by %r)" % (
                e, e.__cause__))
    assert asyncio.run(asyncio.wait_for(go(), 30)) == 404


def test_upgrade_503_offline(relay):
    assert upgrade_status(relay, "alpha", 80, relay.tokens.user_token()) == 503


@pytest.mark.parametrize("ws,token_kind,status", [
    ("alpha", None, 401), ("alpha", "wrong", 401), ("nosuch", "admin", 404),
    ("beta", "only_a", 404), ("gamma", "admin", 503)])
def test_upgrade_refusal_status_codes_raw(relay, agent, ws, token_kind, status):
    """The status codes themselves, read off the wire; the handshake answer to an HTTP/1.1
    upgrade must be an HTTP/1.1 response (RFC 6455 4.1, 4.2.2)."""
    token = {None: None, "wrong": "wrong", "admin": relay.tokens.user_token(ADMIN),
             "only_a": relay.tokens.user_token(ONLY_A)}[token_kind]
    line = raw_status_line(relay, ws, 80, token)
    m = re.match(r"HTTP/(\d\.\d) (\d{3})", line)
    assert m, line
    assert int(m.group(2)) == status, line
    assert m.group(1) == "1.1", "answer to an HTTP/1.1 upgrade request is %r" % line


def test_close_4004_on_refused(relay, agent):
    port = free_port()

    async def go():
        async with connect(relay, "alpha", port, relay.tokens.user_token()) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as ei:
                await asyncio.wait_for(ws.recv(), 15)
            return ei.value.code, ei.value.reason
    code, reason = asyncio.run(asyncio.wait_for(go(), 30))
    assert code == 4004, (code, reason)
    assert reason == "connection refused"


def test_close_1000_after_fin_exchange(relay, agent, servers):
    echo = servers.echo(trailer=b"|END")
    data = random.Random(4).randbytes(300 * 1024 + 5)

    async def go():
        async with connect(relay, "alpha", echo.port, relay.tokens.user_token()) as ws:
            for i in range(0, len(data), 50000):
                await ws.send(data[i:i + 50000])
            await ws.send(b"")  # end of stream: half close
            got = bytearray()
            saw_empty = False
            while True:
                try:
                    m = await asyncio.wait_for(ws.recv(), 15)
                except websockets.exceptions.ConnectionClosed as e:
                    return bytes(got), saw_empty, e.code
                assert isinstance(m, bytes), "text message from the relay"
                if m == b"":
                    saw_empty = True
                else:
                    assert not saw_empty, "data after the relay's end-of-stream message"
                    got += m
    got, saw_empty, code = asyncio.run(asyncio.wait_for(go(), 60))
    assert got == data + b"|END"
    assert saw_empty, "the relay sends an empty message for the agent's FIN"
    assert code == 1000


def test_client_keeps_receiving_after_half_close(relay, agent, servers):
    """After the client's empty message, the server's answer (sent after it saw EOF)
    still arrives."""
    sink = servers.sink(reply=True)
    data = random.Random(8).randbytes(MiB)

    async def go():
        async with connect(relay, "alpha", sink.port, relay.tokens.user_token()) as ws:
            await ws.send(data)
            await ws.send(b"")
            got = bytearray()
            while True:
                try:
                    m = await asyncio.wait_for(ws.recv(), 15)
                except websockets.exceptions.ConnectionClosed as e:
                    return bytes(got), e.code
                got += m
    got, code = asyncio.run(asyncio.wait_for(go(), 60))
    assert got.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
    assert code == 1000


def test_text_message_closes_1003(relay, agent, servers):
    echo = servers.echo()

    async def go():
        async with connect(relay, "alpha", echo.port, relay.tokens.user_token()) as ws:
            await ws.send("this is text")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as ei:
                for _ in range(100):
                    await asyncio.wait_for(ws.recv(), 15)
            return ei.value.code
    assert asyncio.run(asyncio.wait_for(go(), 30)) == 1003


def test_client_close_cancels_stream(relay, agent, servers):
    """Closing the websocket resets the stream: the target connection is closed."""
    import threading
    closed = threading.Event()

    def handler(conn, idx):
        conn.sendall(b"hi")
        while True:
            try:
                b = conn.recv(65536)
            except OSError:
                break
            if not b:
                break
        closed.set()

    srv = servers.custom(handler)

    async def go():
        async with connect(relay, "alpha", srv.port, relay.tokens.user_token()) as ws:
            assert await asyncio.wait_for(ws.recv(), 15) == b"hi"
            await ws.close()
    asyncio.run(asyncio.wait_for(go(), 30))
    assert closed.wait(15), "the target connection was not closed after the client left"
