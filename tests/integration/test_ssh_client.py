"""The SSH client tools: `tether ssh-proxy` (stdin/stdout <-> /api/v1/workspaces/NAME/ssh)
and `tether config-ssh` (a managed block of `Host tether.NAME` entries in an ssh config).

ssh-proxy's byte path is driven against a scripted agent (FakeSshAgent: a Python peer that
connects to the relay as workspace alpha and answers OPEN ssh as each test says), so it is
tested whether or not the real agent serves SSH yet. The end-to-end test with OpenSSH and
the real agent runs once the agent answers OPEN ssh (see agent_refuses_ssh).
"""
import asyncio
import hashlib
import os
import random
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import websockets
import websockets.exceptions

import tetherproto as tp
from conftest import ONLY_A, WORKSPACES, free_port, write_private
from wspeer import Peer, PeerClosed

MiB = 1024 * 1024
START = "# ------------ START-TETHER ------------"
END = "# ------------ END-TETHER ------------"


# ---------------------------------------------------------------------------------------
# helpers


def one_error_line(stderr, code, rc):
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    assert rc == code, "exit %r, wanted %d; stderr=%r" % (rc, code, text)
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1, "wanted exactly one line on stderr, got %r" % text
    assert lines[0].startswith("tether: "), lines[0]
    return lines[0]


def proxy_args(harness, relay, workspace, token_file=None, url=None):
    return [harness.bin, "ssh-proxy", "--url", url or relay.url, "--token-file",
            str(token_file or harness.tokens.user_file()), workspace]


def run_proxy(harness, relay, workspace, data=b"", timeout=30, **kw):
    """Runs ssh-proxy with pipes on stdin and stdout, feeding data then EOF."""
    return subprocess.run(proxy_args(harness, relay, workspace, **kw), input=data,
                          capture_output=True, timeout=timeout)


class FakeSshAgent:
    """A scripted agent for a workspace, in a thread of its own. It answers OPEN ssh by mode:

    echo       OPEN_OK; echoes every byte; after the client's FIN sends b"BYE <n>" and FIN
    refuse     OPEN_FAIL UNSUPPORTED (an agent without an SSH server)
    banner_fin OPEN_OK, a banner and FIN at once; then reads until the client's FIN
    reset      OPEN_OK; RST INTERNAL "boom" at the first byte from the client

    It keeps to the credit the relay grants and grants the relay credit as it consumes.
    """

    OUR_WINDOW = tp.MAX_WINDOW

    def __init__(self, relay, tokens, mode, workspace="alpha"):
        self.relay, self.tokens, self.mode, self.workspace = relay, tokens, mode, workspace
        self.opens = []          # (stream, kind, body) of every OPEN received
        self.client_fin = threading.Event()
        self.error = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(20), "fake agent did not connect: %r" % (self.error,)
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "fake agent did not stop"

    def _run(self):
        try:
            asyncio.run(self._main())
        except Exception as e:  # noqa: BLE001 - reported by __enter__ / the test
            self.error = e
            self._ready.set()

    async def _main(self):
        ws = await websockets.connect(
            self.relay.url + "/api/v1/agent", subprotocols=[tp.SUBPROTOCOL],
            extra_headers={"Authorization": "Bearer " + self.tokens.agent[self.workspace]},
            max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)
        peer = Peer(ws)
        await peer.send(tp.hello_frame(initial_window=self.OUR_WINDOW),
                        tp.agent_hello_control())
        await peer.until(lambda f: f.type == tp.HELLO, what="the relay's HELLO")
        await peer.until(lambda f: f.type == tp.CONTROL and f.control().get("type") ==
                         "manifest", what="manifest")
        limits = peer.peer_hello
        self.streams = {}
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    frames = await peer.recv_message(0.1)
                except asyncio.TimeoutError:
                    continue
                for f in frames:
                    await self._frame(peer, f, limits)
                for sid in list(self.streams):
                    await self._flush(peer, sid, limits)
        except PeerClosed:
            pass
        finally:
            await ws.close()

    async def _frame(self, peer, f, limits):
        if f.type == tp.OPEN:
            kind = f.payload[0]
            self.opens.append((f.stream, kind, f.payload[4:]))
            if kind != tp.KIND_SSH or self.mode == "refuse":
                await peer.send(tp.frame(tp.OPEN_FAIL, f.stream, tp.encode_reason(
                    tp.CODE_UNSUPPORTED, "stream kind not served")))
                return
            st = self.streams[f.stream] = {"out": bytearray(), "sent": 0,
                                           "limit": limits["initial_window"], "recv": 0,
                                           "fin_in": False, "fin_out": False}
            await peer.send(tp.frame(tp.OPEN_OK, f.stream))
            if self.mode == "banner_fin":
                st["out"] += b"SSH-2.0-fake-banner\r\n"
                st["fin_out_due"] = True
        elif f.type == tp.DATA and f.stream in self.streams:
            st = self.streams[f.stream]
            if self.mode == "reset" and f.payload:
                del self.streams[f.stream]
                await peer.send(tp.rst_frame(f.stream, tp.CODE_INTERNAL, "boom"))
                return
            st["recv"] += len(f.payload)
            if self.mode == "echo":
                st["out"] += f.payload
            if f.payload:
                await peer.send(tp.credit_frame(f.stream, st["recv"] + self.OUR_WINDOW))
            if f.fin:
                st["fin_in"] = True
                self.client_fin.set()
                if self.mode == "echo":
                    st["out"] += b"BYE %d" % st["recv"]
                    st["fin_out_due"] = True
        elif f.type == tp.CREDIT and f.stream in self.streams:
            st = self.streams[f.stream]
            st["limit"] = max(st["limit"], f.credit())
        elif f.type == tp.RST:
            self.streams.pop(f.stream, None)

    async def _flush(self, peer, sid, limits):
        st = self.streams[sid]
        frames = []
        while st["out"] and st["sent"] < st["limit"]:
            n = min(len(st["out"]), st["limit"] - st["sent"], limits["max_frame_payload"])
            frames.append(tp.data_frame(sid, bytes(st["out"][:n])))
            del st["out"][:n]
            st["sent"] += n
        if not st["out"] and st.get("fin_out_due") and not st["fin_out"]:
            st["fin_out"] = True
            frames.append(tp.data_frame(sid, b"", fin=True))
        if frames:
            await peer.send(*frames)
        if st["fin_out"] and st["fin_in"]:
            del self.streams[sid]


@pytest.fixture
def fake_agent(relay, tokens):
    """fake_agent(mode) -> a running FakeSshAgent for alpha (stopped at the end)."""
    started = []

    def start(mode):
        a = FakeSshAgent(relay, tokens, mode)
        a.__enter__()
        started.append(a)
        return a
    yield start
    for a in started:
        a.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------
# ssh-proxy: usage and refusals


@pytest.mark.parametrize("args", [
    [],                                   # no workspace
    ["alpha", "beta"],                    # two
    ["not a name"],
    ["--no-such-option", "alpha"],
    ["--url"],
])
def test_proxy_usage_exit_2(harness, args):
    r = subprocess.run([harness.bin, "ssh-proxy", "--url", "ws://127.0.0.1:9", "--token-file",
                        str(harness.tokens.user_file())] + args, stdin=subprocess.PIPE,
                       capture_output=True, timeout=20)
    assert r.returncode == 2, r
    assert r.stdout == b""
    assert r.stderr.decode().splitlines()[0].startswith("tether: ")


def test_proxy_help(harness):
    r = harness.run("ssh-proxy", "--help")
    assert r.returncode == 0 and "usage: tether ssh-proxy" in r.stdout


def test_proxy_refuses_a_terminal(harness):
    """Run by hand from a shell, it says what it is for instead of speaking SSH to a tty."""
    master, slave = os.openpty()
    try:
        r = subprocess.run(proxy_args(harness, None, "alpha", url="ws://127.0.0.1:9"),
                           stdin=slave, stdout=slave, stderr=subprocess.PIPE, timeout=20)
    finally:
        os.close(slave)
        os.close(master)
    line = one_error_line(r.stderr, 2, r.returncode)
    assert "terminal" in line and "ProxyCommand" in line


def test_proxy_refuses_a_file_on_stdin(harness, tmp_path):
    f = tmp_path / "in.bin"
    f.write_bytes(b"SSH-2.0-x\r\n")
    with open(f, "rb") as fin:
        r = subprocess.run(proxy_args(harness, None, "alpha", url="ws://127.0.0.1:9"),
                           stdin=fin, capture_output=True, timeout=20)
    line = one_error_line(r.stderr, 2, r.returncode)
    assert "stdin is a file" in line
    assert r.stdout == b""


def test_proxy_bad_token(harness, relay, agent):
    r = run_proxy(harness, relay, "alpha", token_file=harness.tokens.bogus_file())
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "401" in line and "token" in line
    assert harness.tokens.bogus_file().read_text().strip() not in r.stderr.decode()
    assert r.stdout == b""


def test_proxy_unknown_workspace(harness, relay):
    r = run_proxy(harness, relay, "nosuchws")
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "404" in line and "nosuchws" in line
    assert r.stdout == b""


def test_proxy_workspace_not_allowed_is_404(harness, relay, agent):
    harness.agent(relay, "beta")
    r = run_proxy(harness, relay, "beta", token_file=harness.tokens.user_file(ONLY_A))
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "404" in line


def test_proxy_offline_workspace(harness, relay):
    r = run_proxy(harness, relay, "gamma")
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "gamma" in line and "offline" in line
    assert r.stdout == b""


def test_proxy_relay_unreachable(harness):
    r = run_proxy(harness, None, "alpha", url="ws://127.0.0.1:%d" % free_port())
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "relay" in line


def test_proxy_agent_without_ssh_4007(harness, relay, fake_agent):
    """An agent that serves no SSH answers OPEN_FAIL UNSUPPORTED; the relay closes 4007 and
    the proxy says so in one line."""
    a = fake_agent("refuse")
    r = run_proxy(harness, relay, "alpha", data=b"SSH-2.0-OpenSSH_9.2\r\n")
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "alpha" in line and "serves no SSH" in line, line
    assert r.stdout == b""
    assert [(k, body) for _, k, body in a.opens] == [(tp.KIND_SSH, b"")]


def test_proxy_stream_reset(harness, relay, fake_agent):
    """The agent resets the stream: exit 1, the reason in one line, stdout closed."""
    fake_agent("reset")
    r = run_proxy(harness, relay, "alpha", data=b"hello")
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "boom" in line


# ---------------------------------------------------------------------------------------
# ssh-proxy: the byte path


def test_proxy_stdin_eof_is_half_close(harness, relay, fake_agent):
    """Bytes then EOF on stdin: the agent sees them and a FIN, and what it sends after the
    FIN still arrives; then stdout closes and the exit status is 0. Nothing else on stdout."""
    a = fake_agent("echo")
    data = random.Random(3).randbytes(300 * 1024 + 11)
    r = run_proxy(harness, relay, "alpha", data=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data + b"BYE %d" % len(data)
    assert r.stderr == b""  # warn level by default: a good session prints nothing
    assert a.client_fin.is_set()


def test_proxy_empty_input(harness, relay, fake_agent):
    fake_agent("echo")
    r = run_proxy(harness, relay, "alpha", data=b"")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"BYE 0"


def test_proxy_bulk_both_ways_sha256(harness, relay, fake_agent):
    """16 MiB through pipes and back while the reader is slower than the writer at times:
    every byte arrives, in order."""
    fake_agent("echo")
    total = 16 * MiB
    data = random.Random(9).randbytes(total)
    p = subprocess.Popen(proxy_args(harness, relay, "alpha"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h = hashlib.sha256()
    got = {"n": 0}

    def reader():
        while True:
            b = p.stdout.read1(256 * 1024)
            if not b:
                return
            h.update(b)
            got["n"] += len(b)
            if got["n"] < 4 * MiB:
                time.sleep(0.002)  # a slow consumer at first: backpressure through the pipe

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for i in range(0, total, MiB):
            p.stdin.write(data[i:i + MiB])
        p.stdin.close()
        t.join(120)
        assert not t.is_alive(), "stdout did not end"
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    err = p.stderr.read()
    assert rc == 0, err
    want = hashlib.sha256(data + b"BYE %d" % total).hexdigest()
    assert got["n"] == total + len(b"BYE %d" % total)
    assert h.hexdigest() == want


def test_proxy_on_a_socketpair(harness, relay, fake_agent):
    """OpenSSH may give the command one socket as stdin and stdout: half close works on it
    (shutdown, since closing fd 1 alone would not end the socket)."""
    fake_agent("echo")
    ours, theirs = socket.socketpair()
    p = subprocess.Popen(proxy_args(harness, relay, "alpha"), stdin=theirs, stdout=theirs,
                         stderr=subprocess.PIPE)
    theirs.close()
    try:
        ours.settimeout(30)
        ours.sendall(b"ping over a socketpair")
        ours.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = ours.recv(65536)
            if not b:
                break
            got += b
        rc = p.wait(30)
    finally:
        ours.close()
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert rc == 0, p.stderr.read()
    assert got == b"ping over a socketpair" + b"BYE 22"


def test_proxy_relay_end_closes_stdout(harness, relay, fake_agent):
    """The agent ends its side first: stdout reaches EOF while stdin is still open; once stdin
    ends too, the proxy exits 0."""
    fake_agent("banner_fin")
    p = subprocess.Popen(proxy_args(harness, relay, "alpha"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = {}

        def reader():
            out["data"] = p.stdout.read()   # until EOF

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), "stdout was not closed after the agent's end of stream"
        assert out["data"] == b"SSH-2.0-fake-banner\r\n"
        assert p.poll() is None, "the proxy exited before its stdin ended"
        p.stdin.write(b"SSH-2.0-client\r\n")
        p.stdin.close()
        rc = p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert rc == 0, p.stderr.read()


def test_proxy_killed_reader_cancels_stream(harness, relay, fake_agent):
    """ssh goes away (its ends of the pipes close): the proxy ends, the relay forgets the
    stream, and the next connection works."""
    fake_agent("echo")
    p = subprocess.Popen(proxy_args(harness, relay, "alpha"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    guard = threading.Timer(60, p.kill)  # blocking reads below: bounded all the same
    guard.start()
    p.stdin.write(b"x" * 1000)
    p.stdin.flush()
    assert p.stdout.read(1000) == b"x" * 1000
    p.stdout.close()   # the reader is gone: the next write to stdout fails (EPIPE)
    p.stdin.write(b"y" * 1000)
    p.stdin.flush()
    try:
        rc = p.wait(20)
    finally:
        guard.cancel()
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert rc == 1, p.stderr.read()
    r = run_proxy(harness, relay, "alpha", data=b"again")
    assert r.returncode == 0 and r.stdout == b"againBYE 5", r.stderr


# ---------------------------------------------------------------------------------------
# config-ssh


def config_ssh(harness, relay, *args, token_file=None, env=None):
    base = ["config-ssh", "--url", relay.url, "--token-file",
            str(token_file or harness.tokens.user_file())]
    return harness.run(*(base + [str(a) for a in args]), env=env)


def block_of(text):
    i = text.index(START)
    j = text.index(END) + len(END)
    return text[i:j]


def hosts_in(text):
    return [l.split()[1] for l in block_of(text).splitlines() if l.startswith("Host ")]


def proxy_commands(text):
    return [l.strip()[len("ProxyCommand "):] for l in block_of(text).splitlines()
            if l.strip().startswith("ProxyCommand ")]


def test_config_ssh_usage(harness):
    r = harness.run("config-ssh", "--url", "ws://127.0.0.1:9", "--token-file", "/dev/null",
                    "extra")
    assert r.returncode == 2 and r.stderr.startswith("tether: ") and r.stdout == ""
    r = harness.run("config-ssh", "--help")
    assert r.returncode == 0 and "usage: tether config-ssh" in r.stdout


def test_config_ssh_refuses_token_from_environment(harness, relay, tmp_path):
    env = dict(os.environ, TETHER_TOKEN=harness.tokens.user_token())
    env.pop("TETHER_TOKEN_FILE", None)
    cfg = tmp_path / "config"
    r = harness.run("config-ssh", "--url", relay.url, "--ssh-config", cfg, env=env)
    line = one_error_line(r.stderr, 2, r.returncode)
    assert "--token-file" in line
    assert harness.tokens.user_token() not in r.stderr
    assert not cfg.exists()


def test_config_ssh_bad_token(harness, relay, tmp_path):
    cfg = tmp_path / "config"
    r = config_ssh(harness, relay, "--ssh-config", cfg, token_file=harness.tokens.bogus_file())
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "401" in line
    assert not cfg.exists()


def test_config_ssh_writes_one_entry_per_workspace(harness, relay, tether_bin, tmp_path):
    """A new file: mode 0600, one Host per workspace the token may reach (here "*"), each with
    the absolute paths of this binary and of the token file."""
    cfg = tmp_path / "config"
    rel_token = os.path.relpath(harness.tokens.user_file(), os.getcwd())
    r = config_ssh(harness, relay, "--ssh-config", cfg, token_file=rel_token)
    assert r.returncode == 0, r.stderr
    text = cfg.read_text()
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert hosts_in(text) == ["tether.%s" % w for w in WORKSPACES]
    for ws, cmd in zip(WORKSPACES, proxy_commands(text)):
        assert cmd == "%s ssh-proxy --url %s --token-file %s %s" % (
            tether_bin, relay.url, harness.tokens.user_file(), ws)
    options = [l.strip() for l in text.splitlines() if l.startswith("    ")]
    for opt in ("StrictHostKeyChecking no", "UserKnownHostsFile /dev/null", "LogLevel ERROR",
                "ServerAliveInterval 30"):
        assert options.count(opt) == len(WORKSPACES), opt
    for ws in WORKSPACES:
        assert "added     tether.%s" % ws in r.stdout
    assert text.startswith(START + "\n") and text.endswith(END + "\n")


def test_config_ssh_carries_tls_options(harness, relay, tmp_path):
    """--ca-file (made absolute, "." and ".." resolved) and --insecure reach ssh-proxy."""
    (tmp_path / "pki").mkdir()
    ca = tmp_path / "pki" / "ca.pem"
    ca.write_text("not read by config-ssh over ws://\n")
    cfg = tmp_path / "config"
    r = subprocess.run([harness.bin, "config-ssh", "--url", relay.url, "--token-file",
                        str(harness.tokens.user_file()), "--ssh-config", str(cfg), "--ca-file",
                        "./pki/../pki/ca.pem", "--insecure"], cwd=str(tmp_path),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for cmd in proxy_commands(cfg.read_text()):
        assert " --ca-file %s --insecure " % ca in cmd, cmd


def test_config_ssh_entries_follow_the_token(harness, relay, tmp_path):
    cfg = tmp_path / "config"
    r = config_ssh(harness, relay, "--ssh-config", cfg)
    assert r.returncode == 0, r.stderr
    r = config_ssh(harness, relay, "--ssh-config", cfg,
                   token_file=harness.tokens.user_file(ONLY_A))
    assert r.returncode == 0, r.stderr
    assert hosts_in(cfg.read_text()) == ["tether.alpha"]
    assert "removed   tether.beta" in r.stdout and "removed   tether.gamma" in r.stdout
    assert "updated   tether.alpha" in r.stdout  # its token file changed
    assert cfg.read_text().count(START) == 1


def test_config_ssh_twice_identical(harness, relay, tmp_path):
    cfg = tmp_path / "config"
    original = "Host *\n    ServerAliveCountMax 5\n\nHost work\n    HostName 10.0.0.1\n"
    cfg.write_text(original)
    os.chmod(cfg, 0o644)
    assert config_ssh(harness, relay, "--ssh-config", cfg).returncode == 0
    first = cfg.read_bytes()
    st1 = cfg.stat()
    r = config_ssh(harness, relay, "--ssh-config", cfg)
    assert r.returncode == 0, r.stderr
    assert cfg.read_bytes() == first
    assert cfg.stat().st_ino == st1.st_ino, "an unchanged file is not rewritten"
    assert "up to date" in r.stdout and "unchanged tether.alpha" in r.stdout
    assert first.decode().count(START) == 1
    assert first.decode().startswith(original)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o644


@pytest.mark.parametrize("original", [
    "Host work\n    User me\n",
    "Host work\n    User me",               # no newline at the end
    "",
    "\n\n# just comments\r\n# crlf above\n",
])
def test_config_ssh_keeps_the_rest_and_remove_restores(harness, relay, tmp_path, original):
    cfg = tmp_path / "config"
    cfg.write_bytes(original.encode())
    os.chmod(cfg, 0o640)
    r = config_ssh(harness, relay, "--ssh-config", cfg)
    assert r.returncode == 0, r.stderr
    text = cfg.read_bytes().decode()
    # the block follows the original bytes; a missing last newline is added before it
    want_head = original if original == "" or original.endswith("\n") else original + "\n"
    assert text[:text.index(START)] == want_head
    assert text.count(START) == 1 and text.count(END) == 1
    assert config_ssh(harness, relay, "--ssh-config", cfg).returncode == 0
    assert cfg.read_bytes().decode() == text
    r = harness.run("config-ssh", "--ssh-config", cfg, "--remove")
    assert r.returncode == 0, r.stderr
    assert cfg.read_bytes() == original.encode(), "--remove did not restore the file"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640
    for ws in WORKSPACES:
        assert "removed   tether.%s" % ws in r.stdout


def test_config_ssh_replaces_the_block_in_place(harness, relay, tmp_path):
    cfg = tmp_path / "config"
    before = "Host a\n    User x\n"
    after = "\nHost b\n    User y\n"
    cfg.write_text(before + START + "\nHost tether.old\n    User z\n" + END + "\n" + after)
    r = config_ssh(harness, relay, "--ssh-config", cfg, token_file=harness.tokens.user_file(
        ONLY_A))
    assert r.returncode == 0, r.stderr
    text = cfg.read_text()
    assert text.startswith(before + START) and text.endswith(END + "\n" + after)
    assert hosts_in(text) == ["tether.alpha"]
    assert "removed   tether.old" in r.stdout
    assert harness.run("config-ssh", "--ssh-config", cfg, "--remove").returncode == 0
    assert cfg.read_text() == before + after


def test_config_ssh_unpaired_markers_refused(harness, relay, tmp_path):
    cfg = tmp_path / "config"
    for bad in (START + "\nHost x\n", "Host x\n" + END + "\n", START + "\n" + END + "\n" +
                START + "\n" + END + "\n"):
        cfg.write_text(bad)
        r = config_ssh(harness, relay, "--ssh-config", cfg)
        one_error_line(r.stderr, 1, r.returncode)
        assert cfg.read_text() == bad


def test_config_ssh_creates_missing_directory(harness, relay, tmp_path):
    cfg = tmp_path / "home" / ".ssh" / "config"
    (tmp_path / "home").mkdir()
    r = config_ssh(harness, relay, "--ssh-config", cfg)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(cfg.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert [p.name for p in cfg.parent.iterdir()] == ["config"], "a temporary file was left"


def test_config_ssh_remove_without_block_or_file(harness, tmp_path):
    cfg = tmp_path / "config"
    r = harness.run("config-ssh", "--ssh-config", cfg, "--remove")
    assert r.returncode == 0 and "nothing to remove" in r.stdout, r.stderr
    assert not cfg.exists()
    cfg.write_text("Host a\n")
    r = harness.run("config-ssh", "--ssh-config", cfg, "--remove")
    assert r.returncode == 0 and cfg.read_text() == "Host a\n"


def test_config_ssh_writes_through_a_symlink(harness, relay, tmp_path):
    """A symlinked config (dotfile managers) is updated at its target; the link stays."""
    (tmp_path / "dotfiles").mkdir()
    target = tmp_path / "dotfiles" / "ssh_config"
    target.write_text("Host a\n")
    os.chmod(target, 0o600)
    (tmp_path / "ssh").mkdir()
    link = tmp_path / "ssh" / "config"
    link.symlink_to(target)
    r = config_ssh(harness, relay, "--ssh-config", link)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("Host a\n" + START)
    dangling = tmp_path / "ssh" / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "config")
    r = config_ssh(harness, relay, "--ssh-config", dangling)
    line = one_error_line(r.stderr, 1, r.returncode)
    assert "symlink" in line
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_config_ssh_is_what_openssh_reads(harness, relay, tmp_path):
    """ssh -G resolves our entries (paths with spaces quoted) to the intended options."""
    d = tmp_path / "dir with space"
    d.mkdir()
    tok = write_private(d / "user.token", harness.tokens.user_token() + "\n")
    cfg = tmp_path / "config"
    assert config_ssh(harness, relay, "--ssh-config", cfg, token_file=tok).returncode == 0
    r = subprocess.run(["ssh", "-G", "-F", str(cfg), "tether.alpha"], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    opts = dict(l.split(" ", 1) for l in r.stdout.splitlines() if " " in l)
    assert "'%s'" % tok in opts["proxycommand"]
    assert opts["stricthostkeychecking"] == "false"
    assert opts["userknownhostsfile"] == "/dev/null"
    assert opts["loglevel"] == "ERROR"


def test_ssh_runs_the_proxy_command(harness, relay, fake_agent, tmp_path):
    """OpenSSH runs the generated ProxyCommand (token path with a space) and shows the
    proxy's one line when the agent serves no SSH."""
    fake_agent("refuse")
    d = tmp_path / "dir with space"
    d.mkdir()
    tok = write_private(d / "user.token", harness.tokens.user_token() + "\n")
    cfg = tmp_path / "config"
    assert config_ssh(harness, relay, "--ssh-config", cfg, token_file=tok).returncode == 0
    r = subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", "tether.alpha", "true"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert "tether: workspace alpha serves no SSH" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------
# end to end with OpenSSH and the real agent


def agent_env(tmp):
    """The agent's environment: its state (an SSH host key) under tmp, not in the home."""
    return dict(os.environ, XDG_STATE_HOME=str(Path(tmp) / "state"))


def test_ssh_end_to_end(harness, relay, tmp_path):
    harness.agent(relay, "alpha", env=agent_env(tmp_path))
    cfg = tmp_path / "config"
    r = config_ssh(harness, relay, "--ssh-config", cfg)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", "tether.alpha",
                        "echo", "hi"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hi\n"
