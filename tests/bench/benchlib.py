"""Helpers shared by the benchmark scripts in tests/bench (stdlib only).

Everything runs on 127.0.0.1 in a temporary directory; every process is started in a
session of its own (Procs.start) so that Procs.stop can end its whole process group.
"""
import getpass
import json
import os
import re
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMANDS = []  # every command line a script ran, for the report

# the workspace and tokens of start_relay / start_agent
WORKSPACE = "bench"
AGENT_TOKEN = "bench-agent-token"
USER_TOKEN = "bench-user-token"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def quote(args):
    return " ".join(shlex.quote(str(a)) for a in args)


def record(args):
    """Adds a command line to COMMANDS once."""
    cmd = quote(args)
    if cmd not in COMMANDS:
        COMMANDS.append(cmd)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_listening(port, timeout=15.0, proc=None, what="listener"):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 10):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError("%s not listening on %d after %.0fs" % (what, port, timeout))


class Procs:
    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.procs = []

    def start(self, name, args, stdout=None, stdin=None, log_command=True):
        if log_command:
            COMMANDS.append(quote(args))
        err = open(self.logdir / ("%s.log" % name), "wb")
        p = subprocess.Popen([str(a) for a in args],
                             stdin=stdin if stdin is not None else subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else err, stderr=err,
                             start_new_session=True)
        err.close()
        p.name = name
        p.logpath = self.logdir / ("%s.log" % name)
        self.procs.append(p)
        return p

    def stop_some(self, procs, timeout=5):
        """SIGTERM to the process groups of procs, SIGKILL after timeout; reaps them."""
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + timeout
        for p in reversed(procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(timeout=5)

    def stop(self):
        self.stop_some(self.procs)


def write_private(path, text):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(str(path), 0o600)


def remove_tree(tmp):
    for p in sorted(Path(tmp).rglob("*"), reverse=True):
        try:
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        except OSError:
            pass
    try:
        Path(tmp).rmdir()
    except OSError:
        pass


def private_home(tmp):
    """An argv prefix that runs a command in a private mount namespace where /etc/passwd gives
    this user the empty home tmp/home, so that the sessions of a server started with it run
    none of the user's rc files (a ~/.bashrc that runs `pyenv init` costs half a second per
    session and takes a lock). Returns (prefix, home), or (None, real home) where mount
    namespaces are not available (not root, no unshare, a container that forbids them). The
    prefix execs the command: its pid is the command's."""
    pw = pwd.getpwuid(os.getuid())
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None, pw.pw_dir
    home = Path(tmp) / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    passwd = Path(tmp) / "passwd"
    lines = []
    with open("/etc/passwd") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if len(fields) == 7 and fields[2] == str(os.getuid()):
                fields[5] = str(home)
            lines.append(":".join(fields))
    passwd.write_text("\n".join(lines) + "\n")
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
              'mount --bind "$1" /etc/passwd && shift && exec "$@"', "sh", str(passwd)]
    try:
        r = subprocess.run(prefix + ["getent", "passwd", str(os.getuid())],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, pw.pw_dir
    if r.returncode != 0 or r.stdout.strip().split(":")[5:6] != [str(home)]:
        return None, pw.pw_dir
    return prefix, str(home)


# -- OpenSSH


def ssh_user():
    return getpass.getuser()


def start_sshd(procs, tmp, ciphers="aes128-gcm@openssh.com", wrap=()):
    """A throwaway OpenSSH sshd on 127.0.0.1 (host key tmp/hostkey, client key tmp/clientkey
    in tmp/authorized_keys), run through the argv prefix wrap. Returns (its Popen, its
    port)."""
    try:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    except OSError as e:
        log("warning: cannot create /run/sshd (%s); sshd may refuse to start" % e)
    for name in ("hostkey", "clientkey"):
        args = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)]
        COMMANDS.append(" ".join(shlex.quote(a) for a in args))
        subprocess.run(args, check=True, stdin=subprocess.DEVNULL, timeout=30)
    (tmp / "authorized_keys").write_text((tmp / "clientkey.pub").read_text())
    os.chmod(str(tmp / "authorized_keys"), 0o600)
    ssh_port = free_port()
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        "Port %d" % ssh_port,
        "ListenAddress 127.0.0.1",
        "HostKey %s" % (tmp / "hostkey"),
        "AuthorizedKeysFile %s" % (tmp / "authorized_keys"),
        "PidFile %s" % (tmp / "sshd.pid"),
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes",
        "Ciphers %s" % ciphers,
        "LogLevel ERROR",
        "",
    ]))
    sshd = procs.start("sshd", list(wrap) + ["/usr/sbin/sshd", "-D", "-f", config, "-e"])
    wait_listening(ssh_port, proc=sshd, what="sshd")
    return sshd, ssh_port


# -- tether


def start_relay(procs, tmp, tether, name="relay", extra=()):
    """Writes tokens.json, agent.token and user.token in tmp, starts `tether relay` on a free
    port and returns (its Popen, its ws:// URL)."""
    tokens = {"agents": {AGENT_TOKEN: WORKSPACE}, "users": {USER_TOKEN: ["*"]}}
    write_private(tmp / "tokens.json", json.dumps(tokens))
    write_private(tmp / "agent.token", AGENT_TOKEN + "\n")
    write_private(tmp / "user.token", USER_TOKEN + "\n")
    relay = procs.start(name, [tether, "relay", "--listen", "127.0.0.1:0",
                               "--tokens", tmp / "tokens.json"] + list(extra))
    port = None
    for _ in range(300):
        m = re.search(r"relay listening on ws://127\.0\.0\.1:(\d+)", relay.logpath.read_text())
        if m:
            port = int(m.group(1))
            break
        if relay.poll() is not None:
            break
        time.sleep(0.05)
    if not port:
        raise RuntimeError("relay did not start:\n" + relay.logpath.read_text())
    return relay, "ws://127.0.0.1:%d" % port


def start_agent(procs, tmp, tether, url, extra=(), name="agent", wrap=()):
    """Starts `tether agent` for WORKSPACE (through the argv prefix wrap) and waits until the
    relay lists it as connected. Returns its Popen."""
    agent = procs.start(name, list(wrap) + [tether, "agent", "--url", url, "--token-file",
                                            tmp / "agent.token"] + list(extra))
    for _ in range(300):
        if agent.poll() is not None:
            raise RuntimeError("agent exited with %s:\n%s" % (
                agent.returncode, agent.logpath.read_text()))
        r = subprocess.run([tether, "status", "--url", url, "--token-file", tmp / "user.token",
                            WORKSPACE], capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and json.loads(r.stdout).get("connected"):
            return agent
        time.sleep(0.05)
    raise RuntimeError("agent did not connect")


# -- measuring


def make_text(path, mib):
    line_words = ["GET", "/api/v1/items", "200", "user=alice", "latency_ms", "cache=miss"]
    with open(path, "w") as f:
        n, i = 0, 0
        while n < mib * 1024 * 1024:
            line = "%08d %s %s %d\n" % (i, line_words[i % 6], "x" * (i % 40), i * 7919 % 100000)
            f.write(line)
            n += len(line)
            i += 1


def agent_bytes_sent(relay_port, agent_pid):
    """TCP bytes the agent has sent to the relay (its tunnel socket, from `ss -ti`)."""
    out = subprocess.run(["ss", "-Htinp", "dport = :%d" % relay_port], capture_output=True,
                         text=True, timeout=10).stdout
    m = re.search(r"pid=%d,.*?\n.*?bytes_sent:(\d+)" % agent_pid, out)
    return int(m.group(1)) if m else 0
