"""Reconnecting terminals end to end: a websocket client on the real relay's /pty endpoint,
the real agent, a real shell. What a user of a web terminal or `tether attach` relies on:
the shell survives a relay restart, two clients share one terminal."""
import asyncio
import json
import uuid

import websockets

from conftest import wait_until, ws_texts_until_closed


def run(coro, timeout=90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def attach(relay, tokens, pty_id, rows=24, cols=80):
    return await websockets.connect(
        "%s/api/v1/workspaces/alpha/pty?id=%s&rows=%d&cols=%d" % (relay.url, pty_id, rows, cols),
        extra_headers={"Authorization": "Bearer " + tokens.user_token()}, max_size=None,
        ping_interval=None, open_timeout=15, close_timeout=5)


async def read_until(ws, needle, got=None, timeout=15):
    got = got if got is not None else bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while needle not in got:
        left = deadline - loop.time()
        assert left > 0, "timed out waiting for %r; got %r" % (needle, bytes(got[-300:]))
        msg = await asyncio.wait_for(ws.recv(), left)
        if isinstance(msg, bytes):
            got += msg
    return got


def test_shell_survives_a_relay_restart(harness):
    relay = harness.relay()
    port = relay.port
    harness.agent(relay, "alpha")
    pty_id = uuid.uuid4()

    async def before():
        ws = await attach(relay, harness.tokens, pty_id)
        await ws.send(json.dumps({"data": "cd /tmp && echo went-$((40+2))\r"}))
        await read_until(ws, b"went-42")
        await ws.close()
    run(before())

    relay.proc.kill()
    relay = harness.relay(port=port)
    wait_until(lambda: relay.connected("alpha"), timeout=30,
               what="the agent to reconnect to the restarted relay")

    async def after():
        ws = await attach(relay, harness.tokens, pty_id)
        got = await read_until(ws, b"went-42")  # the replay
        await ws.send(json.dumps({"data": "pwd\r"}))
        await read_until(ws, b"/tmp\r\n", got)
        await ws.send(json.dumps({"data": "exit 7\r"}))
        return await ws_texts_until_closed(ws)
    texts, code = run(after())
    assert texts == ['{"exit":7}'] and code == 1000


def test_two_clients_share_one_terminal(harness, relay, agent):
    pty_id = uuid.uuid4()

    async def go():
        a = await attach(relay, harness.tokens, pty_id)
        b = await attach(relay, harness.tokens, pty_id)
        await a.send(json.dumps({"data": "echo from-a-$((2*3))\r"}))
        await b.send(json.dumps({"data": "echo from-b-$((3*3))\r"}))
        for ws in (a, b):
            got = await read_until(ws, b"from-a-6")
            await read_until(ws, b"from-b-9", got)
        # Output that arrives while nobody is attached is replayed once, in order.
        await a.send(json.dumps({"data": "(sleep 1; echo late-one; echo late-two) &\r"}))
        await read_until(a, b"(sleep 1")
        await a.close()
        await b.close()
        await asyncio.sleep(2)
        c = await attach(relay, harness.tokens, pty_id)
        got = await read_until(c, b"late-two")
        text = bytes(got)
        assert text.count(b"late-one\r\n") == 1 and text.index(b"late-one") < text.index(b"late-two")
        await c.close()
    run(go())
