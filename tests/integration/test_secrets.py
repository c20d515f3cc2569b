"""Tokens stay secret (DESIGN.md "Security"; issue 6, item 6).

- No token (agent, user or refused) in the stderr or stdout of the relay, the agent or the
  clients, at --log-level debug, nor in the relay's /logs of any workspace.
- No token on the command line of a running agent, relay, forward, ssh-proxy or attach
  (/proc/PID/cmdline, what `ps` shows), nor in the environment `ps e` shows
  (/proc/PID/environ) of one given TETHER_TOKEN.
- Nothing the agent starts (SSH and PTY sessions, start and stop scripts, the manifest's
  scripts and metadata, devcontainer.json's postStartCommand and remoteEnv) sees
  TETHER_TOKEN or the token.
- A token file that group or others may read is refused by every command. test_cli.py has
  agent, status and forward with mode 0644 (and status with 0640 through
  TETHER_TOKEN_FILE), and the relay's tokens file with 0644 and 0640; this file adds the
  other clients, the group-only and others-only modes, TETHER_TOKEN_FILE for the agent, a
  symlink, and the relay's 0604.
- --insecure warns on every start, whatever --log-level says (test_tls.py has one start of
  the agent and of status).
"""
import json
import os
import signal
import subprocess
import time

import pexpect
import pytest

from conftest import (ADMIN, ONLY_A, WORKSPACES, echo_roundtrip, env_lines, wait_until,
                      write_private)
from lifecyclelib import Workspace, write_manifest
from test_tls import pki, tls_relay  # noqa: F401  (fixtures)
from test_web import cookie_of, login, request

A = WORKSPACES[0]
WARNING = "tether: WARNING: --insecure"


# ---------------------------------------------------------------------------------------
# helpers


def secrets_of(tokens, *extra):
    """Every token the test knows: agents', users', the refused one, and extra ones."""
    out = list(tokens.agent.values()) + [t for t, _ in tokens.user.values()]
    out.append(tokens.bogus_file().read_text().strip())
    return out + [e for e in extra if e]


def leaks(text, secrets):
    """The secrets text holds, whole or by their random part (the last 32 hex digits)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [s for s in secrets if s in text or s[-32:] in text]


def clean_env(**extra):
    """This process's environment without TETHER_* (a developer's own would interfere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.setdefault("TERM", "xterm")
    env.update(extra)
    return env


def read_proc(pid, what):
    with open("/proc/%d/%s" % (pid, what), "rb") as f:
        return f.read().replace(b"\0", b"\n")


class ClientSet:
    """Long-running clients of one relay, each a process whose /proc can be read."""

    def __init__(self, harness, relay, tmp):
        self.h = harness
        self.relay = relay
        self.tmp = tmp
        self.pids = {}      # name -> pid
        self.popens = []
        self.children = []  # pexpect

    def argv_token(self, mode, user=ADMIN):
        """(extra argv, env) giving the user's token by file or by TETHER_TOKEN."""
        if mode == "file":
            return ["--token-file", str(self.h.tokens.user_file(user))], clean_env()
        return [], clean_env(TETHER_TOKEN=self.h.tokens.user_token(user))

    def forward(self, mode, ws, port):
        args, env = self.argv_token(mode)
        p = self.h.procs.start("forward-" + mode, [self.h.bin, "forward", "--url", self.relay.url]
                               + args + [ws, "0:%d" % port], env=env)
        wait_until(lambda: "forwarding" in p.stdout() or not p.alive(), timeout=15,
                   what="forward (%s) to listen" % mode)
        assert p.alive(), p.describe()
        self.pids["forward/" + mode] = p.pid

    def ssh_proxy(self, mode, ws):
        args, env = self.argv_token(mode)
        err = open(self.tmp / ("ssh-proxy-%s.stderr" % mode), "wb")
        p = subprocess.Popen([self.h.bin, "ssh-proxy", "--url", self.relay.url] + args + [ws],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             env=env, start_new_session=True)
        self.popens.append((p, err))
        # the agent's SSH server speaks first: its banner shows the proxy is through
        line = p.stdout.readline()
        assert line.startswith(b"SSH-2.0-"), line
        self.pids["ssh-proxy/" + mode] = p.pid

    def attach(self, mode, ws):
        args, env = self.argv_token(mode)
        child = pexpect.spawn(self.h.bin, ["attach", "--url", self.relay.url] + args +
                              [ws, "--", "cat"], env=env, timeout=20, dimensions=(24, 80))
        self.children.append(child)
        child.expect(rb"tether: attached to ")
        self.pids["attach/" + mode] = child.pid

    def close(self):
        for p, err in self.popens:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            err.close()
        for c in self.children:
            if c.isalive():
                c.terminate(force=True)
            c.close(force=True)


@pytest.fixture
def clients(harness, relay, tmp_path):
    cs = ClientSet(harness, relay, tmp_path)
    yield cs
    cs.close()


# ---------------------------------------------------------------------------------------
# logs


def test_no_token_in_any_log(harness, tmp_path, servers):
    """Everything that handles a token, at --log-level debug: agents by file and by
    TETHER_TOKEN, an agent whose token is refused, forward, ssh-proxy (also refused),
    status (refused), PTYs by bearer and by cookie, web logins good and bad, the JSON API
    with an agent's token. Then the stderr and stdout of every process and the relay's /logs
    of every workspace hold no token."""
    h, tokens = harness, harness.tokens
    relay = h.relay(extra=["--log-level", "debug"])
    ws = Workspace(h, tmp_path / "a", relay=relay)
    ws.start_agent(extra=["--log-level", "debug", "--startup-script", "echo started-up"])
    beta = h.procs.start("agent-beta-env", [
        h.bin, "agent", "--url", relay.url, "--log-level", "debug",
        "--state-dir", str(tmp_path / "state-beta")],
        env=clean_env(TETHER_TOKEN=tokens.agent["beta"]))
    bogus = tokens.bogus_file().read_text().strip()
    refused = h.procs.start("agent-gamma-refused", [
        h.bin, "agent", "--url", relay.url, "--log-level", "debug",
        "--state-dir", str(tmp_path / "state-gamma")], env=clean_env(TETHER_TOKEN=bogus))
    wait_until(lambda: relay.connected("beta"), timeout=20, what="beta (TETHER_TOKEN) to connect")
    wait_until(lambda: "401" in refused.stderr(), timeout=20, what="the refused agent's 401")

    echo = servers.echo()
    fwd = h.forward(relay, A, echo.port, extra=["--log-level", "debug"])
    echo_roundtrip(fwd.port, nbytes=4096)

    outputs = {}
    r = h.run("status", "--url", relay.url, "--token-file", tokens.bogus_file(),
              "--log-level", "debug")
    assert r.returncode == 1
    outputs["status (refused)"] = r.stdout + r.stderr

    # ssh through ssh-proxy at debug, with a good token and a refused one
    cfg = tmp_path / "ssh_config"
    for name, tf in [("good", tokens.user_file(ONLY_A)), ("bad", tokens.bogus_file())]:
        cfg.write_text("Host %s\n  ProxyCommand %s ssh-proxy --log-level debug --url %s "
                       "--token-file %s %s\n  StrictHostKeyChecking no\n  UserKnownHostsFile "
                       "/dev/null\n  LogLevel ERROR\n  BatchMode yes\n" % (
                           name, h.bin, relay.url, tf, A))
        r = subprocess.run(["ssh", "-F", str(cfg), name, "echo", "via-ssh"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert (r.returncode == 0) == (name == "good"), r
        outputs["ssh " + name] = r.stdout + r.stderr

    out, texts, code = ws.pty_run("echo via-pty")
    assert b"via-pty" in out and code == 1000, (out, texts, code)
    status, hdrs, _, body = login(relay, tokens.user_token(ONLY_A))
    assert status == 303
    outputs["login"] = body + json.dumps(
        {k: v for k, v in hdrs.items() if k != "set-cookie"}).encode()
    cookie = cookie_of(hdrs)
    outputs["page"] = request(relay, "GET", "/w/" + A, headers={"Cookie": cookie})[3]
    for tok in (bogus, tokens.agent[A], tokens.user_token(ONLY_A) + "x"):
        outputs["bad login"] = login(relay, tok)[3]
    for tok in (tokens.agent[A], bogus):
        outputs["api " + tok[:5]] = relay.api("/api/v1/workspaces", token=tok)[1]

    wait_until(lambda: "started-up" in ws.texts("startup"), timeout=20,
               what="the startup script's output in /logs")
    secrets = secrets_of(tokens)
    problems = []
    for p in h.procs.procs:
        for stream, text in (("stderr", p.stderr()), ("stdout", p.stdout())):
            for s in leaks(text, secrets):
                problems.append("%s %s holds %s..." % (p.name, stream, s[:12]))
    for name, text in outputs.items():
        for s in leaks(text, secrets):
            problems.append("%s holds %s..." % (name, s[:12]))
    for w in WORKSPACES:
        code, body = relay.api("/api/v1/workspaces/%s/logs" % w)
        assert code == 200, body
        assert w != A or b"started-up" in body
        for s in leaks(body, secrets):
            problems.append("/logs of %s holds %s..." % (w, s[:12]))
    assert not problems, "\n".join(problems)
    assert beta.alive() and refused.alive()


# ---------------------------------------------------------------------------------------
# ps: command lines and environments


def start_everything(harness, relay, clients, modes, servers):
    """An agent, forward, ssh-proxy and attach per token mode ("file": alpha, "env": beta)."""
    echo = servers.echo()
    pids = {"relay": relay.pid}
    wss = {"file": "alpha", "env": "beta"}
    for mode in modes:
        ws = wss[mode]
        if mode == "file":
            p = harness.agent(relay, ws, env=clean_env())
        else:
            p = harness.procs.start("agent-env", [
                harness.bin, "agent", "--url", relay.url, "--state-dir",
                str(harness.tokens.dir.parent / "state-env")],
                env=clean_env(TETHER_TOKEN=harness.tokens.agent[ws]))
            wait_until(lambda: relay.connected(ws), timeout=20, what="the TETHER_TOKEN agent")
        pids["agent/" + mode] = p.pid
    for mode in modes:
        clients.forward(mode, wss[mode], echo.port)
        clients.ssh_proxy(mode, wss[mode])
        clients.attach(mode, wss[mode])
    pids.update(clients.pids)
    return pids


def test_no_token_on_any_command_line(harness, relay, clients, servers):
    pids = start_everything(harness, relay, clients, ("file", "env"), servers)
    secrets = secrets_of(harness.tokens)
    problems = []
    for name, pid in pids.items():
        cmdline = read_proc(pid, "cmdline")
        assert cmdline.strip(), "%s (pid %d) is gone" % (name, pid)
        for s in leaks(cmdline, secrets):
            problems.append("%s: /proc/%d/cmdline holds %s..." % (name, pid, s[:12]))
    ps = subprocess.run(["ps", "-eo", "pid,args", "ww"], capture_output=True, timeout=20)
    for s in leaks(ps.stdout, secrets):
        problems.append("ps output holds %s..." % s[:12])
    assert not problems, "\n".join(problems)


def test_a_token_from_tether_token_is_not_in_the_environment_ps_shows(harness, relay, clients,
                                                                      servers):
    """README: the agent reads TETHER_TOKEN "(which it then removes from its environment)".
    unsetenv() takes it out of environ, so children do not inherit it (test below), but the
    kernel's copy of the process's initial environment, which /proc/PID/environ and
    `ps e` show to the same user (every process in the workspace) and root, keeps
    "TETHER_TOKEN=<token>" unless the value's bytes are overwritten. (The name may stay.)"""
    pids = start_everything(harness, relay, clients, ("env",), servers)
    secrets = secrets_of(harness.tokens)
    problems = []
    for name, pid in pids.items():
        environ = read_proc(pid, "environ")
        if leaks(environ, secrets):
            problems.append("%s (pid %d): /proc/%d/environ shows the token" % (name, pid, pid))
    assert not problems, ("\n".join(problems) + "\n(agent/cli.c cli_client_resolve: "
                          "getenv(\"TETHER_TOKEN\") is copied, then unsetenv() drops the "
                          "pointer but leaves the value's bytes in place: zero them first)")


# ---------------------------------------------------------------------------------------
# what the agent starts


class EnvTokenWorkspace(Workspace):
    """The agent for alpha with TETHER_TOKEN in its environment; with the token file too
    when use_file (the file wins and TETHER_TOKEN holds a decoy)."""

    use_file = False

    def agent_argv(self, extra=(), state_dir=None):
        argv = super().agent_argv(extra, state_dir)
        if not self.use_file:
            i = argv.index("--token-file")
            del argv[i:i + 2]
        return argv


@pytest.mark.parametrize("mode", ["env", "file-and-env"])
def test_nothing_the_agent_starts_sees_the_token(harness, tmp_path, mode):
    tokens = harness.tokens
    out = tmp_path / "env-out"
    out.mkdir()
    decoy = "decoy-token-%032x" % int.from_bytes(os.urandom(16), "big")
    token_in_env = tokens.agent[A] if mode == "env" else decoy
    manifest = write_manifest(tmp_path / "manifest.json", {A: {
        "scripts": [
            {"name": "start-env", "script": "env > %s/manifest-start" % out, "run_on": "start"},
            {"name": "stop-env", "script": "env > %s/manifest-stop" % out, "run_on": "stop"}],
        "metadata": [{"key": "env", "script": "env > %s/metadata; echo ok" % out,
                      "interval": 60}]}})
    ws = EnvTokenWorkspace(harness, tmp_path / "ws", relay_extra=["--manifest", manifest])
    ws.use_file = mode != "env"
    dc = ws.dir / ".devcontainer"
    dc.mkdir()
    (dc / "devcontainer.json").write_text(json.dumps({
        "postStartCommand": "env > %s/post-start" % out,
        "remoteEnv": {"LEAK_CONTAINER": "x${containerEnv:TETHER_TOKEN}x",
                      "LEAK_LOCAL": "x${localEnv:TETHER_TOKEN}x"}}))
    agent = ws.start_agent(extra=[
        "--directory", ws.dir,
        "--startup-script", "env > %s/startup" % out,
        "--shutdown-script", "env > %s/shutdown" % out],
        env=clean_env(TETHER_TOKEN=token_in_env))
    ws.wait_lifecycle("ready")
    wait_until(lambda: (out / "metadata").exists(), timeout=20, what="the metadata script")

    envs = {}
    r = ws.ssh("env")
    assert r.returncode == 0, r
    envs["ssh session"] = r.stdout
    r = ws.ssh("env", tty=True)
    envs["ssh pty session"] = r.stdout
    pty_out, _, code = ws.pty_run("env")
    envs["pty session"] = pty_out
    assert agent.terminate(timeout=30) == 0, agent.describe()
    for f in ("startup", "post-start", "manifest-start", "metadata", "shutdown",
              "manifest-stop"):
        path = out / f
        assert path.exists(), "%s did not run (agent stderr:\n%s)" % (f, agent.stderr()[-2000:])
        envs[f + " script"] = path.read_bytes()

    secrets = secrets_of(tokens, decoy)
    problems = []
    for name, text in envs.items():
        env = env_lines(text)
        assert "PATH" in env, "%s: no environment read: %r" % (name, text[:300])
        if "TETHER_TOKEN" in env:
            problems.append("%s has TETHER_TOKEN" % name)
        for s in leaks(text, secrets):
            problems.append("%s holds %s..." % (name, s[:12]))
        if name.startswith(("ssh", "pty")):
            assert env.get("LEAK_CONTAINER") == "xx" and env.get("LEAK_LOCAL") == "xx", (
                name, env.get("LEAK_CONTAINER"), env.get("LEAK_LOCAL"))
    assert not problems, "\n".join(problems)


def test_nothing_the_agent_starts_inherits_its_sockets_or_token_file(harness, tmp_path):
    """The descriptors a session or script starts with are its own stdio (and what its shell
    opens): not the agent's websocket to the relay, its SSH socketpairs, or a token file, any
    of which would let a workspace process act as the agent."""
    listing = "ls -l /proc/$$/fd"
    out = tmp_path / "fds"
    out.mkdir()
    ws = Workspace(harness, tmp_path / "ws")
    ws.start_agent(extra=["--startup-script", "%s > %s/startup" % (listing, out)])
    ws.wait_lifecycle("ready")
    seen = {"ssh": ws.ssh(listing).stdout, "ssh pty": ws.ssh(listing, tty=True).stdout,
            "pty": ws.pty_run(listing)[0], "startup script": (out / "startup").read_bytes()}
    problems = []
    for name, text in seen.items():
        text = text.decode("utf-8", "replace")
        assert "-> " in text, (name, text)
        for line in text.splitlines():
            target = line.split("-> ", 1)[1] if "-> " in line else ""
            if target.startswith("socket:") or target.endswith((".token", "tokens.json")):
                problems.append("%s: %s" % (name, line.strip()))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# token files that others may read


def run_client(harness, cmd, token_args, tmp_path, env=None):
    """Runs a client that reads a token file until it exits; returns (rc, output)."""
    url = ["--url", "ws://127.0.0.1:9"]
    env = env or clean_env()
    if cmd == "attach":
        child = pexpect.spawn(harness.bin, ["attach"] + url + token_args + [A], env=env,
                              timeout=20)
        child.expect(pexpect.EOF)
        child.close()
        return child.exitstatus, child.before.decode("utf-8", "replace")
    argv = [harness.bin, cmd] + url + token_args
    if cmd == "forward":
        argv += [A, "0:80"]
    elif cmd == "ssh-proxy":
        argv += [A]
    elif cmd == "config-ssh":
        argv += ["--ssh-config", str(tmp_path / "ssh_config")]
    # ssh-proxy refuses a stdin that is no pipe or socket before it reads its token
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env, input="")
    return r.returncode, r.stdout + r.stderr


CLIENTS = ["agent", "status", "forward", "ssh-proxy", "attach", "config-ssh"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o606], ids=oct)
@pytest.mark.parametrize("cmd", CLIENTS)
def test_every_client_refuses_a_token_file_others_may_read(harness, tmp_path, cmd, mode):
    secret = "secret-%032x" % int.from_bytes(os.urandom(16), "big")
    tok = write_private(tmp_path / "open.token", secret + "\n", mode=mode)
    rc, out = run_client(harness, cmd, ["--token-file", str(tok)], tmp_path)
    assert rc == 1, (rc, out)
    assert str(tok) in out and "chmod 600" in out, out
    assert secret not in out and secret[-32:] not in out
    assert not (tmp_path / "ssh_config").exists()


@pytest.mark.parametrize("cmd", CLIENTS)
def test_tether_token_file_from_the_environment_is_checked_too(harness, tmp_path, cmd):
    tok = write_private(tmp_path / "env.token", "secret-env\n", mode=0o604)
    rc, out = run_client(harness, cmd, [], tmp_path,
                         env=clean_env(TETHER_TOKEN_FILE=str(tok)))
    assert rc == 1 and str(tok) in out and "secret-env" not in out, (rc, out)


def test_a_symlink_to_an_open_token_file_is_refused(harness, tmp_path):
    target = write_private(tmp_path / "target.token", "secret-link\n", mode=0o644)
    link = tmp_path / "link.token"
    link.symlink_to(target)
    for cmd in ("agent", "status"):
        rc, out = run_client(harness, cmd, ["--token-file", str(link)], tmp_path)
        assert rc == 1 and "secret-link" not in out, (cmd, rc, out)


@pytest.mark.parametrize("mode", [0o604, 0o660, 0o606], ids=oct)
def test_the_relay_refuses_a_tokens_file_others_may_read(harness, mode):
    os.chmod(str(harness.tokens.path), mode)
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path)
    assert r.returncode == 1, r
    assert str(harness.tokens.path) in r.stderr
    assert not leaks(r.stdout + r.stderr, secrets_of(harness.tokens))


# ---------------------------------------------------------------------------------------
# --insecure


def test_insecure_warns_on_every_start_of_the_agent(harness, tls_relay, pki):
    """Each start of the agent with --insecure says so on stderr, once, even at
    --log-level error; a start without it does not."""
    _, port = tls_relay
    url = "wss://127.0.0.1:%d" % port

    def connected():
        r = harness.run("status", "--url", "wss://localhost:%d" % port, "--ca-file",
                        str(pki / "ca.pem"), "--token-file", harness.tokens.user_file(), A)
        return r.returncode == 0 and json.loads(r.stdout)["connected"] is True

    for run in range(3):
        agent = harness.agent(None, A, url=url, wait=False,
                              extra=["--insecure", "--log-level", "error"])
        wait_until(connected, timeout=20, what="the --insecure agent (start %d)" % run)
        err = agent.stderr()
        assert err.count(WARNING) == 1, "start %d: stderr %r" % (run, err)
        assert err.splitlines()[0].startswith(WARNING), err  # before anything else
        assert agent.terminate(timeout=20) == 0
        wait_until(lambda: not connected(), timeout=20, what="alpha to go offline")
    plain = harness.agent(None, A, url=url, wait=False, extra=["--ca-file", pki / "ca.pem"])
    time.sleep(1)
    assert WARNING not in plain.stderr()


def test_insecure_warns_in_every_client(harness, tls_relay, pki, tmp_path):
    _, port = tls_relay
    url = "wss://127.0.0.1:%d" % port
    tf = str(harness.tokens.user_file())
    agent = harness.agent(None, A, url=url, wait=False, extra=["--insecure"])
    wait_until(lambda: "connected to the relay" in agent.stderr(), timeout=20,
               what="the agent to connect")
    found = {}
    # forward: a long-running client
    fwd = harness.forward(None, A, 22, url=url, extra=["--insecure"])
    found["forward"] = fwd.proc.stderr()
    # ssh-proxy: the banner of the agent's SSH server comes through
    p = subprocess.Popen([harness.bin, "ssh-proxy", "--insecure", "--url", url, "--token-file",
                          tf, A], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=clean_env(), start_new_session=True)
    try:
        assert p.stdout.readline().startswith(b"SSH-2.0-")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        found["ssh-proxy"] = p.communicate(timeout=10)[1].decode()
    # attach, on a terminal
    child = pexpect.spawn(harness.bin, ["attach", "--insecure", "--url", url, "--token-file", tf,
                                        A, "--", "true"], env=clean_env(), timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    found["attach"] = child.before.decode("utf-8", "replace")
    # status and config-ssh, which also passes --insecure on to the ssh-proxy it configures
    r = harness.run("status", "--insecure", "--url", url, "--token-file", tf, env=clean_env())
    assert r.returncode == 0, r.stderr
    found["status"] = r.stderr
    cfg = tmp_path / "ssh_config"
    r = harness.run("config-ssh", "--insecure", "--url", url, "--token-file", tf,
                    "--ssh-config", cfg, env=clean_env())
    assert r.returncode == 0, r.stderr
    found["config-ssh"] = r.stderr
    assert "--insecure" in cfg.read_text()
    missing = [name for name, text in found.items() if WARNING not in text]
    assert not missing, "no --insecure warning from %s: %r" % (missing, found)


def _listening_inodes():
    """Inodes of the TCP sockets in LISTEN state (IPv4 and IPv6), from /proc/net/tcp*."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    return inodes


def _listening_sockets_of(pid):
    """How many listening TCP sockets process pid holds."""
    listening = _listening_inodes()
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            n += 1
    return n


def test_the_agent_opens_no_listening_socket_unless_asked(harness, relay, tmp_path):
    """An agent dials out and listens nowhere; with --ssh-listen it listens on that one
    port only (key-only SSH, tested in test_ssh_forward.py)."""
    agent = harness.agent(relay, "alpha", extra=["--startup-script", "true"])
    wait_until(lambda: relay.workspace("alpha")["lifecycle"] == "ready", timeout=20,
               what="the agent to be ready")
    assert _listening_sockets_of(agent.pid) == 0
    agent.terminate()
    from conftest import free_port
    port = free_port()
    keys = tmp_path / "authorized_keys"
    write_private(keys, "")
    agent = harness.agent(relay, "alpha", extra=["--ssh-listen", "127.0.0.1:%d" % port,
                                                  "--authorized-keys", str(keys)])
    wait_until(lambda: _listening_sockets_of(agent.pid) == 1, timeout=20,
               what="the --ssh-listen socket")
