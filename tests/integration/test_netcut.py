"""Network cuts: the relay and the agent in two network namespaces joined by one veth pair,
and the link taken down under their feet. Nothing closes a socket, so no FIN and no RST
ever arrive: only the keepalives (1 s idle, 3 s timeout here) can tell. Both sides must
notice within the timeout, users' streams must end instead of hanging, the agent must come
back by itself when the link does, and a reconnecting terminal must survive it all.

Needs root and `ip` (iproute2); skipped without them, except under CI (env CI set), where
that is a failure. The test thread itself sits in the relay's namespace (like a user next
to the relay); the agent and the target servers live in the agent's namespace.
"""
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import websockets
import websockets.exceptions

from conftest import echo_roundtrip, recv_all, wait_until, ws_texts_until_closed, ws_until_closed

KA = ("1s", "3s")       # keepalive idle / timeout of both the relay and the agent
KA_TIMEOUT_S = 3.0
SLACK_S = 5.0           # a noisy shared machine: detection may come this much late
MIN_SILENCE_S = 1.0     # detected sooner than this after the cut: it was no silent cut
RETRY_RE = re.compile(r"retrying in (\d+) ms")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------
# network namespaces


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


@contextlib.contextmanager
def thread_in_netns(path):
    """Runs the block with the calling thread in the network namespace at path. A socket
    belongs for its whole life to the namespace it was created in, and a child process starts
    in its parent thread's namespace; other threads are not affected."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def ip(*args):
    r = subprocess.run(["ip"] + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=15)
    assert r.returncode == 0, "ip %s: %s" % (" ".join(args), r.stderr.strip())


class NetPair:
    """Two network namespaces, the relay's and the agent's, each with loopback up, joined by
    a veth pair (vrelay, vagent) numbered from a /30 of 10.231.0.0/16 picked by pid and
    count. Nothing else is routed: the namespaces see only each other."""

    _count = itertools.count()

    def __init__(self):
        n = next(self._count)
        tag = "%d-%d" % (os.getpid(), n)
        self.relay_ns, self.agent_ns = "tnc-r-" + tag, "tnc-a-" + tag
        base = ((os.getpid() * 16 + n) % 16384) * 4
        self.relay_ip = "10.231.%d.%d" % (base >> 8, (base & 255) + 1)
        self.agent_ip = "10.231.%d.%d" % (base >> 8, (base & 255) + 2)
        self.agent_prefix = ["ip", "netns", "exec", self.agent_ns]
        self.created = []

    def create(self):
        for ns in (self.relay_ns, self.agent_ns):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "dev", "lo", "up")
        ip("-n", self.relay_ns, "link", "add", "vrelay", "type", "veth", "peer", "name",
           "vagent", "netns", self.agent_ns)
        ip("-n", self.relay_ns, "addr", "add", self.relay_ip + "/30", "dev", "vrelay")
        ip("-n", self.agent_ns, "addr", "add", self.agent_ip + "/30", "dev", "vagent")
        ip("-n", self.relay_ns, "link", "set", "dev", "vrelay", "up")
        ip("-n", self.agent_ns, "link", "set", "dev", "vagent", "up")

    def delete(self):
        """Deletes the namespaces (and with them the veth pair); checks they are gone."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=15)
        left = [ns for ns in self.created if os.path.exists("/run/netns/" + ns)]
        self.created = []
        assert not left, "network namespaces not deleted: %r" % left

    def relay_side(self):
        return thread_in_netns("/run/netns/" + self.relay_ns)

    def agent_side(self):
        return thread_in_netns("/run/netns/" + self.agent_ns)

    # The cut: the agent's end of the veth pair goes down. Neither process is told: no socket
    # is closed, so no FIN or RST is sent, and no packet crosses in either direction (veth
    # drops what the relay sends to a peer that is down; the agent's namespace has no route
    # left). The relay's end stays up, so its address and API still answer the test. This
    # is the cut available everywhere: the test kernel has no netem and no tc filters, and
    # nftables may be missing. Reconnect attempts fail at once (no route), so the agent's
    # backoff is what is measured when the link returns.

    def cut(self):
        ip("-n", self.agent_ns, "link", "set", "dev", "vagent", "down")
        return time.monotonic()

    def restore(self):
        ip("-n", self.agent_ns, "link", "set", "dev", "vagent", "up")
        return time.monotonic()


def _unavailable(reason):
    if os.environ.get("CI"):
        pytest.fail("%s (CI is set: these tests must run there)" % reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def net():
    """A NetPair; the test runs with its thread in the relay's namespace. Requested first,
    so it is torn down last: after the test's processes are killed, the namespaces go."""
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    if not shutil.which("ip"):
        _unavailable("`ip` (iproute2) is not installed")
    pair = NetPair()
    try:
        try:
            pair.create()
        except AssertionError as e:
            if not pair.created:
                _unavailable("cannot create a network namespace: %s" % e)
            raise
        with pair.relay_side():
            yield pair
    finally:
        pair.delete()


# ---------------------------------------------------------------------------------------
# helpers


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def start(net, harness):
    relay = harness.relay(host=net.relay_ip, keepalive=KA)
    agent = harness.agent(relay, "alpha", keepalive=KA, prefix=net.agent_prefix)
    return relay, agent


def echo_in_agent_ns(net, servers):
    with net.agent_side():
        return servers.echo()


def offline(relay):
    return relay.workspace("alpha")["connected"] is False


def wait_detected(relay, agent, t0, agent_mark):
    """Waits (bounded) until the relay lists alpha offline and the agent has logged that it
    dropped the relay and is reconnecting. Returns their delays after t0 (seconds)."""
    seen = {}

    def both():
        now = time.monotonic() - t0
        if "relay" not in seen and offline(relay):
            seen["relay"] = now
        if "agent" not in seen and "retrying in" in agent.stderr()[agent_mark:]:
            seen["agent"] = now
        return len(seen) == 2
    try:
        wait_until(both, timeout=KA_TIMEOUT_S + SLACK_S, interval=0.02,
                   what="the relay and the agent to notice the cut")
    except AssertionError as e:
        raise AssertionError("%s; noticed so far (s after the cut): %r; agent log since:\n%s"
                             % (e, seen, agent.stderr()[agent_mark:])) from None
    print("cut noticed by the relay after %.2fs, by the agent after %.2fs (timeout %.0fs)" % (
        seen["relay"], seen["agent"], KA_TIMEOUT_S))
    return seen["relay"], seen["agent"]


async def ws_tcp(relay, port):
    return await websockets.connect(
        "%s/api/v1/workspaces/alpha/tcp/%d" % (relay.url, port),
        extra_headers={"Authorization": "Bearer " + relay.tokens.user_token()},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


async def ws_pty(relay, pty_id):
    return await websockets.connect(
        "%s/api/v1/workspaces/alpha/pty?id=%s&rows=24&cols=80" % (relay.url, pty_id),
        extra_headers={"Authorization": "Bearer " + relay.tokens.user_token()},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


async def read_until(ws, pattern, got=None, timeout=15):
    """Reads binary messages into got until the regex pattern (bytes) matches; the match."""
    got = got if got is not None else bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(100000):
        m = re.search(pattern, got)
        if m:
            return m
        left = deadline - loop.time()
        assert left > 0, "timed out waiting for %r; got %r" % (pattern, bytes(got[-300:]))
        msg = await asyncio.wait_for(ws.recv(), left)
        if isinstance(msg, bytes):
            got += msg
    raise AssertionError("unreachable")



def read_to_end(sock, timeout):
    """Reads and drops until the peer ends the connection: ("eof" | "reset" | "timeout",
    seconds)."""
    t0 = time.monotonic()
    for _ in range(10 ** 6):
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return "eof", time.monotonic() - t0
        except TimeoutError:
            break
        except OSError:
            return "reset", time.monotonic() - t0
    return "timeout", time.monotonic() - t0


# ---------------------------------------------------------------------------------------
# 1. both keepalives notice the cut


def test_cut_detected_by_both_keepalives(net, harness):
    """An idle tunnel, the link cut: the relay lists the workspace offline and the agent
    logs that the relay went silent and starts reconnecting, each within its keepalive
    timeout (plus slack), and not at once: only silence told them."""
    relay, agent = start(net, harness)
    agent_mark, relay_mark = len(agent.stderr()), len(relay.proc.stderr())
    t0 = net.cut()
    t_relay, t_agent = wait_detected(relay, agent, t0, agent_mark)
    alog, rlog = agent.stderr()[agent_mark:], relay.proc.stderr()[relay_mark:]
    times = "relay %.2fs, agent %.2fs after the cut" % (t_relay, t_agent)
    assert t_relay >= MIN_SILENCE_S and t_agent >= MIN_SILENCE_S, (
        "noticed too soon for a silent link (%s): something closed a socket\n%s" % (times, alog))
    assert "no traffic from the relay for 3000 ms" in alog, (
        "the agent dropped the relay for another reason (%s):\n%s" % (times, alog))
    assert alog.index("no traffic from the relay") < alog.index("retrying in"), alog
    assert "workspace alpha: no traffic from the agent for 3000 ms" in rlog, (
        "the relay dropped the agent for another reason (%s):\n%s" % (times, rlog))
    # the agent keeps trying (each attempt fails at once: no route) instead of giving up
    wait_until(lambda: len(RETRY_RE.findall(agent.stderr()[agent_mark:])) >= 2, timeout=SLACK_S,
               what="a second reconnect attempt while the link is down")
    assert agent.alive() and relay.proc.alive()


# ---------------------------------------------------------------------------------------
# 2. users' streams across the cut end, with 4010


def test_cut_closes_user_streams(net, harness, servers):
    """A raw websocket to /tcp/PORT and a `tether forward` connection, both carrying echo
    data to a server in the agent's namespace, the user side in the relay's: when the link
    is cut (more bytes going in after it), the relay closes the websocket with 4010
    ("workspace agent disconnected", PROTOCOL.md 14.5) and the forward's local connection
    ends, both within the keepalive timeout plus slack. Nothing hangs.

    The websocket client has sent more than the stream's credit, so the relay had paused
    reading it: the connection must still end right after the relay's close frame, not
    WSCTX_CLOSE_WAIT_S (2 s) later. (Defect: reading stayed paused after the stream ended,
    the client's answering close was never read, and the relay waited out its close
    timeout.)"""
    relay, agent = start(net, harness)
    echo = echo_in_agent_ns(net, servers)
    fwd = harness.forward(relay, "alpha", echo.port)
    s = fwd.connect()
    s.sendall(b"before the cut")
    assert recv_all(s, limit=14) == b"before the cut"
    fwd_end = {}

    def watch_forward():
        try:
            for _ in range(20):  # bytes into the dead link; the kernel takes them
                s.sendall(b"x" * 4096)
        except OSError:
            pass
        fwd_end["how"], fwd_end["secs"] = read_to_end(s, KA_TIMEOUT_S + SLACK_S + 5)

    async def go():
        ws = await ws_tcp(relay, echo.port)
        first = random.Random(2).randbytes(65536)
        await ws.send(first)
        got = bytearray()
        while len(got) < len(first):
            got += await asyncio.wait_for(ws.recv(), 15)
        assert bytes(got) == first, "echo before the cut differs"
        sent = bytearray()

        async def keep_sending():  # past the stream's credit (256 KiB) within a second
            chunk = random.Random(3).randbytes(32768)
            try:
                for _ in range(200):
                    await ws.send(chunk)
                    sent.extend(chunk)
                    await asyncio.sleep(0.05)
            except websockets.exceptions.ConnectionClosed:
                pass
        t0 = net.cut()
        watcher = threading.Thread(target=watch_forward, daemon=True)
        watcher.start()
        async def close_frame_arrival():
            for _ in range(int((KA_TIMEOUT_S + SLACK_S) / 0.01) + 10):
                if ws.close_rcvd is not None:
                    return time.monotonic() - t0
                await asyncio.sleep(0.01)
            return None
        sender = asyncio.ensure_future(keep_sending())
        frame_at = asyncio.ensure_future(close_frame_arrival())
        try:
            code, reason, echoed, secs = await ws_until_closed(ws, KA_TIMEOUT_S + SLACK_S)
        finally:
            sender.cancel()
        frame_secs = await asyncio.wait_for(frame_at, 5)
        watcher.join(max(0.0, t0 + KA_TIMEOUT_S + SLACK_S + 6 - time.monotonic()))
        return code, reason, echoed, bytes(sent), frame_secs, secs
    code, reason, echoed, sent, frame_secs, secs = run(go())
    print("user websocket: close frame %.2fs, connection closed %.2fs after the cut (%r %r); "
          "forward connection: %r after %.2fs" % (frame_secs or -1, secs, code, reason,
                                                  fwd_end.get("how"), fwd_end.get("secs", -1)))
    s.close()
    assert code == 4010 and reason == "workspace agent disconnected", (code, reason, secs)
    assert secs >= MIN_SILENCE_S, "closed %.2fs after the cut: no silent cut" % secs
    assert secs <= KA_TIMEOUT_S + SLACK_S, secs
    # Half of WSCTX_CLOSE_WAIT_S: the handshake takes milliseconds once the relay reads.
    assert frame_secs is not None, "the connection ended without a close frame"
    assert secs - frame_secs <= 1.0, (
        "the relay's close frame came %.2fs after the cut but the connection ended only at "
        "%.2fs: the relay did not read the client's answering close" % (frame_secs, secs))
    assert echoed == sent[:len(echoed)], "bytes echoed across the cut are not what was sent"
    assert fwd_end.get("how") in ("eof", "reset"), (
        "the forward's connection did not end after the cut: %r" % fwd_end)
    assert fwd_end["secs"] <= KA_TIMEOUT_S + SLACK_S, fwd_end
    assert fwd.proc.alive() and relay.proc.alive() and agent.alive()


# ---------------------------------------------------------------------------------------
# 3. the link returns: the agent comes back by itself


def test_link_restored_agent_reconnects(net, harness, servers):
    """The link down long enough for both sides to give up, then up again: the agent
    reconnects on its own within its backoff (100 ms doubling; bounded by the delays it
    logged) plus slack, the workspace is listed connected, and a new stream through the
    forward started before the cut echoes 1 MiB byte-exact."""
    relay, agent = start(net, harness)
    echo = echo_in_agent_ns(net, servers)
    fwd = harness.forward(relay, "alpha", echo.port)
    echo_roundtrip(fwd.port, nbytes=64 * 1024)
    mark = len(agent.stderr())
    t0 = net.cut()
    wait_detected(relay, agent, t0, mark)
    time.sleep(1.0)  # a few failed attempts with the link still down; backoff stays short
    t_up = net.restore()
    delays = [int(d) for d in RETRY_RE.findall(agent.stderr()[mark:])]
    # the retry pending when the link came back waits at most 100 ms * 2^(k-1) after the
    # k-th logged retry; allow one doubling more
    bound = min(100 * 2 ** len(delays), 30000) / 1000.0 + SLACK_S
    try:
        wait_until(lambda: relay.connected("alpha"), timeout=bound, interval=0.02,
                   what="the agent to reconnect after the link came back")
    except AssertionError as e:
        raise AssertionError("%s; retry delays %r\n%s" % (e, delays, agent.stderr()[mark:]))
    took = time.monotonic() - t_up
    print("link down %.2fs; reconnected %.2fs after it came back (retry delays %r, bound "
          "%.1fs)" % (t_up - t0, took, delays, bound))
    assert "connected to the relay" in agent.stderr()[mark:]
    echo_roundtrip(fwd.port, nbytes=1024 * 1024, seed=11)
    assert agent.alive() and relay.proc.alive() and fwd.proc.alive()


# ---------------------------------------------------------------------------------------
# 4. a reconnecting terminal survives the cut


def test_pty_survives_the_cut(net, harness):
    """A terminal attached across the cut is closed with 4010; the shell goes on writing
    while the link is down. Once the agent is back, attaching with the same id replays the
    output from before and during the cut (once), and it is the same shell ($$)."""
    relay, agent = start(net, harness)
    pty_id = uuid.uuid4()
    mark = len(agent.stderr())

    async def before():
        ws = await ws_pty(relay, pty_id)
        await ws.send(json.dumps({"data": "echo pid=$$ mark=$((6*7))\r"}))
        pid = (await read_until(ws, rb"pid=(\d+) mark=42\r\n")).group(1)
        # written about 1 s into the cut: the agent sends it into the dead link
        await ws.send(json.dumps({"data": "(sleep 1; echo during-cut-$((7*8))) &\r"}))
        await read_until(ws, rb"\(sleep 1")
        t0 = net.cut()
        code, reason, _, secs = await ws_until_closed(ws, KA_TIMEOUT_S + SLACK_S)
        return pid, t0, code, reason, secs
    pid, t0, code, reason, secs = run(before())
    print("terminal client closed %.2fs after the cut (%r %r)" % (secs, code, reason))
    assert code == 4010, (code, reason, secs)
    wait_detected(relay, agent, t0, mark)
    net.restore()
    wait_until(lambda: relay.connected("alpha"), timeout=10 + SLACK_S, interval=0.02,
               what="the agent to reconnect after the link came back")

    async def after():
        ws = await ws_pty(relay, pty_id)
        got = bytearray()
        await read_until(ws, rb"during-cut-56\r\n", got)  # the replay
        await ws.send(json.dumps({"data": "echo again=$$\r"}))
        again = (await read_until(ws, rb"again=(\d+)\r\n", got)).group(1)
        await ws.send(json.dumps({"data": "exit 7\r"}))
        texts, code = await ws_texts_until_closed(ws)
        return bytes(got), again, texts, code
    got, again, texts, code = run(after())
    assert b"pid=%s mark=42" % pid in got, "the replay lacks the output from before the cut"
    assert got.count(b"during-cut-56\r\n") == 1, got[-600:]
    assert again == pid, "a different shell after the cut: $$ was %s, now %s" % (
        pid.decode(), again.decode())
    assert texts == ['{"exit":7}'] and code == 1000, (texts, code)
