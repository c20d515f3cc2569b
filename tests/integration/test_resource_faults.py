"""Resource faults (issue 6, item 4) that test_faults.py, test_shutdown.py and test_ssh.py
leave out: the agent at its file-descriptor limit (`prlimit --nofile`), a state directory
that is read-only or full, and the agent killed with SIGKILL and started again on the same
state directory.

At the limit, a new stream (tcp forward, SSH, PTY) is refused with a reason that names the
problem, the agent logs it and keeps serving what is open, and new streams work again once
descriptors are free. The state directory tests need root and private mount namespaces (a
read-only bind mount, a small tmpfs); they are skipped otherwise.
"""
import asyncio
import http.client
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import uuid

import pytest
import websockets
import websockets.exceptions

from conftest import (SSH_HOST_KEY, SshEnv, mount_namespace_available, proc_cpu_seconds,
                      wait_until, ws_texts_until_closed)
from lifecyclelib import pid_gone

NOFILE = 64                  # the agent's descriptor limit in the fd tests
MAX_STREAMS = 200            # bound on the streams a test opens to reach the limit
OUT_OF_FDS = "out of file descriptors"
CLOSE_INTERNAL = 4009        # the relay's close code for OPEN_FAIL INTERNAL (4000 + 9)
IDLE_CPU_MAX_S = 0.5         # agent CPU allowed in IDLE_WINDOW_S at the limit, doing nothing
IDLE_WINDOW_S = 3.0

needs_mount_ns = pytest.mark.skipif(
    not mount_namespace_available(),
    reason="needs root and private mount namespaces (unshare --mount) for read-only and "
           "full state directories")


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Loop:
    """One event loop for a test whose websockets live across several steps."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def run(self, coro, timeout=120):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close_all(self, conns):
        async def close():
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        try:
            self.run(close(), timeout=60)
        finally:
            self.loop.close()


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def nofile_limit(pid):
    """The soft RLIMIT_NOFILE of pid, from /proc/PID/limits."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' for pid %d" % pid)


def readline_within(f, timeout=30):
    """f.readline(), bounded: fails after timeout (the caller kills the writer)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("line", f.readline()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "no line within %ss" % timeout
    return out["line"]


def known_hosts_opts(path, strict):
    return ["UserKnownHostsFile=%s" % path, "StrictHostKeyChecking=%s" % strict]


# ---------------------------------------------------------------------------------------
# websocket clients of the relay


async def tcp_client(relay, port, ws_name="alpha"):
    return await websockets.connect(
        "%s/api/v1/workspaces/%s/tcp/%d" % (relay.url, ws_name, port),
        extra_headers={"Authorization": "Bearer " + relay.tokens.user_token()},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


async def pty_client(relay, pty_id, ws_name="alpha"):
    return await websockets.connect(
        "%s/api/v1/workspaces/%s/pty?id=%s&rows=24&cols=80" % (relay.url, ws_name, pty_id),
        extra_headers={"Authorization": "Bearer " + relay.tokens.user_token()},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)


async def echo_exact(c, payload, timeout=30):
    """Sends payload on a tcp websocket to an echo server; returns what came back once as
    many bytes arrived (ConnectionClosed propagates)."""
    await c.send(payload)
    got = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < len(payload):
        left = deadline - loop.time()
        assert left > 0, "echo: %d of %d bytes after %ss" % (len(got), len(payload), timeout)
        m = await asyncio.wait_for(c.recv(), left)
        got += m if isinstance(m, bytes) else m.encode()
    return bytes(got)


async def read_until(ws, pattern, timeout=20):
    """Reads a pty websocket until the regex pattern matches its output; returns the match
    and everything read."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = re.search(pattern, bytes(got))
        if m:
            return m, bytes(got)
        left = deadline - loop.time()
        assert left > 0, "timed out waiting for %r; got %r" % (pattern, bytes(got[-300:]))
        msg = await asyncio.wait_for(ws.recv(), left)
        if isinstance(msg, bytes):
            got += msg


async def closed_with(ws, timeout=20):
    """Reads until the websocket closes; returns (code, reason)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(100000):
        left = deadline - loop.time()
        assert left > 0, "websocket still open after %ss" % timeout
        try:
            await asyncio.wait_for(ws.recv(), left)
        except websockets.exceptions.ConnectionClosed as e:
            return e.code, e.reason
    raise AssertionError("unreachable")


async def fill_to_limit(relay, port, held):
    """Opens tcp streams to the echo server on port (each checked with a round trip) until
    the agent refuses one; the open ones are appended to held. Returns (code, reason) of
    the refusal."""
    for i in range(MAX_STREAMS):
        c = await tcp_client(relay, port)
        probe = b"probe-%04d" % i
        try:
            got = await echo_exact(c, probe)
        except websockets.exceptions.ConnectionClosed as e:
            return e.code, e.reason
        assert got == probe
        held.append(c)
    raise AssertionError("%d streams open and none refused: is the limit applied?" %
                         len(held))


async def refused_again(relay, port, n=5):
    """n more tcp streams at the limit: every one refused, with its (code, reason)."""
    out = []
    for _ in range(n):
        c = await tcp_client(relay, port)
        try:
            await echo_exact(c, b"x")
            out.append(("accepted", c))
        except websockets.exceptions.ConnectionClosed as e:
            out.append((e.code, e.reason))
    return out


async def all_echo_exact(held, seed, size=64 * 1024):
    rnd = random.Random(seed)
    payloads = [rnd.randbytes(size) for _ in held]
    got = await asyncio.gather(*(echo_exact(c, p) for c, p in zip(held, payloads)))
    bad = [i for i, (g, p) in enumerate(zip(got, payloads)) if g != p]
    assert not bad, "streams %r echoed different bytes" % bad


def assert_idle_at_the_limit(pid):
    c0 = proc_cpu_seconds(pid)
    time.sleep(IDLE_WINDOW_S)
    used = proc_cpu_seconds(pid) - c0
    assert used < IDLE_CPU_MAX_S, "the agent used %.2fs CPU in %.0fs at its fd limit" % (
        used, IDLE_WINDOW_S)


def limited_agent(harness, relay, tmp_path, nofile=NOFILE, ws_name="alpha"):
    """The real agent started under prlimit (which execs it: the pid is the agent's)."""
    args = ["prlimit", "--nofile=%d:%d" % (nofile, nofile), "--", harness.bin, "agent",
            "--url", relay.url, "--token-file", harness.tokens.agent_file(ws_name),
            "--state-dir", str(tmp_path / "state")]
    proc = harness.procs.start("agent-%s-nofile%d" % (ws_name, nofile), args)

    def up():
        assert proc.alive(), "agent exited early:\n" + proc.describe()
        return relay.connected(ws_name)
    wait_until(up, timeout=20, what="the limited agent to connect")
    assert nofile_limit(proc.pid) == nofile
    return proc


# ---------------------------------------------------------------------------------------
# 1. the agent at its descriptor limit


def test_fd_limit_refuses_new_forwards_with_a_reason_and_keeps_open_ones(harness, relay,
                                                                          servers, tmp_path):
    echo = servers.echo()
    agent = limited_agent(harness, relay, tmp_path)
    base = fd_count(agent.pid)
    held = []

    async def go():
        code, reason = await fill_to_limit(relay, echo.port, held)
        print("agent: %d fds at start, %d streams open at the limit (%d fds), refused with "
              "%d %r" % (base, len(held), fd_count(agent.pid), code, reason))
        assert code == CLOSE_INTERNAL and OUT_OF_FDS in reason, (code, reason)
        assert len(held) >= 10, "only %d forwards fit under %d fds" % (len(held), NOFILE)
        # Still at the limit: every further attempt is refused the same way.
        for got in await refused_again(relay, echo.port):
            assert got == (CLOSE_INTERNAL, reason), got
        # A terminal needs descriptors too: refused with the same words.
        p = await pty_client(relay, uuid.uuid4())
        pcode, preason = await closed_with(p)
        assert pcode == CLOSE_INTERNAL and OUT_OF_FDS in preason, (pcode, preason)
        assert agent.alive()
        assert_idle_at_the_limit(agent.pid)
        # What was open before the limit goes on, byte-exact.
        await all_echo_exact(held, seed=1)
        # Free a few: new streams work again, old ones too.
        n_free = 8
        before = fd_count(agent.pid)
        for c in held[:n_free]:
            await c.close()
        del held[:n_free]
        wait_until(lambda: fd_count(agent.pid) <= before - n_free, timeout=15,
                   what="the agent to close the freed streams' sockets")
        for i in range(n_free - 2):
            c = await tcp_client(relay, echo.port)
            held.append(c)
        await all_echo_exact(held, seed=2)
    loop = Loop()
    try:
        loop.run(go())
    finally:
        loop.close_all(held)
    log = agent.stderr()
    assert OUT_OF_FDS in log, "the agent did not log the refusals:\n" + log[-3000:]
    assert agent.alive() and relay.connected("alpha")
    wait_until(lambda: fd_count(agent.pid) <= base + 2, timeout=15,
               what="the agent's descriptors to return to where they started")


class LimitedSshEnv(SshEnv):
    """SshEnv whose agent runs under `prlimit --nofile=N:N` (exec'd: same pid)."""

    def __init__(self, harness, tmp, nofile):
        self.nofile = nofile
        super().__init__(harness, tmp)

    def agent_args(self, state_dir=None, extra=()):
        args = super().agent_args(state_dir, extra)
        i = args.index(self.harness.bin)
        return args[:i] + ["prlimit", "--nofile=%d:%d" % (self.nofile, self.nofile),
                           "--"] + args[i:]


def test_fd_limit_refuses_ssh_with_a_reason_and_keeps_open_sessions(harness, servers,
                                                                    tmp_path):
    env = LimitedSshEnv(harness, tmp_path / "ssh", NOFILE)
    pid = env.agent.pid
    assert nofile_limit(pid) == NOFILE
    echo = servers.echo()
    # A session that stays open across the limit: cat echoes what it is sent.
    sess = env.ssh_popen("echo up; exec cat", stdin=subprocess.PIPE)
    held = []
    loop = Loop()
    try:
        assert readline_within(sess.stdout) == b"up\n"
        code, reason = loop.run(fill_to_limit(env.relay, echo.port, held))
        assert code == CLOSE_INTERNAL and OUT_OF_FDS in reason, (code, reason)
        print("%d forwards and one SSH session fill %d fds" % (len(held), NOFILE))

        mark = len(env.agent.stderr())
        r = env.ssh("echo should-not-run", timeout=60)
        print("ssh at the limit: rc %d, stderr %r" % (r.returncode, r.stderr))
        assert r.returncode == 255 and r.stdout == b""
        assert OUT_OF_FDS.encode() in r.stderr, r.stderr
        wait_until(lambda: OUT_OF_FDS in env.agent.stderr()[mark:], timeout=10,
                   what="the agent to log the refused SSH stream")
        assert env.agent.alive()
        assert_idle_at_the_limit(pid)

        # The open session still works, byte-exact.
        line = b"still-here-%d\n" % random.Random(3).getrandbits(64)
        sess.stdin.write(line)
        sess.stdin.flush()
        assert readline_within(sess.stdout) == line

        async def free(n):
            before = fd_count(pid)
            for c in held[:n]:
                await c.close()
            del held[:n]
            wait_until(lambda: fd_count(pid) <= before - n, timeout=15,
                       what="the agent to close the freed streams' sockets")

        # Three free: enough for the SSH stream (a socketpair and a duplicate), not for the
        # command's pipes. The session fails with a reason instead of hanging.
        loop.run(free(3))
        mark = len(env.agent.stderr())
        r = env.ssh("echo should-not-run-either", timeout=60)
        print("ssh with 3 fds free: rc %d, stderr %r" % (r.returncode, r.stderr))
        assert r.returncode == 255 and r.stdout == b""
        assert b"exec request failed" in r.stderr, r.stderr
        wait_until(lambda: OUT_OF_FDS in env.agent.stderr()[mark:], timeout=10,
                   what="the agent to log the session it could not start")

        # Free some more: SSH works again.
        loop.run(free(12))
        r = env.ssh("echo back", timeout=60)
        assert r.returncode == 0 and r.stdout == b"back\n", (r.returncode, r.stderr)
        sess.stdin.close()
        assert sess.wait(timeout=30) == 0
    finally:
        if sess.poll() is None:
            sess.kill()
            sess.wait(timeout=10)
        loop.close_all(held)


# ---------------------------------------------------------------------------------------
# 2. the state directory read-only or full


RO_WRAP = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
           'exec "$@"')


# ---------------------------------------------------------------------------------------
# the relay at its descriptor limit


RELAY_NOFILE = 96   # soft = hard: the relay cannot raise it; lws's table gets 96 - 32


def test_relay_at_its_fd_limit_stops_accepting_instead_of_spinning(harness, tmp_path):
    """150 silent connections to a relay limited to 96 descriptors: libwebsockets stops
    accepting before the process runs out (WSCTX_FD_RESERVE kept for the rest) instead of
    failing accept with EMFILE in a busy loop that logged every failure (measured before:
    1.8 s of CPU in 3 s and 34 MB of log). The rest wait in the kernel's backlog and are
    served as descriptors free up: the API answers once the attackers close."""
    args = ["prlimit", "--nofile=%d:%d" % (RELAY_NOFILE, RELAY_NOFILE), "--", harness.bin,
            "relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path]
    proc = harness.procs.start("relay-nofile%d" % RELAY_NOFILE, args)
    m = wait_until(lambda: re.search(r"relay listening on ws://127\.0\.0\.1:(\d+)",
                                     proc.stderr()), timeout=15, what="the relay to listen")
    port = int(m.group(1))
    socks = []
    try:
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        c0 = proc_cpu_seconds(proc.pid)
        time.sleep(IDLE_WINDOW_S)
        used = proc_cpu_seconds(proc.pid) - c0
        log = proc.stderr()
        assert "errno 24" not in log and len(log) < 4096, log[-2000:]
        assert used < IDLE_CPU_MAX_S, "the relay used %.2fs CPU in %.0fs at its fd limit" % (
            used, IDLE_WINDOW_S)
    finally:
        for s in socks:
            s.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/api/v1/workspaces",
                     headers={"Authorization": "Bearer " + harness.tokens.user_token()})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert proc.alive(), proc.describe()


def run_agent_once(harness, relay, wrap, state_dir, prepare=None, timeout=30):
    """Runs the agent on state_dir in a private mount namespace prepared by the shell
    snippet wrap ($1: the directory to prepare, state_dir unless told, then the agent's
    argv); returns CompletedProcess."""
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", wrap,
            "sh", str(prepare or state_dir), harness.bin, "agent", "--url", relay.url, "--token-file",
            str(harness.tokens.agent_file("alpha")), "--state-dir", str(state_dir)]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def one_line_naming(stderr, path):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, "expected one line of error, got:\n" + stderr
    assert lines[0].startswith("tether: ") and str(path) in lines[0], lines[0]
    return lines[0]


@needs_mount_ns
def test_read_only_state_dir_without_a_host_key_exits_1_naming_it(harness, relay, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    r = run_agent_once(harness, relay, RO_WRAP, state)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = one_line_naming(r.stderr, state)
    assert "Read-only file system" in line, line
    assert os.listdir(str(state)) == []
    assert not relay.connected("alpha")


@needs_mount_ns
def test_state_dir_under_a_read_only_parent_exits_1_naming_it(harness, relay, tmp_path):
    parent = tmp_path / "ro-parent"
    parent.mkdir()
    state = parent / "state"
    r = run_agent_once(harness, relay, RO_WRAP, state, prepare=parent)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = one_line_naming(r.stderr, state)
    assert "Read-only file system" in line, line
    assert not state.exists()


class ReadOnlyStateSshEnv(SshEnv):
    """SshEnv whose agent sees its state directory through a read-only bind mount once
    read_only is set."""

    read_only = False

    def agent_args(self, state_dir=None, extra=()):
        args = super().agent_args(state_dir, extra)
        if not self.read_only:
            return args
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                RO_WRAP, "sh", str(state_dir or self.state_dir)] + args


def mounted_read_only(pid, path):
    """True if path is a read-only mount point in pid's mount namespace."""
    with open("/proc/%d/mountinfo" % pid) as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return "ro" in fields[5].split(",")
    return False


@needs_mount_ns
def test_read_only_state_dir_with_a_host_key_serves_ssh(harness, tmp_path):
    env = ReadOnlyStateSshEnv(harness, tmp_path / "ssh")   # first start: makes the key
    key = env.state_dir / SSH_HOST_KEY
    before = key.read_bytes()
    kh = tmp_path / "known_hosts"
    r = env.ssh("true", opts=known_hosts_opts(kh, "accept-new"))
    assert r.returncode == 0, r.stderr

    env.read_only = True
    env.restart_agent()
    assert mounted_read_only(env.agent.pid, env.state_dir), "the state dir is not read-only"
    r = env.ssh("echo served-read-only", opts=known_hosts_opts(kh, "yes"))
    assert r.returncode == 0 and r.stdout == b"served-read-only\n", (r.stderr,
                                                                     env.agent_log())
    assert key.read_bytes() == before
    assert "Read-only" not in env.agent.stderr() and env.agent.alive()


# A 16 KiB tmpfs on the state directory, filled up (dd stops at ENOSPC); then the agent
# runs (not exec'd; killed after 15 s if it starts anyway, status 137) and the snippet
# reports its status and what the directory holds, with sizes.
FULL_WRAP = ('d="$1" && mount -t tmpfs -o size=16k,mode=0700 tmpfs "$d" && '
             '{ dd if=/dev/zero of="$d/fill" bs=4096 count=64 2>/dev/null; '
             'shift; timeout -s KILL 15 "$@"; rc=$?; echo "== rc=$rc"; ls -A "$d"; '
             'echo "== sizes"; wc -c "$d"/*; }')


@needs_mount_ns
def test_full_state_dir_fails_clearly_and_leaves_no_partial_key(harness, relay, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    r = run_agent_once(harness, relay, FULL_WRAP, state)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    out = r.stdout.split("== rc=", 1)
    assert len(out) == 2, (r.stdout, r.stderr)
    rc_text, rest = out[1].split("\n", 1)
    listing, sizes = rest.split("== sizes", 1)
    assert listing.split() == ["fill"], "left in the full state dir:%s\nagent: %s" % (
        sizes, r.stderr)
    assert int(rc_text) == 1, (rc_text, r.stderr)
    line = one_line_naming(r.stderr, state)
    assert "No space left on device" in line, line


def test_a_host_key_path_that_cannot_be_checked_is_not_replaced(harness, relay, tmp_path):
    """A key the agent cannot look at (here a symlink loop) is an error, not a reason to
    make a new key over it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = state / SSH_HOST_KEY
    os.symlink(SSH_HOST_KEY, str(key))
    r = harness.run("agent", "--url", relay.url, "--token-file",
                    harness.tokens.agent_file("alpha"), "--state-dir", state, timeout=15)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = one_line_naming(r.stderr, key)
    # strerror(ELOOP): glibc "Too many levels of symbolic links", musl "Symbolic link loop"
    assert "cannot read the host key" in line and "symbolic link" in line.lower(), line
    assert os.readlink(str(key)) == SSH_HOST_KEY
    assert sorted(os.listdir(str(state))) == [SSH_HOST_KEY]


def test_host_key_file_is_written_whole_and_private(harness, relay, tmp_path):
    """Without any fault: the key is made once, 0600, and no temporary file stays."""
    state = tmp_path / "state"
    agent = harness.agent(relay, "alpha", extra=["--state-dir", str(state)])
    names = sorted(os.listdir(str(state)))
    assert names == [SSH_HOST_KEY], names
    key = state / SSH_HOST_KEY
    assert key.stat().st_mode & 0o777 == 0o600
    r = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("ssh-ed25519 "), r.stderr
    assert "created the SSH host key" in agent.stderr()


# ---------------------------------------------------------------------------------------
# 3. SIGKILL and restart on the same state directory


def test_sigkill_restart_same_host_key_ptys_gone_and_reattach_gets_a_new_shell(harness,
                                                                               tmp_path):
    env = SshEnv(harness, tmp_path / "ssh")
    relay = env.relay
    key = env.state_dir / SSH_HOST_KEY
    key_before = key.read_bytes()
    kh = tmp_path / "known_hosts"
    r = env.ssh("true", opts=known_hosts_opts(kh, "accept-new"))
    assert r.returncode == 0, r.stderr
    detached_id, attached_id = uuid.uuid4(), uuid.uuid4()
    sess = env.ssh_popen("echo up; exec cat", stdin=subprocess.PIPE,
                         opts=known_hosts_opts(kh, "yes"))
    # A command with no PTY that reads and writes nothing: only the agent's death can end
    # it (PR_SET_PDEATHSIG: SIGHUP, as a hang-up would).
    quiet = env.ssh_popen("echo pid-$$; exec sleep 1000", stdin=subprocess.DEVNULL,
                          opts=known_hosts_opts(kh, "yes"))
    try:
        assert readline_within(sess.stdout) == b"up\n"
        quiet_pid = int(readline_within(quiet.stdout).decode().strip().split("-")[1])
        assert not pid_gone(quiet_pid)

        async def before_kill():
            # One terminal detached, one attached when the agent dies.
            d = await pty_client(relay, detached_id)
            await d.send(json.dumps({"data": "echo old-$((6*7)) pid-$$-end\r"}))
            m, _ = await read_until(d, rb"pid-(\d+)-end")
            await d.close()
            a = await pty_client(relay, attached_id)
            await a.send(json.dumps({"data": "echo pid-$$-end\r"}))
            m2, _ = await read_until(a, rb"pid-(\d+)-end")
            shells = [int(m.group(1)), int(m2.group(1))]
            assert not any(pid_gone(p) for p in shells)
            env.agent.kill()   # SIGKILL; the sessions' processes are in sessions of their own
            t0 = time.monotonic()
            code, reason = await closed_with(a, timeout=20)
            return shells, code, reason, time.monotonic() - t0
        shells, code, reason, took = run(before_kill())
        print("attached terminal closed %d %r %.2fs after SIGKILL" % (code, reason, took))
        assert code != 1000, "a terminal cut by a dead agent closed as if it had ended"

        # The SSH client sees the end; the terminals' shells end with their PTYs.
        assert sess.wait(timeout=30) != 0
        wait_until(lambda: all(pid_gone(p) for p in shells), timeout=15,
                   what="the killed agent's PTY shells to end")
        wait_until(lambda: pid_gone(quiet_pid), timeout=15,
                   what="the killed agent's quiet command (sleep) to end")
        wait_until(lambda: not relay.connected("alpha"), timeout=15,
                   what="the relay to see the killed agent go")
    finally:
        for p in (sess, quiet):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)

    env.start_agent()   # same state directory
    assert relay.connected("alpha")
    # Same host key: ssh with the known_hosts of the first agent and strict checking.
    r = env.ssh("echo same-key", opts=known_hosts_opts(kh, "yes"))
    assert r.returncode == 0 and r.stdout == b"same-key\n", (r.stderr, env.agent_log())
    assert key.read_bytes() == key_before
    assert key.stat().st_mode & 0o777 == 0o600

    async def reattach(pty_id):
        # The old id: a new shell (not the old one's replay, not a hang), which works.
        c = await pty_client(relay, pty_id)
        await c.send(json.dumps({"data": "echo new-$((6*9)) pid-$$-end\r"}))
        m, out = await read_until(c, rb"new-54 pid-(\d+)-end")
        assert b"old-42" not in out, "the old terminal's output was replayed: %r" % out
        await c.send(json.dumps({"data": "exit 3\r"}))
        texts, code = await ws_texts_until_closed(c, timeout=20)
        assert code is not None, "the terminal did not end"
        return int(m.group(1)), texts, code
    for pty_id in (detached_id, attached_id):
        new_pid, texts, code = run(reattach(pty_id))
        assert new_pid not in shells
        assert texts == ['{"exit":3}'] and code == 1000, (texts, code)
    assert env.agent.alive()
