"""`tether attach`: a terminal on a reconnecting PTY (PROTOCOL.md §14.7).

Most tests run `tether attach` on a pty of pexpect's against a fake relay (fakepty.py) that
speaks §14.7 and records what arrives: raw mode, input bytes, output, resizes, the detach
escape, exit statuses, reconnection with the same id, refusals, backpressure. One test runs
it inside tmux; the last ones run it against the real relay and agent.
"""
import asyncio
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import termios
import time
import uuid

import pexpect
import pytest

from conftest import ADMIN, WORKSPACES, proc_rss_kib, wait_until
from fakepty import FakePtyRelay

ID_LINE = re.compile(rb"tether: attached to ([0-9a-fA-F-]{36}) \(detach: Enter ~ \.\)\r\n")
CLEAR = b"\x1b[H\x1b[2J"
SOME_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


# ---------------------------------------------------------------------------------------
# helpers


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TETHER_") and k not in ("TMUX", "TMUX_PANE")}
    env["TERM"] = "xterm"
    env.update(extra)
    return env


@pytest.fixture
def fake(tokens):
    """fake(**kw) -> a started FakePtyRelay accepting the admin user's token."""
    started = []

    def start(**kw):
        r = FakePtyRelay(tokens.user_token(ADMIN), **kw).start()
        started.append(r)
        return r
    yield start
    for r in started:
        r.stop()


@pytest.fixture
def children():
    """pexpect children of a test; killed at its end."""
    started = []
    yield started
    for c in started:
        if c.isalive():
            c.terminate(force=True)
        c.close(force=True)


def attach_argv(bin_, url, token_file, *extra, workspace=WORKSPACES[0]):
    return [str(bin_), "attach", "--url", url, "--token-file", str(token_file),
            workspace] + [str(e) for e in extra]


def spawn(children, argv, rows=24, cols=80, timeout=20):
    child = pexpect.spawn(argv[0], argv[1:], dimensions=(rows, cols), timeout=timeout,
                          env=clean_env())
    children.append(child)
    return child


def spawn_attach(children, tether_bin, relay_url, tokens, *extra, rows=24, cols=80,
                 workspace=WORKSPACES[0]):
    return spawn(children, attach_argv(tether_bin, relay_url, tokens.user_file(), *extra,
                                       workspace=workspace), rows, cols)


def spawn_wrapped(children, tether_bin, relay_url, tokens, *extra):
    """`tether attach` run by a shell that prints `stty -g` before and after it and its exit
    status, to show that it leaves the terminal's settings as it found them."""
    script = ('printf "before=%s\\n" "$(stty -g)"; "$@"; rc=$?; '
              'printf "rc=%s after=%s\\n" "$rc" "$(stty -g)"')
    argv = ["/bin/sh", "-c", script, "sh"] + attach_argv(tether_bin, relay_url,
                                                          tokens.user_file(), *extra)
    child = spawn(children, argv)
    child.expect(rb"before=(\S+)\r\n")
    return child, child.match.group(1)


def expect_wrapped_end(child, before, rc):
    child.expect(rb"rc=(\d+) after=(\S+)\r?\n")
    got_rc, after = int(child.match.group(1)), child.match.group(2)
    assert after == before, "the terminal's settings changed: %r -> %r" % (before, after)
    assert got_rc == rc, "exit status %d, expected %d; output %r" % (got_rc, rc, child.before)
    return child.before


def attached(child):
    """Waits for the 'attached to ID' line; returns the id."""
    child.expect(ID_LINE)
    return child.match.group(1).decode()


def finish(child, timeout=15):
    """Waits for the end; returns (exit status, everything printed since the last expect)."""
    child.expect(pexpect.EOF, timeout=timeout)
    out = child.before
    child.close()
    assert child.signalstatus is None, "killed by signal %r" % child.signalstatus
    return child.exitstatus, out


def tty_attrs(pid):
    """termios of the terminal on a process's stdin, read from another file description."""
    path = os.readlink("/proc/%d/fd/0" % pid)
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        return termios.tcgetattr(fd)
    finally:
        os.close(fd)


def assert_raw(attrs):
    iflag, oflag, _, lflag = attrs[0], attrs[1], attrs[2], attrs[3]
    assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN), lflag
    assert not oflag & termios.OPOST, "output processing is on: %#x" % oflag
    assert not iflag & (termios.ICRNL | termios.IXON | termios.ISTRIP), iflag


def tether_lines(out):
    return [l for l in out.replace(b"\r", b"").split(b"\n") if l.startswith(b"tether: ")]


# ---------------------------------------------------------------------------------------
# 1. usage


def test_needs_a_terminal(harness, tokens):
    r = harness.run("attach", "--url", "ws://127.0.0.1:9", "--token-file", tokens.user_file(),
                    "alpha", env=clean_env())
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: ") and "terminal" in lines[0], lines


def test_needs_a_terminal_on_stdout(children, tether_bin, tokens, tmp_path):
    """stdin a terminal but stdout a file: refused too, before any connection."""
    out = tmp_path / "out"
    argv = attach_argv(tether_bin, "ws://127.0.0.1:9", tokens.user_file())
    child = spawn(children, ["/bin/sh", "-c", '"$@" >"$0"; echo "rc=$?"', str(out)] + argv)
    child.expect(rb"rc=(\d+)")
    assert int(child.match.group(1)) == 2, child.before
    assert b"stdout is not one" in child.before, child.before
    assert out.read_bytes() == b""


@pytest.mark.parametrize("bad", [
    "not-a-uuid",
    "0f8fad5b-d9cb-469f-a165-70867728950",      # one digit short
    "0f8fad5bd9cb-469f-a165-70867728950e0",     # hyphen misplaced
    "0f8fad5b-d9cb-469f-a165-70867728950g",     # not hex
    "00000000-0000-0000-0000-000000000000",     # all zero: malformed (PROTOCOL.md 3.2)
    "",
])
def test_bad_id(harness, tokens, bad):
    r = harness.run("attach", "--url", "ws://127.0.0.1:9", "--token-file", tokens.user_file(),
                    "--id", bad, "alpha", env=clean_env())
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: bad --id"), lines


def test_usage_errors(harness, tokens):
    base = ["attach", "--url", "ws://127.0.0.1:9", "--token-file", tokens.user_file()]
    for args, what in ((base, "WORKSPACE"), (base + ["no/such"], "workspace name"),
                       (base + ["--bogus", "alpha"], "unknown option"),
                       (base + ["alpha", "--", "x" * 5000], "longer than")):
        r = harness.run(*args, env=clean_env())
        assert r.returncode == 2, (args[5:], r.returncode, r.stderr)
        assert r.stderr.startswith("tether: ") and what in r.stderr, r.stderr
    r = harness.run("attach", "--help")
    assert r.returncode == 0 and "Enter ~ ." in r.stdout and "--id ID" in r.stdout, r
    r = harness.run("--help")
    assert re.search(r"\n  attach       attach this terminal", r.stdout), r.stdout


# ---------------------------------------------------------------------------------------
# 2. against the fake relay


def test_raw_mode_input_bytes_arrive_unchanged(fake, children, tether_bin, tokens):
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    child.expect(rb"fake-pty\$ ")
    conn = relay.wait_conn(0)
    assert conn.authorization == "Bearer " + tokens.user_token(ADMIN)
    assert_raw(tty_attrs(child.pid))
    # Ctrl-C, Ctrl-Z, Ctrl-\, Ctrl-D, Ctrl-S, Ctrl-Q, DEL, Enter as CR, ESC sequences, NUL,
    # UTF-8, and bytes that are no UTF-8 at all: every byte arrives as typed, in order.
    typed = (b"ls\x03\x1a\x1c\x04\x13\x11\x7f\r\x1b[A\x1bOP\x00h\xc3\xa9\xe2\x82\xac\xf0\x9f"
             b"\x98\x80 \xff\xfe\xc3( \"q\\ \t~end\r")
    child.send(typed)
    got = conn.wait_input(b"~end\r")
    assert got == typed, got
    kinds = [k for k, _ in conn.messages]
    assert "text" in kinds and "binary" in kinds, conn.messages
    # valid UTF-8 went as {"data": ...}; what is not UTF-8 (or NUL) as binary
    for kind, value in conn.messages:
        if kind == "binary":
            assert b"\x00" in value or any(b >= 0x80 for b in value), conn.messages
        else:
            assert set(value) == {"data"}, value
    # nothing was echoed locally: the terminal shows only what the relay sent
    conn.send_output(b"<<marker>>")
    child.expect(rb"<<marker>>")
    assert b"ls" not in child.before and b"end" not in child.before, child.before


def test_large_paste_arrives_intact(fake, children, tether_bin, tokens):
    """Input far beyond one message and one read, mixing UTF-8 and other bytes, arrives
    byte for byte and in order."""
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    rnd = random.Random(11)
    parts = []
    for _ in range(600):
        parts.append(rnd.choice([
            "plain ascii text, quotes \" and backslashes \\ ".encode(),
            "h\u00e9 \u20ac \U0001f600 ".encode(),
            bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40))),
        ]))
    data = b"".join(parts).replace(b"\r", b"").replace(b"~", b"") + b"<<paste-end>>"
    for off in range(0, len(data), 4096):
        child.send(data[off:off + 4096])
    conn.wait_input(b"<<paste-end>>", timeout=30)
    assert bytes(conn.input) == data, "%d bytes arrived, %d sent" % (len(conn.input), len(data))
    assert any(k == "binary" for k, _ in conn.messages) and any(
        k == "text" for k, _ in conn.messages)


def test_output_url_and_id(fake, children, tether_bin, tokens):
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens, rows=33, cols=111)
    the_id = attached(child)
    conn = relay.wait_conn(0)
    u = uuid.UUID(the_id)
    assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == the_id, the_id
    assert conn.id == the_id and conn.rows == 33 and conn.cols == 111, conn.query
    assert conn.command is None, conn.query
    payload = bytes(range(256)) * 64  # every byte value: raw output, written unchanged
    conn.send_output(payload + b"<<end>>")
    child.expect(rb"<<end>>")
    assert child.before.endswith(payload), "output was changed on its way to the terminal"
    # a random id is new: its first output is not preceded by a screen clear
    assert CLEAR not in child.before


def test_id_and_command_in_the_url(fake, children, tether_bin, tokens):
    relay = fake()
    words = ["printf", "%s|", "a b", "x&y=1;#?+", "h\u00e9"]
    child = spawn_attach(children, tether_bin, relay.url, tokens, "--id", SOME_ID.upper(),
                         "--", *words)
    assert attached(child) == SOME_ID.upper()
    conn = relay.wait_conn(0)
    assert conn.id == SOME_ID.upper()
    assert conn.command == " ".join(words), conn.query
    # --id may name a session that exists: its replay redraws a cleared screen
    child.expect(re.escape(CLEAR) + rb"fake-pty\$ ")


def test_resize_follows_the_window(fake, children, tether_bin, tokens):
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens, rows=24, cols=80)
    attached(child)
    conn = relay.wait_conn(0)
    child.setwinsize(40, 132)
    conn.wait_resize(40, 132)
    child.setwinsize(10, 20)
    conn.wait_resize(10, 20)
    assert conn.resizes[-1] == (10, 20), conn.resizes
    assert all(k == "text" for k, v in conn.messages if "rows" in v), conn.messages
    # the size goes in the URL of the next connection too
    conn.drop()
    conn2 = relay.wait_conn(1)
    assert (conn2.rows, conn2.cols) == (10, 20), conn2.query


def test_detach_escape_restores_the_terminal(fake, children, tether_bin, tokens):
    relay = fake()
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    the_id = attached(child)
    conn = relay.wait_conn(0)
    child.expect(rb"fake-pty\$ ")
    # '~' mid-line, "~~" after Enter, "~x" after Enter, "~" at the start of the next read
    child.send(b"a~b\r~~c\r~xd\r")
    conn.wait_input(b"a~b\r~c\r~xd\r")
    child.send(b"~")
    time.sleep(0.2)
    child.send(b"?\r")
    conn.wait_input(b"~xd\r~?\r")
    # the screen modes a program left on are put back on detach
    conn.send_output(b"\x1b[?1049h\x1b[?2004h\x1b[?1000h<<full-screen>>")
    child.expect(rb"<<full-screen>>")
    child.send(b"last\r~.")
    out = expect_wrapped_end(child, before, 0)
    assert bytes(conn.input).endswith(b"last\r"), conn.input  # input before the escape is sent
    assert b"\x1b[?2004l" in out and b"\x1b[?1000l" in out, out
    lines = tether_lines(out)
    assert len(lines) == 1 and b"detached" in lines[0] and the_id.encode() in lines[0], out
    code, _ = conn.wait_closed()
    assert code == 1000, conn.closed
    assert len(relay.conns) == 1


def test_remote_exit_status(fake, children, tether_bin, tokens):
    relay = fake()
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    conn.send_output(b"last words\r\n")
    conn.send_exit(3)
    out = expect_wrapped_end(child, before, 3)
    assert b"last words" in out, out
    lines = tether_lines(out)
    assert len(lines) == 1 and b"exit status 3" in lines[0], out
    time.sleep(0.5)
    assert len(relay.attempts) == 1, "reconnected after the session ended: %r" % relay.attempts


def test_exit_status_zero_and_signal(fake, children, tether_bin, tokens):
    for status in (0, 130):
        relay = fake()
        child = spawn_attach(children, tether_bin, relay.url, tokens)
        attached(child)
        relay.wait_conn(0).send_exit(status)
        code, _ = finish(child)
        assert code == status


def test_reconnects_with_the_same_id(fake, children, tether_bin, tokens):
    state = {"down": False}
    relay = fake(refuse=lambda n: 503 if state["down"] else None)
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    the_id = attached(child)
    conn = relay.wait_conn(0)
    conn.send_output(b"screen-before-the-drop")
    child.expect(rb"screen-before-the-drop")
    state["down"] = True
    conn.drop()
    child.expect(rb"tether: connection lost, reconnecting\.\.\.[^\r\n]*\r\n")
    relay.wait_attempts(3)  # the first connection and two refused attempts
    child.send(b"typed-while-away\r")
    time.sleep(0.3)
    state["down"] = False
    conn2 = relay.wait_conn(1, timeout=20)
    assert conn2.id == the_id
    assert conn2.authorization == conn.authorization
    # the replay comes after a screen clear, so the screen is not repeated
    child.expect(re.escape(CLEAR) + rb"fake-pty\$ screen-before-the-drop")
    # one status line per drop, not one per refused attempt
    assert b"connection lost" not in child.before, child.before
    conn2.wait_input(b"typed-while-away\r")
    assert b"typed-while-away" not in conn.input
    child.send(b"after\r")
    conn2.wait_input(b"after\r")
    conn2.send_exit(0)
    code, _ = finish(child)
    assert code == 0


def test_reconnects_more_often_than_its_connection_table_holds(fake, children, tether_bin,
                                                               tokens):
    """tether attach keeps libwebsockets' connection table at 8 entries
    (WSCTX_FEW_CONNECTIONS): each dropped connection gives its entry back, so the tenth
    connection carries input and output as the first did. (Nine quick drops: the backoff
    grows to its 5 s cap, about 11 s in all.)"""
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    for i in range(1, 10):
        conn.drop()
        conn = relay.wait_conn(i, timeout=20)
    conn.send_output(b"output-on-the-tenth-connection")
    child.expect(rb"output-on-the-tenth-connection")
    child.send(b"input-on-the-tenth\r")
    conn.wait_input(b"input-on-the-tenth\r")
    conn.send_exit(0)
    code, _ = finish(child)
    assert code == 0


def test_reconnect_backoff_is_bounded(fake, children, tether_bin, tokens):
    """Refused attempts are retried with backoff from 100 ms to 5 s: neither a busy loop
    nor long silences."""
    state = {"down": False}
    relay = fake(refuse=lambda n: 503 if state["down"] else None)
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    state["down"] = True
    t0 = time.monotonic()
    conn.drop()
    time.sleep(8)
    n = len(relay.attempts) - 1
    # 100 ms doubling to a 5 s cap, with jitter: a handful in 8 s, not hundreds, not one
    assert 3 <= n <= 40, "%d attempts in 8 s" % n
    state["down"] = False
    relay.wait_conn(1, timeout=10)
    assert time.monotonic() - t0 < 20
    child.send(b"\r~.")
    assert finish(child)[0] == 0


def test_detach_while_disconnected(fake, children, tether_bin, tokens):
    relay = fake(refuse=lambda n: 503 if n > 0 else None)
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    the_id = attached(child)
    relay.wait_conn(0).drop()
    child.expect(rb"reconnecting")
    relay.wait_attempts(2)
    child.send(b"\r~.")
    out = expect_wrapped_end(child, before, 0)
    assert the_id.encode() in out and b"detached" in out, out


def test_refused_token_exits_without_retrying(fake, children, tether_bin, tokens):
    relay = fake(refuse=401)
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    out = expect_wrapped_end(child, before, 1)
    lines = tether_lines(out)
    assert len(lines) == 1 and b"401" in lines[0], out
    assert b"attached" not in out
    time.sleep(1)
    assert len(relay.attempts) == 1, relay.attempts


@pytest.mark.parametrize("status,text", [(404, b"not found"), (503, b"offline"),
                                         (400, b"HTTP 400")])
def test_first_connection_refused(fake, children, tether_bin, tokens, status, text):
    relay = fake(refuse=status)
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    code, out = finish(child)
    assert code == 1 and text in out, out
    assert len(relay.attempts) == 1, relay.attempts


def test_unreachable_relay(children, tether_bin, tokens):
    from conftest import free_port
    child = spawn_attach(children, tether_bin, "ws://127.0.0.1:%d" % free_port(), tokens)
    code, out = finish(child)
    assert code == 1 and b"cannot reach the relay" in out, out


def test_refusal_after_a_drop_ends_it(fake, children, tether_bin, tokens):
    """The token was revoked while disconnected: 404 cannot be fixed by retrying."""
    relay = fake(refuse=lambda n: 404 if n > 0 else None)
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    the_id = attached(child)
    relay.wait_conn(0).drop()
    out = expect_wrapped_end(child, before, 1)
    assert b"not found" in out and the_id.encode() in out, out
    assert len(relay.attempts) == 2, relay.attempts


@pytest.mark.parametrize("code,retry", [(4007, False), (4003, False), (4010, True),
                                        (4002, True), (1001, True)])
def test_close_codes(fake, children, tether_bin, tokens, code, retry):
    relay = fake()
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    relay.wait_conn(0).close(code, "closed by the fake relay (%d)" % code)
    if retry:
        conn2 = relay.wait_conn(1)
        conn2.send_exit(5)
        assert finish(child)[0] == 5
    else:
        rc, out = finish(child)
        assert rc == 1 and len(relay.conns) == 1, out
        if code == 4007:
            assert b"serves no terminals" in out, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_restore_the_terminal(fake, children, tether_bin, tokens, sig):
    relay = fake()
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    pid = int(subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True,
                             text=True).stdout.split()[0])
    assert_raw(tty_attrs(pid))
    os.kill(pid, sig)
    out = expect_wrapped_end(child, before, 1)
    assert b"keeps running" in out, out
    assert conn.wait_closed()[0] == 1000


def test_fatal_signal_restores_the_terminal(fake, children, tether_bin, tokens):
    """The safety net: a signal that kills the process outright still restores the modes."""
    relay = fake()
    child, before = spawn_wrapped(children, tether_bin, relay.url, tokens)
    attached(child)
    relay.wait_conn(0)
    pid = int(subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True,
                             text=True).stdout.split()[0])
    os.kill(pid, signal.SIGUSR1)  # kills by default (and dumps no core)
    expect_wrapped_end(child, before, 128 + signal.SIGUSR1)


@pytest.mark.plain_build
def test_slow_terminal_pauses_the_relay(fake, children, tether_bin, tokens):
    """Output faster than the terminal takes it: tether stops reading the websocket (its
    memory stays bounded), and every byte arrives once the terminal reads again."""
    relay = fake(greeting=b"")
    child = spawn_attach(children, tether_bin, relay.url, tokens)
    attached(child)
    conn = relay.wait_conn(0)
    pid = child.pid
    rss0 = proc_rss_kib(pid)
    total = 40 * 1024 * 1024
    rnd = random.Random(5)
    data = rnd.randbytes(total)
    sent = {"n": 0}

    async def pump():
        for off in range(0, total, 64 * 1024):
            await conn.ws.send(data[off:off + 64 * 1024])
            sent["n"] = off + 64 * 1024
    fut = asyncio.run_coroutine_threadsafe(pump(), relay.loop)
    # nobody reads the pty: the relay's sends must stall well before the end
    time.sleep(3)
    stalled_at = sent["n"]
    # (what the kernel's socket buffers hold, a few MiB, gets through before the stall)
    assert stalled_at < 16 * 1024 * 1024, "the relay sent %d bytes to a terminal nobody reads" % (
        stalled_at)
    assert proc_rss_kib(pid) - rss0 < 16 * 1024, "RSS grew by %d KiB" % (
        proc_rss_kib(pid) - rss0)
    # now read it all: intact and in order
    h = hashlib.sha256()
    h.update(child.buffer)
    got = len(child.buffer)
    child.buffer = b""
    deadline = time.monotonic() + 120
    while got < total and time.monotonic() < deadline:
        chunk = child.read_nonblocking(1 << 20, timeout=10)
        h.update(chunk)
        got += len(chunk)
    fut.result(30)
    assert got == total and h.hexdigest() == hashlib.sha256(data).hexdigest(), got


# ---------------------------------------------------------------------------------------
# 3. inside tmux


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_inside_tmux(fake, tether_bin, tokens, tmp_path):
    relay = fake(echo=True)
    sock = str(tmp_path / "tmux.sock")

    def tmux(*args, check=True):
        return subprocess.run(["tmux", "-S", sock] + list(args), capture_output=True,
                              text=True, timeout=20, check=check, env=clean_env())

    def screen():
        return tmux("capture-pane", "-p", "-t", "t").stdout

    argv = " ".join("'%s'" % a for a in attach_argv(tether_bin, relay.url, tokens.user_file()))
    tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "90", "-y", "30",
         "%s; echo rc=$?; sleep 60" % argv)
    try:
        conn = relay.wait_conn(0)
        assert (conn.rows, conn.cols) == (30, 90), conn.query
        wait_until(lambda: "fake-pty$" in screen(), timeout=10, what="the greeting in tmux")
        tmux("send-keys", "-t", "t", "-l", "hello from tmux")
        tmux("send-keys", "-t", "t", "C-c")
        conn.wait_input(b"hello from tmux\x03")
        wait_until(lambda: "hello from tmux" in screen(), timeout=10, what="the echo in tmux")
        tmux("resize-window", "-t", "t", "-x", "100", "-y", "35")
        conn.wait_resize(35, 100)
        tmux("send-keys", "-t", "t", "Enter", "~", ".")
        wait_until(lambda: "rc=0" in screen(), timeout=10, what="tether to exit 0 in tmux")
        assert "detached" in screen()
    finally:
        tmux("kill-server", check=False)


# ---------------------------------------------------------------------------------------
# 4. end to end: the real relay and agent


@pytest.fixture
def real(harness, relay, agent):
    """The real relay (with its /pty route) and agent for workspace alpha."""
    return relay


def run_marked(child, line, n):
    """Types a command line that prints a marker the echo does not contain."""
    child.send(("%s; echo '<<'%d'>>'\r" % (line, n)).encode())
    child.expect(b"<<%d>>" % n, timeout=20)
    return child.before


def test_end_to_end_shell_detach_reattach_exit(real, children, tether_bin, tokens):
    child = spawn_attach(children, tether_bin, real.url, tokens, rows=30, cols=100)
    the_id = attached(child)
    child.send(b"PS1='tp> '; unset PROMPT_COMMAND\r")
    run_marked(child, "echo sum-$((40+2))", 1)
    assert b"sum-42" in child.before
    out = run_marked(child, "stty size", 2)
    assert b"30 100" in out, out
    child.setwinsize(40, 120)
    time.sleep(0.5)
    out = run_marked(child, "stty size", 3)
    assert b"40 120" in out, out
    child.send(b"\r~.")
    code, out = finish(child)
    assert code == 0 and the_id.encode() in out, out

    # attach again: the replay shows what the session printed
    child = spawn_attach(children, tether_bin, real.url, tokens, "--id", the_id)
    assert attached(child) == the_id
    child.expect(b"sum-42")
    run_marked(child, "echo again-$((6*7))", 4)
    assert b"again-42" in child.before
    child.send(b"exit 7\r")
    code, out = finish(child)
    assert code == 7, out


def test_end_to_end_command_and_bytes(real, children, tether_bin, tokens):
    """A command instead of the shell; raw bytes (Ctrl-C included) reach it unchanged."""
    child = spawn_attach(children, tether_bin, real.url, tokens, "--",
                         "stty raw -echo; od -An -tx1 -w8 -v; echo")
    attached(child)
    time.sleep(1)
    child.send(b"\x03\x1a\xc3\xa9\xff~\x04\x04")
    child.expect(rb"03 1a c3 a9 ff 7e 04 04", timeout=20)
