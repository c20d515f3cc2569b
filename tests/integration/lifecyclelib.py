"""Helpers shared by the lifecycle, logs, devcontainer, metadata and shutdown tests (issue 5,
second half): a relay and an agent for workspace alpha started with the options a test
needs, the relay's /logs read page by page, the agent's "lifecycle: STATE" lines, OpenSSH
sessions through `tether ssh-proxy`, and PTYs through the relay's websocket."""
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import websockets

from conftest import WORKSPACES, wait_until

# PROTOCOL.md 12 (lifecycle): the states and their partial order.
STATES = ("created", "starting", "ready", "start_error", "start_timeout", "shutting_down",
          "shutdown_error", "shutdown_timeout", "off")
RANK = {"created": 0, "starting": 1, "ready": 2, "start_error": 2, "start_timeout": 2,
        "shutting_down": 3, "shutdown_error": 4, "shutdown_timeout": 4, "off": 5}

LIFECYCLE_LINE = re.compile(r"\blifecycle: ([a-z_]+)\b")
WAIT_NOTICE = "tether: waiting for the workspace's startup script to finish..."


def write_manifest(path, doc):
    """The relay's --manifest FILE (JSON object: workspace name or "*" -> members)."""
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1))
    return path


def pid_gone(pid):
    """True if pid no longer runs (absent, or a zombie nobody collected yet)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(")") + 2:].split()[0] in ("Z", "X")


def read_pid(path):
    """The pid a script wrote into path, once the file holds a whole line."""
    path = Path(path)
    if not path.exists():
        return None
    text = path.read_text()
    if not text.endswith("\n"):
        return None
    return int(text.strip())


class Workspace:
    """A relay (with extra options) and, once start_agent() is called, the real agent for
    one workspace (with extra options, e.g. --startup-script), plus an ssh_config whose Host
    `ws` reaches it through `tether ssh-proxy` with the admin user's token. Sessions run in
    the real home directory (they only run short commands); the workspace directory, if a
    test wants one, is `dir` (under tmp)."""

    def __init__(self, harness, tmp, relay_extra=(), workspace=WORKSPACES[0], relay=None):
        self.harness = harness
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.name = workspace
        self.dir = self.tmp / "ws"
        self.dir.mkdir(exist_ok=True)
        self.relay = relay or harness.relay(extra=[str(a) for a in relay_extra])
        self.agent = None
        self.config = self.tmp / "ssh_config"
        self.write_ssh_config()

    # -- the agent

    def agent_argv(self, extra=(), state_dir=None):
        return [self.harness.bin, "agent", "--url", self.relay.url, "--token-file",
                str(self.harness.tokens.agent_file(self.name)), "--state-dir",
                str(state_dir or (self.tmp / ("state-%s" % self.name)))] + \
            [str(a) for a in extra]

    def start_agent(self, extra=(), wait=True, env=None, wrap=()):
        """Starts the agent; waits until the relay lists it as connected and has its hello
        (wait=True).
        wrap: argv put in front (e.g. unshare ... sh -c '... exec "$@"' sh)."""
        argv = list(wrap) + self.agent_argv(extra)
        proc = self.harness.procs.start("agent-%s" % self.name, argv, env=env)
        self.agent = proc
        if wait:
            def up():
                assert proc.alive(), "agent exited early:\n" + proc.describe()
                return self.relay.said_hello(self.name)
            wait_until(up, timeout=20, what="agent %s to connect" % self.name)
        return proc

    def agent_stderr(self):
        return self.agent.stderr() if self.agent else ""

    # -- the relay's view

    def json(self):
        return self.relay.workspace(self.name)

    def lifecycle(self):
        return self.json().get("lifecycle")

    def wait_lifecycle(self, states, timeout=30):
        """Waits until the workspace's lifecycle is one of states; returns it."""
        if isinstance(states, str):
            states = (states,)
        seen = []

        def reached():
            st = self.lifecycle()
            if not seen or seen[-1] != st:
                seen.append(st)
            return st if st in states else None
        try:
            return wait_until(reached, timeout=timeout, interval=0.1,
                              what="lifecycle in %r" % (states,))
        except AssertionError as e:
            raise AssertionError("%s; lifecycle values seen: %r; agent stderr:\n%s" % (
                e, seen, self.agent_stderr()[-3000:])) from None

    def logs(self, after=None, user=None, token=None):
        path = "/api/v1/workspaces/%s/logs" % self.name
        if after is not None:
            path += "?after=%d" % after
        kw = {}
        if token is not None:
            kw["token"] = token
        elif user is not None:
            kw["user"] = user
        return self.relay.api(path, **kw)

    def all_logs(self, max_pages=100000):
        """Every kept line, paging with after=next-1 until a page comes back empty. Checks
        the page structure and that n grows by exactly 1 from line to line."""
        lines = []
        after = None
        for _ in range(max_pages):
            code, body = self.logs(after)
            assert code == 200, "GET logs: HTTP %d %r" % (code, body[:300])
            doc = json.loads(body)
            assert set(doc) >= {"lines", "first", "next"}, doc.keys()
            page = doc["lines"]
            if not page:
                return lines
            for ln in page:
                assert set(ln) >= {"n", "time", "source", "text"}, ln
                if lines:
                    assert ln["n"] == lines[-1]["n"] + 1, "n jumps from %d to %d" % (
                        lines[-1]["n"], ln["n"])
                elif after is None:
                    assert ln["n"] == doc["first"], (ln["n"], doc["first"])
                lines.append(ln)
            assert doc["next"] == page[-1]["n"] + 1, (doc["next"], page[-1]["n"])
            after = doc["next"] - 1
        raise AssertionError("more than %d pages of logs" % max_pages)

    def texts(self, source, lines=None):
        """The texts of the lines from source, in order."""
        if lines is None:
            lines = self.all_logs()
        return [ln["text"] for ln in lines if ln["source"] == source]

    def lifecycle_lines(self, lines=None):
        """[(n, state)] of the agent's "lifecycle: STATE" lines, in order."""
        if lines is None:
            lines = self.all_logs()
        out = []
        for ln in lines:
            if ln["source"] != "agent":
                continue
            m = LIFECYCLE_LINE.search(ln["text"])
            if m and m.group(1) in RANK:
                out.append((ln["n"], m.group(1)))
        return out

    def states(self, lines=None):
        """The states of the agent's lifecycle lines, "created" (the initial state, not a
        transition) left out."""
        return [s for _, s in self.lifecycle_lines(lines) if s != "created"]

    def wait_states(self, expected, timeout=30):
        """Waits until the agent's lifecycle lines (created left out) are exactly expected;
        fails early if they go somewhere else."""
        expected = list(expected)

        def check():
            got = self.states()
            assert got == expected[:len(got)], "lifecycle lines %r, expected %r" % (
                got, expected)
            return got == expected
        try:
            wait_until(check, timeout=timeout, interval=0.2,
                       what="lifecycle lines %r in the relay's logs" % expected)
        except AssertionError as e:
            raise AssertionError("%s; logs of source agent: %r" % (
                e, self.texts("agent")[-40:])) from None

    def wait_text(self, source, pred, timeout=30, what=None):
        """Waits until the lines of source satisfy pred(list of texts); returns the texts."""
        def check():
            t = self.texts(source)
            return t if pred(t) else None
        try:
            return wait_until(check, timeout=timeout, interval=0.2,
                              what=what or "log lines of source %s" % source)
        except AssertionError as e:
            by = {}
            for ln in self.all_logs():
                by.setdefault(ln["source"], []).append(ln["text"])
            raise AssertionError("%s; sources now: %r" % (
                e, {k: v[-10:] for k, v in by.items()})) from None

    # -- SSH through tether ssh-proxy

    def write_ssh_config(self):
        h = self.harness
        self.config.write_text(
            "Host ws\n  ProxyCommand %s ssh-proxy --url %s --token-file %s %s\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n  BatchMode yes\n  ControlMaster no\n  ControlPath none\n" % (
                h.bin, self.relay.url, h.tokens.user_file(), self.name))

    def ssh_argv(self, *remote, tty=False):
        argv = ["ssh", "-F", str(self.config)]
        if tty:
            argv.append("-tt")
        return argv + ["ws"] + [str(r) for r in remote]

    def ssh(self, *remote, tty=False, timeout=60):
        """Runs ssh to completion (stdin /dev/null); CompletedProcess with bytes."""
        return subprocess.run(self.ssh_argv(*remote, tty=tty), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)

    def ssh_popen(self, *remote, tty=False, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.ssh_argv(*remote, tty=tty), start_new_session=True, **kw)

    # -- a PTY through the relay's websocket

    def pty_url(self, command=None, rows=24, cols=80, pty_id=None):
        q = [("id", str(pty_id or uuid.uuid4())), ("rows", str(rows)), ("cols", str(cols))]
        if command is not None:
            q.append(("command", command))
        return "%s/api/v1/workspaces/%s/pty?%s" % (
            self.relay.url, self.name,
            "&".join("%s=%s" % (k, urllib.parse.quote(v, safe="")) for k, v in q))

    def pty_run(self, command, timeout=60):
        """Runs command in a new PTY through the relay; returns (output bytes, [text
        messages], close code)."""
        async def go():
            ws = await websockets.connect(
                self.pty_url(command),
                extra_headers={"Authorization": "Bearer " + self.harness.tokens.user_token()},
                max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)
            out = bytearray()
            texts = []
            try:
                while True:
                    m = await ws.recv()
                    if isinstance(m, bytes):
                        out += m
                    else:
                        texts.append(m)
            except websockets.exceptions.ConnectionClosed as e:
                return bytes(out), texts, e.code
        return asyncio.run(asyncio.wait_for(go(), timeout))


def assert_forward_only(states):
    """States never go backwards in the partial order (and never repeat)."""
    for a, b in zip(states, states[1:]):
        assert RANK[b] > RANK[a], "lifecycle went from %s to %s: %r" % (a, b, states)


def now_ms():
    return int(time.time() * 1000)


def script_file(path, text):
    """An executable shell script (for commands too long or quote-heavy for one flag)."""
    path = Path(path)
    path.write_text("#!/bin/sh\n" + text)
    os.chmod(str(path), 0o755)
    return path


@contextlib.contextmanager
def relay_stopped_during_script(ws, tmp_path, body, timeout):
    """Starts ws's agent with a startup script that waits for a GO file, runs body (shell)
    and touches DONE; once the agent is connected, stops the relay (SIGSTOP), lets the
    script run to its end (within timeout) and yields with the relay still stopped. The
    relay gets SIGCONT on the way out, whatever happened."""
    go, done = Path(tmp_path) / "GO", Path(tmp_path) / "DONE"
    ws.start_agent(["--startup-script", "while [ ! -e %s ]; do sleep 0.05; done; %s; touch %s"
                    % (go, body, done)])
    wait_until(lambda: ws.relay.connected(ws.name), timeout=20, what="the agent to connect")
    os.kill(ws.relay.proc.pid, signal.SIGSTOP)
    try:
        go.touch()
        wait_until(done.exists, timeout=timeout, what="the script's output")
        yield
    finally:
        os.kill(ws.relay.proc.pid, signal.SIGCONT)
