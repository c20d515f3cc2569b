"""Fixtures and helpers for tether's integration tests.

Everything runs on 127.0.0.1 with ports chosen by the kernel. Every process a test starts
runs in its own session (process group) and is killed with its group when the test (or the
module, for module-scoped fixtures) ends. Every wait is bounded in time and count.

Environment:
  TETHER_BIN   the binary under test (default: build/agent/tether under the repo root)
"""
import asyncio
import hashlib
import http.client
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import websockets.exceptions

REPO_ROOT = Path(__file__).resolve().parents[2]

WORKSPACES = ("alpha", "beta", "gamma")
ADMIN = "admin"     # user token allowed every workspace ("*")
ONLY_A = "only_a"   # user token allowed only "alpha"

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# small utilities


def wait_until(pred, timeout=15.0, interval=0.05, what="condition"):
    """Polls pred() until it returns a true value; bounded in time and in iterations."""
    deadline = time.monotonic() + timeout
    max_iter = int(timeout / interval) + 10
    last_exc = None
    for _ in range(max_iter):
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - report the last one on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s%s" % (
        timeout, what, " (last error: %r)" % (last_exc,) if last_exc else ""))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_status_kib(pid, field):
    """A KiB figure of /proc/PID/status: "VmRSS", "RssAnon", "VmHWM"."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for pid %d" % (field, pid))


def proc_rss_kib(pid):
    return proc_status_kib(pid, "VmRSS")


def proc_cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_state(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()[0]


def write_private(path, text, mode=0o600):
    path = Path(path)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(str(path), mode)
    return path


# ---------------------------------------------------------------------------------------
# deterministic pseudo-random data


class DataGen:
    """A deterministic stream of pseudo-random bytes, produced in 64 KiB chunks.

    Chunk i is a slice of a random pool at a pseudo-random offset, so lost, duplicated or
    reordered chunks change the hash. Cheap enough for hundreds of MiB in Python.
    """

    CHUNK = 64 * 1024
    POOL = 4 * 1024 * 1024

    def __init__(self, seed):
        rnd = random.Random(seed)
        self.pool = memoryview(rnd.randbytes(self.POOL + self.CHUNK))
        self.offsets = [rnd.randrange(0, self.POOL) for _ in range(1021)]

    def chunk(self, i):
        off = (self.offsets[i % 1021] + i * 4099) % self.POOL
        return self.pool[off:off + self.CHUNK]

    def chunks(self, total):
        i = 0
        left = total
        while left > 0:
            c = self.chunk(i)
            if left < len(c):
                c = c[:left]
            yield c
            left -= len(c)
            i += 1

    def digest(self, total):
        h = hashlib.sha256()
        for c in self.chunks(total):
            h.update(c)
        return h.hexdigest()


# ---------------------------------------------------------------------------------------
# processes


class Proc:
    def __init__(self, name, args, logdir, env=None):
        self.name = name
        self.args = [str(a) for a in args]
        self.stdout_path = Path(logdir) / ("%s.stdout" % name)
        self.stderr_path = Path(logdir) / ("%s.stderr" % name)
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=self._err, start_new_session=True, env=env)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def stdout(self):
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def stderr(self):
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def signal(self, sig):
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self):
        """SIGKILL to the process group, then reap."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                self.popen.kill()
        else:
            # the leader is gone; its group may still have members
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass

    def terminate(self, timeout=10):
        """SIGTERM; returns the exit status (SIGKILL after timeout)."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def describe(self):
        return "%s (pid %d, rc %r)\n  args: %s\n  stderr:\n%s" % (
            self.name, self.pid, self.popen.poll(), " ".join(self.args),
            _indent(_tail(self.stderr(), 4000)))


def _tail(s, n):
    return s if len(s) <= n else "..." + s[-n:]


def _indent(s):
    return "".join("    " + line + "\n" for line in s.splitlines())


class Procs:
    """Every process a test (or module) started; killed at the end."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        self._n = 0

    def start(self, name, args, env=None):
        self._n += 1
        p = Proc("%02d-%s" % (self._n, name), args, self.logdir, env=env)
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            p.kill()

    def report(self):
        return "\n".join(p.describe() for p in self.procs)


# ---------------------------------------------------------------------------------------
# tokens


class Tokens:
    """A tokens.json for the relay plus token files for agents and users, all 0600."""

    def __init__(self, directory, workspaces=WORKSPACES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.workspaces = list(workspaces)
        rnd = random.Random()
        self.agent = {ws: "agent-%s-%032x" % (ws, rnd.getrandbits(128)) for ws in workspaces}
        self.user = {
            ADMIN: ("user-admin-%032x" % rnd.getrandbits(128), ["*"]),
            ONLY_A: ("user-only-a-%032x" % rnd.getrandbits(128), [self.workspaces[0]]),
        }
        doc = {"agents": {tok: ws for ws, tok in self.agent.items()},
               "users": {tok: wss for tok, wss in self.user.values()}}
        self.path = write_private(self.dir / "tokens.json", json.dumps(doc, indent=1))
        for ws, tok in self.agent.items():
            write_private(self.dir / ("agent-%s.token" % ws), tok + "\n")
        for name, (tok, _) in self.user.items():
            write_private(self.dir / ("user-%s.token" % name), tok + "\n")
        write_private(self.dir / "user-bogus.token", "not-a-valid-token-%032x\n" % rnd.getrandbits(128))

    def agent_file(self, ws):
        return self.dir / ("agent-%s.token" % ws)

    def user_file(self, name=ADMIN):
        return self.dir / ("user-%s.token" % name)

    def user_token(self, name=ADMIN):
        return self.user[name][0]

    def bogus_file(self):
        return self.dir / "user-bogus.token"


# ---------------------------------------------------------------------------------------
# the harness: relay, agents, forwards


LISTEN_RE = re.compile(r"relay listening on ws://[0-9.]+:(\d+)")
FORWARD_RE = re.compile(r"forwarding 127\.0\.0\.1:(\d+) -> (\S+):(\d+)")


class Relay:
    def __init__(self, proc, port, tokens, host="127.0.0.1"):
        self.proc = proc
        self.port = port
        self.tokens = tokens
        self.host = host
        self.url = "ws://%s:%d" % (host, port)

    @property
    def pid(self):
        return self.proc.pid

    def api(self, path, token=None, user=ADMIN, timeout=10):
        """GET path; returns (status, body bytes)."""
        if token is None and user is not None:
            token = self.tokens.user_token(user)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {}
            if token is not None:
                headers["Authorization"] = "Bearer " + token
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def api_json(self, path, **kw):
        status, body = self.api(path, **kw)
        assert status == 200, "GET %s: HTTP %d %r" % (path, status, body)
        return json.loads(body)

    def workspace(self, name):
        return self.api_json("/api/v1/workspaces/%s" % name)

    def connected(self, name):
        return self.workspace(name)["connected"] is True

    def said_hello(self, name):
        """Connected, and the agent's hello arrived (agent_version is null before it, and
        the relay resets what the last connection reported only then)."""
        w = self.workspace(name)
        return w["connected"] is True and w["agent_version"] is not None


class Forward:
    def __init__(self, proc, port):
        self.proc = proc
        self.port = port

    def connect(self, timeout=30):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.settimeout(timeout)
        return s


class Harness:
    def __init__(self, tether_bin, procs, tokens):
        self.bin = str(tether_bin)
        self.procs = procs
        self.tokens = tokens

    def run(self, *args, timeout=30, env=None):
        """Runs tether to completion; returns CompletedProcess with text output."""
        return subprocess.run([self.bin] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env=env)

    def relay(self, port=0, keepalive=None, extra=(), tokens_path=None, wait=True,
              host="127.0.0.1"):
        args = [self.bin, "relay", "--listen", "%s:%d" % (host, port),
                "--tokens", tokens_path or self.tokens.path]
        if keepalive:
            args += ["--keepalive-idle", keepalive[0], "--keepalive-timeout", keepalive[1]]
        args += list(extra)
        proc = self.procs.start("relay", args)
        if not wait:
            return proc

        def listening():
            m = LISTEN_RE.search(proc.stderr())
            if m:
                return int(m.group(1))
            assert proc.alive(), "relay exited early:\n" + proc.describe()
            return None

        got = wait_until(listening, timeout=15, what="the relay to listen")
        if port:
            assert got == port, "relay listens on %d, asked for %d" % (got, port)
        relay = Relay(proc, got, self.tokens, host)
        # the log line comes right before the loop runs: wait until HTTP answers
        wait_until(lambda: relay.api("/api/v1/workspaces")[0] == 200, timeout=15,
                   what="the relay's API to answer")
        return relay

    def agent(self, relay, workspace=WORKSPACES[0], keepalive=None, extra=(), wait=True,
              url=None, token_file=None, env=None, prefix=()):
        """prefix: command words the agent runs under, e.g. ["ip", "netns", "exec", NS]."""
        args = list(prefix) + [self.bin, "agent", "--url", url or relay.url,
                               "--token-file", token_file or self.tokens.agent_file(workspace)]
        if keepalive:
            args += ["--keepalive-idle", keepalive[0], "--keepalive-timeout", keepalive[1]]
        if "--state-dir" not in [str(a) for a in extra]:
            # The SSH host key goes to a scratch directory, not the user's home.
            args += ["--state-dir", str(self.tokens.dir.parent / ("state-%s" % workspace))]
        args += list(extra)
        proc = self.procs.start("agent-%s" % workspace, args, env=env)
        if wait:
            def up():
                assert proc.alive(), "agent exited early:\n" + proc.describe()
                return relay.said_hello(workspace)
            wait_until(up, timeout=15, what="agent %s to connect" % workspace)
        return proc

    def forward(self, relay, workspace, remote_port, local_port=0, token_file=None, url=None,
                extra=()):
        args = [self.bin, "forward", "--url", url or relay.url,
                "--token-file", token_file or self.tokens.user_file(),
                ] + list(extra) + [workspace, "%d:%d" % (local_port, remote_port)]
        proc = self.procs.start("forward-%s-%d" % (workspace, remote_port), args)

        def listening():
            m = FORWARD_RE.search(proc.stdout())
            if m:
                return m
            assert proc.alive(), "forward exited early:\n" + proc.describe()
            return None

        m = wait_until(listening, timeout=15, what="tether forward to listen")
        assert m.group(2) == workspace and int(m.group(3)) == remote_port, m.group(0)
        port = int(m.group(1))
        if local_port:
            assert port == local_port
        assert port != 0
        return Forward(proc, port)


# ---------------------------------------------------------------------------------------
# target servers (threads)


class TcpServer:
    """A threaded TCP server on 127.0.0.1:0; handle(conn, index) runs per connection."""

    def __init__(self, handler, backlog=256, rcvbuf=None):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors = []
        self.conns = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                idx = self.accepted
                self.accepted += 1
                self.conns.append(conn)
            conn.settimeout(120)
            t = threading.Thread(target=self._run, args=(conn, idx), daemon=True)
            t.start()

    def _run(self, conn, idx):
        try:
            self.handler(conn, idx)
        except Exception as e:  # noqa: BLE001
            with self._lock:
                self.errors.append((idx, repr(e)))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        self.thread.join(timeout=5)


def echo_handler(trailer=None):
    """Echoes everything; after the client's EOF sends trailer (if any) and half-closes."""
    def handle(conn, idx):
        total = 0
        while True:
            b = conn.recv(256 * 1024)
            if not b:
                break
            total += len(b)
            conn.sendall(b)
        if trailer is not None:
            conn.sendall(trailer(total) if callable(trailer) else trailer)
        conn.shutdown(socket.SHUT_WR)
        # wait for the peer to close, bounded by the socket timeout
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
    return handle


class SinkServer(TcpServer):
    """Hashes everything a connection sends; results[idx] = (nbytes, sha256hex)."""

    def __init__(self, reply=False):
        self.results = {}
        self.done = threading.Condition()
        self.reply = reply
        super().__init__(self._handle)

    def _handle(self, conn, idx):
        h = hashlib.sha256()
        n = 0
        while True:
            b = conn.recv(1024 * 1024)
            if not b:
                break
            h.update(b)
            n += len(b)
        if self.reply:
            conn.sendall(("%d %s\n" % (n, h.hexdigest())).encode())
        conn.shutdown(socket.SHUT_WR)
        with self.done:
            self.results[idx] = (n, h.hexdigest())
            self.done.notify_all()

    def wait_result(self, idx=0, timeout=120):
        deadline = time.monotonic() + timeout
        with self.done:
            while idx not in self.results:
                left = deadline - time.monotonic()
                assert left > 0, "sink: no result for connection %d" % idx
                self.done.wait(min(left, 1.0))
            return self.results[idx]


class SourceServer(TcpServer):
    """Sends `total` deterministic bytes (DataGen(seed)) per connection, then closes.

    sent[idx] counts bytes handed to the kernel so far; digests[idx] is the sha256 of what
    was sent once finished.
    """

    def __init__(self, total, seed=1, sndbuf=None):
        self.total = total
        self.gen = DataGen(seed)
        self.sent = {}
        self.digests = {}
        self.sndbuf = sndbuf
        super().__init__(self._handle)

    def _handle(self, conn, idx):
        if self.sndbuf:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        conn.settimeout(300)
        h = hashlib.sha256()
        self.sent[idx] = 0
        for c in self.gen.chunks(self.total):
            conn.sendall(c)
            h.update(c)
            self.sent[idx] += len(c)
        self.digests[idx] = h.hexdigest()
        conn.shutdown(socket.SHUT_WR)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def recv_all(sock, limit=None, hasher=None):
    """Reads until EOF (or limit bytes); returns bytes, or (count, digest) with a hasher."""
    if hasher is not None:
        n = 0
        while limit is None or n < limit:
            b = sock.recv(1024 * 1024 if limit is None else min(1024 * 1024, limit - n))
            if not b:
                break
            hasher.update(b)
            n += len(b)
        return n, hasher.hexdigest()
    parts = []
    n = 0
    while limit is None or n < limit:
        b = sock.recv(1024 * 1024 if limit is None else min(1024 * 1024, limit - n))
        if not b:
            break
        parts.append(b)
        n += len(b)
    return b"".join(parts)


def connection_closed(sock, timeout=15):
    """True if the peer closes (EOF or reset) within timeout, reading and dropping bytes."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            b = sock.recv(65536)
            if not b:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


async def ws_until_closed(ws, timeout):
    """Reads a websocket until it closes: (code, reason, bytes received, seconds); raises
    AssertionError if it is still open after timeout."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = bytearray()
    for _ in range(100000):
        left = t0 + timeout - loop.time()
        try:
            m = await asyncio.wait_for(ws.recv(), max(left, 0.001))
        except asyncio.TimeoutError:
            raise AssertionError("websocket still open after %.0fs" % timeout) from None
        except websockets.exceptions.ConnectionClosed as e:
            return e.code, e.reason, bytes(got), loop.time() - t0
        got += m if isinstance(m, bytes) else m.encode()
    raise AssertionError("unreachable")


async def ws_texts_until_closed(ws, timeout=15):
    """The text messages of a websocket until it closes, and its close code (None if more
    than 1000 messages came); each message must come within timeout."""
    texts = []
    try:
        for _ in range(1000):
            msg = await asyncio.wait_for(ws.recv(), timeout)
            if isinstance(msg, str):
                texts.append(msg)
    except websockets.exceptions.ConnectionClosed as e:
        return texts, e.code
    return texts, None


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tether_bin(tmp_path_factory):
    """The binary under test, copied once per session: a rebuild while the suite runs
    (ninja replaces the file) cannot make tests run different binaries or fail to exec.
    The copy has a neutral name: on this shared machine, others stopping their own tether
    processes by name (pkill/killall tether) must not kill the processes under test."""
    path = Path(os.environ.get("TETHER_BIN") or REPO_ROOT / "build" / "agent" / "tether")
    if not path.is_file() or not os.access(str(path), os.X_OK):
        pytest.fail("tether binary not found at %s: build it (meson setup build; ninja -C "
                    "build) or set TETHER_BIN" % path)
    snap = tmp_path_factory.mktemp("bin") / "tbin-under-test"
    shutil.copy2(str(path), str(snap))
    os.chmod(str(snap), 0o755)
    return snap


def _procs_fixture(request, tmp):
    procs = Procs(Path(tmp) / "logs")
    yield procs
    failed = getattr(request.node, "rep_call", None)
    procs.cleanup()
    if failed is not None and failed.failed and procs.procs:
        print("\n--- processes of %s ---\n%s" % (request.node.name, procs.report()))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def procs(request, tmp_path):
    yield from _procs_fixture(request, tmp_path)


@pytest.fixture
def tokens(tmp_path):
    return Tokens(tmp_path / "tokens")


@pytest.fixture
def harness(tether_bin, procs, tokens):
    return Harness(tether_bin, procs, tokens)


@pytest.fixture
def relay(harness):
    return harness.relay()


@pytest.fixture
def agent(harness, relay):
    """The real agent for workspace alpha, connected to `relay`."""
    return harness.agent(relay, WORKSPACES[0])


@pytest.fixture
def start_forward(harness, relay):
    """start_forward(remote_port, workspace='alpha', **kw) -> local port."""
    def start(remote_port, workspace=WORKSPACES[0], **kw):
        return harness.forward(relay, workspace, remote_port, **kw).port
    return start


@pytest.fixture
def servers():
    """Target servers started by a test; closed at the end."""
    started = []

    class Factory:
        def echo(self, trailer=None, backlog=256):
            s = TcpServer(echo_handler(trailer), backlog=backlog)
            started.append(s)
            return s

        def sink(self, reply=False):
            s = SinkServer(reply=reply)
            started.append(s)
            return s

        def source(self, total, seed=1, sndbuf=None):
            s = SourceServer(total, seed=seed, sndbuf=sndbuf)
            started.append(s)
            return s

        def custom(self, handler, **kw):
            s = TcpServer(handler, **kw)
            started.append(s)
            return s

    yield Factory()
    for s in started:
        s.close()


@pytest.fixture(scope="module")
def module_env(request, tether_bin, tmp_path_factory):
    """A relay with agents for beta and gamma (alpha left free for hostile agents), an echo
    server and a forward to it through beta; shared by a module's tests."""
    tmp = tmp_path_factory.mktemp(request.module.__name__.split(".")[-1])
    procs = Procs(tmp / "logs")
    tokens = Tokens(tmp / "tokens")
    h = Harness(tether_bin, procs, tokens)
    echo = TcpServer(echo_handler())
    try:
        relay = h.relay()
        agents = {ws: h.agent(relay, ws) for ws in WORKSPACES[1:]}
        fwd = h.forward(relay, WORKSPACES[1], echo.port)

        class Env:
            pass

        env = Env()
        env.harness, env.procs, env.tokens, env.relay = h, procs, tokens, relay
        env.agents, env.echo, env.forward = agents, echo, fwd
        yield env
    finally:
        echo.close()
        procs.cleanup()


def echo_roundtrip(port, nbytes=256 * 1024, seed=7, timeout=30):
    """Sends nbytes through a forward to an echo server, half-closes, checks the echo."""
    data = random.Random(seed).randbytes(nbytes)
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    result = {}

    def reader():
        try:
            result["got"] = recv_all(s)
        except Exception as e:  # noqa: BLE001
            result["err"] = e

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(timeout)
    finally:
        s.close()
    assert not t.is_alive(), "echo through port %d did not finish in %ss" % (port, timeout)
    assert "err" not in result, result.get("err")
    got = result["got"]
    assert len(got) == len(data) and got == data, "echo mismatch: sent %d, got %d bytes" % (
        len(data), len(got))


# ---------------------------------------------------------------------------------------
# SSH: OpenSSH (and other clients) reaching the agent's SSH server through `tether ssh-proxy`


SSH_HOST = "tether.alpha"   # the Host entry of SshEnv's ssh_config, for workspace alpha
SSH_HOST_KEY = "ssh_host_ed25519_key"

_mount_ns = {}


def mount_namespace_available():
    """True if this process may run a child in a private mount namespace with bind mounts
    (root, and a kernel and container that allow it). Checked once."""
    if "ok" not in _mount_ns:
        ok = False
        if os.geteuid() == 0 and shutil.which("unshare") and os.path.isfile("/etc/motd"):
            try:
                r = subprocess.run(
                    ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                     "mount --bind /etc/motd /etc/motd && mount --bind /etc/passwd /etc/passwd"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _mount_ns["ok"] = ok
    return _mount_ns["ok"]


class SshEnv:
    """A relay, an agent for workspace alpha that serves SSH (its host key in a state
    directory under tmp), and an ssh_config whose `Host tether.alpha` reaches that agent
    through `tether ssh-proxy` with the admin user's token.

    With isolate=True, and where mount namespaces are available (see `isolated`), the agent
    runs in a private mount namespace in which /etc/passwd gives its user a home under tmp
    (`home`) and /etc/motd is a file under tmp (`motd`): sessions never touch the real home
    directory, and tests decide what the motd says and whether ~/.hushlogin exists. Otherwise
    sessions run in the user's real home and `motd` is None.
    """

    def __init__(self, harness, tmp, isolate=True, workspace=WORKSPACES[0]):
        self.harness = harness
        self.procs = harness.procs
        self.tokens = harness.tokens
        self.workspace = workspace
        self.host = "tether.%s" % workspace
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        pw = pwd.getpwuid(os.getuid())
        self.user, self.shell = pw.pw_name, pw.pw_shell or "/bin/sh"
        self.isolated = bool(isolate) and mount_namespace_available()
        if self.isolated:
            self.home = self.tmp / "home"
            self.home.mkdir(exist_ok=True)
            self.motd = self.tmp / "motd"
            self.motd.write_text("")
            self._passwd = self.tmp / "passwd"
            lines = []
            with open("/etc/passwd") as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) == 7 and fields[2] == str(os.getuid()):
                        fields[5] = str(self.home)
                    lines.append(":".join(fields))
            self._passwd.write_text("\n".join(lines) + "\n")
        else:
            self.home = Path(pw.pw_dir)
            self.motd = None
        self.relay = harness.relay()
        self.state_dir = self.tmp / "state"
        self.agent = self.start_agent()
        self.config = self.write_config(self.tmp / "ssh_config")

    # -- the agent

    def agent_args(self, state_dir=None, extra=()):
        args = [self.harness.bin, "agent", "--url", self.relay.url,
                "--token-file", str(self.tokens.agent_file(self.workspace)),
                "--state-dir", str(state_dir or self.state_dir)] + [str(a) for a in extra]
        if self.isolated:
            args = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                    'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/motd && '
                    'shift 2 && exec "$@"', "sh", str(self._passwd), str(self.motd)] + args
        return args

    def start_agent(self, state_dir=None, extra=()):
        """Starts an agent (the previous one must be stopped) and waits until the relay
        lists the workspace as connected. Returns its Proc; its pid is the agent's own
        (unshare and sh exec it)."""
        proc = self.procs.start("agent-%s" % self.workspace, self.agent_args(state_dir, extra))

        def up():
            assert proc.alive(), "agent exited early:\n" + proc.describe()
            return self.relay.connected(self.workspace)
        wait_until(up, timeout=20, what="agent %s to connect" % self.workspace)
        self.agent = proc
        return proc

    def stop_agent(self):
        """SIGTERM (SIGKILL after 10 s); waits until the relay lists the workspace offline."""
        self.agent.terminate(timeout=10)
        self.agent.kill()
        wait_until(lambda: not self.relay.connected(self.workspace), timeout=20,
                   what="the relay to see agent %s go" % self.workspace)

    def restart_agent(self, state_dir=None, extra=()):
        self.stop_agent()
        return self.start_agent(state_dir, extra)

    def agent_log(self):
        return _tail(self.agent.stderr(), 4000)

    # -- clients

    def proxy_command(self, token_file=None):
        """The argv of `tether ssh-proxy` for this workspace."""
        return [self.harness.bin, "ssh-proxy", "--url", self.relay.url, "--token-file",
                str(token_file or self.tokens.user_file()), self.workspace]

    def write_config(self, path, extra_lines=()):
        """An ssh_config with one Host entry for the workspace; only it is read (-F)."""
        lines = ["Host %s" % self.host,
                 "  ProxyCommand %s" % " ".join(shlex.quote(a) for a in self.proxy_command()),
                 "  StrictHostKeyChecking no",
                 "  UserKnownHostsFile /dev/null",
                 "  LogLevel ERROR",
                 "  BatchMode yes",
                 "  ControlMaster no",
                 "  ControlPath none"] + ["  " + l for l in extra_lines]
        path = Path(path)
        path.write_text("\n".join(lines) + "\n")
        return path

    def ssh_argv(self, *remote, opts=(), tty=False):
        argv = ["ssh", "-F", str(self.config)]
        if tty:
            argv.append("-tt")
        for o in opts:
            argv += ["-o", o]
        return argv + [self.host] + [str(r) for r in remote]

    def ssh(self, *remote, input=None, opts=(), tty=False, timeout=60, env=None):
        """Runs ssh to completion; returns CompletedProcess with bytes. input=None gives
        /dev/null as stdin; a bytes object is fed and then closed (EOF)."""
        kw = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run(self.ssh_argv(*remote, opts=opts, tty=tty), capture_output=True,
                              timeout=timeout, env=env, **kw)

    def ssh_popen(self, *remote, opts=(), tty=False, env=None, **kw):
        """ssh as a Popen in a session of its own (the caller reaps it)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.ssh_argv(*remote, opts=opts, tty=tty), env=env,
                                start_new_session=True, **kw)


@pytest.fixture
def ssh_env(harness, tmp_path):
    """A fresh SshEnv (relay, agent, ssh_config) for one test, isolated where possible."""
    return SshEnv(harness, tmp_path / "ssh")


@pytest.fixture(scope="module")
def ssh_module_env(request, tether_bin, tmp_path_factory):
    """An SshEnv shared by a module's tests; its processes end with the module."""
    tmp = tmp_path_factory.mktemp(request.module.__name__.split(".")[-1] + "-ssh")
    procs = Procs(tmp / "logs")
    try:
        yield SshEnv(Harness(tether_bin, procs, Tokens(tmp / "tokens")), tmp / "ssh")
    finally:
        procs.cleanup()


# ---------------------------------------------------------------------------------------
# what /proc and `env` say


def env_lines(stdout):
    """The NAME=value lines of `env` output (CRs from a PTY dropped) as a dict."""
    out = {}
    for line in stdout.decode("utf-8", "replace").replace("\r", "").splitlines():
        name, eq, value = line.partition("=")
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            out[name] = value
    return out


def can_unshare_pid():
    """Root, and unshare --pid --fork works here (a private PID namespace)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def children_of(ppid):
    """[(pid, state)] of the processes whose parent is ppid."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == ppid:
            out.append((int(d), fields[0]))
    return out


# ---------------------------------------------------------------------------------------
# sanitizers: under an ASan+UBSan build (tests/run sets TETHER_SANITIZER_LOGS and points
# ASAN_OPTIONS/UBSAN_OPTIONS' log_path into it), a report written while a test ran fails
# that test, with the report. tests/run counts every report again at the end, so one that
# a module-scoped process writes late is not lost.

SANITIZER_LOGS = os.environ.get("TETHER_SANITIZER_LOGS")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "plain_build: asserts memory figures, which an ASan build's quarantine and "
        "shadow memory make meaningless; skipped when TETHER_SANITIZED is set (tests/run "
        "runs these against the plain build)")
    config.addinivalue_line(
        "markers", "static_build: runs the static binary (TETHER_STATIC_BIN, made by "
        "packaging/static/build.sh); tests/run runs these in a pass of their own")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("TETHER_SANITIZED"):
        return
    skip = pytest.mark.skip(reason="asserts memory figures: runs against the plain build")
    for item in items:
        if item.get_closest_marker("plain_build"):
            item.add_marker(skip)


def sanitizer_reports(names=None):
    """{file name: text} of the reports in TETHER_SANITIZER_LOGS (only names, if given)."""
    if not SANITIZER_LOGS or not os.path.isdir(SANITIZER_LOGS):
        return {}
    out = {}
    for n in sorted(os.listdir(SANITIZER_LOGS)):
        if names is None or n in names:
            with open(os.path.join(SANITIZER_LOGS, n), "rb") as f:
                out[n] = f.read(20000).decode("utf-8", "replace")
    return out


@pytest.fixture(autouse=True)
def no_sanitizer_reports():
    if not SANITIZER_LOGS:
        yield
        return
    before = set(sanitizer_reports())
    yield
    new = {n: t for n, t in sanitizer_reports().items() if n not in before}
    if new:
        pytest.fail("sanitizer reports while this test ran:\n" + "\n".join(
            "--- %s ---\n%s" % (n, t) for n, t in new.items()), pytrace=False)
