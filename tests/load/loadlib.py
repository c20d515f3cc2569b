"""Helpers shared by the load scripts in tests/load (stdlib only, plus what the scripts
import themselves).

Everything runs on 127.0.0.1 in a temporary directory. Every process is started in a
session of its own (Procs.start), so that Procs.stop ends its whole process group and
nothing else. Every wait is bounded in time and in iterations.
"""
import asyncio
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB = 1024
MiB = 1024 * 1024
COMMANDS = []  # every command line a script ran, for its report

LISTEN_RE = re.compile(r"relay listening on ws://127\.0\.0\.1:(\d+)")


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def quote(args):
    return " ".join(shlex.quote(str(a)) for a in args)


def record(args, note=""):
    cmd = quote(args) + note
    if cmd not in COMMANDS:
        COMMANDS.append(cmd)


def default_tether():
    """TETHER_BIN, else the release build the README suggests, else build/."""
    env = os.environ.get("TETHER_BIN")
    if env:
        return Path(env)
    for cand in (REPO / "build-release" / "agent" / "tether", REPO / "build" / "agent" / "tether"):
        if cand.is_file():
            return cand
    return REPO / "build" / "agent" / "tether"


def copy_tether(src, tmp):
    """Copies the binary under a neutral name, so that a rebuild during the run cannot mix
    versions and nobody's `pkill tether` on this shared machine kills the processes under
    test."""
    src = Path(src)
    if not src.is_file() or not os.access(str(src), os.X_OK):
        sys.exit("no tether binary at %s; build one first:\n"
                 "  meson setup build-release -Dbuildtype=release && ninja -C build-release\n"
                 "or give --tether / TETHER_BIN" % src)
    dst = Path(tmp) / "tbin-load"
    shutil.copy2(str(src), str(dst))
    os.chmod(str(dst), 0o755)
    return dst


# -- file descriptors


def raise_nofile(want):
    """Raises this process's RLIMIT_NOFILE soft limit to at least want (and the hard limit
    when we may; else to the hard limit). Children inherit it. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def nofile_preexec(limit):
    """A preexec_fn setting a child's RLIMIT_NOFILE soft limit to limit (<= our hard)."""
    if limit is None:
        return None

    def pre():
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lim = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim, hard))
    return pre


def proc_nofile(pid):
    """The soft RLIMIT_NOFILE of a running process (from /proc/PID/limits)."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                v = line.split()[3]
                return None if v == "unlimited" else int(v)
    return None


# -- processes


class Procs:
    """The processes a script started, each in a session of its own."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def start(self, name, args, nofile=None, stdin=None, stdout=None, log_command=True,
              env=None):
        if log_command:
            record(args)
        logpath = self.logdir / ("%s.log" % name)
        err = open(str(logpath), "wb")
        p = subprocess.Popen([str(a) for a in args],
                             stdin=stdin if stdin is not None else subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else err, stderr=err,
                             start_new_session=True, preexec_fn=nofile_preexec(nofile), env=env)
        err.close()
        p.name = name
        p.logpath = logpath
        self.procs.append(p)
        return p

    def stop_some(self, procs, timeout=5):
        """SIGTERM to each one's process group, SIGKILL after timeout; reaps them."""
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group may outlive its leader
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def stop(self):
        self.stop_some(list(reversed(self.procs)))


def log_tail(p, n=3000):
    try:
        t = Path(p.logpath).read_text(errors="replace")
    except OSError:
        return ""
    return t if len(t) <= n else "..." + t[-n:]


def write_private(path, text):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(str(path), 0o600)


def write_tokens(tmp, agents, user_token):
    """tokens.json with agents {token: workspace} and one admin user ("*"); user.token.
    Returns the tokens file's path."""
    doc = {"agents": agents, "users": {user_token: ["*"]}}
    path = Path(tmp) / "tokens.json"
    write_private(path, json.dumps(doc))
    write_private(Path(tmp) / "user.token", user_token + "\n")
    return path


def start_relay(procs, tether, tokens_path, extra=(), nofile=None, name="relay"):
    """Starts `tether relay` on a free loopback port; returns (its Popen, port)."""
    relay = procs.start(name, [tether, "relay", "--listen", "127.0.0.1:0", "--tokens",
                               tokens_path] + [str(a) for a in extra], nofile=nofile)
    for _ in range(300):
        m = LISTEN_RE.search(log_tail(relay, 100000))
        if m:
            return relay, int(m.group(1))
        if relay.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("relay did not start:\n" + log_tail(relay))


def start_agent(procs, tether, port, token_file, state_dir, extra=(), nofile=None, wrap=(),
                name="agent"):
    return procs.start(name, list(wrap) + [
        tether, "agent", "--url", "ws://127.0.0.1:%d" % port, "--token-file", token_file,
        "--state-dir", state_dir] + [str(a) for a in extra], nofile=nofile)


# -- the relay's API


def api_get(port, path, token, timeout=30):
    """GET on the relay; returns (status, parsed JSON or None, seconds)."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Authorization": "Bearer " + token})
        r = c.getresponse()
        body = r.read()
        secs = time.monotonic() - t0
        try:
            doc = json.loads(body) if r.status == 200 else None
        except ValueError:
            doc = None
        return r.status, doc, secs
    finally:
        c.close()


def wait_connected(port, token, workspace, proc=None, timeout=20):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 10):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (proc.name, proc.returncode,
                                                           log_tail(proc)))
        try:
            st, doc, _ = api_get(port, "/api/v1/workspaces/%s" % workspace, token, timeout=5)
            if st == 200 and doc.get("connected"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError("workspace %s did not connect in %.0fs" % (workspace, timeout))


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 10):
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise RuntimeError("timed out after %.0fs waiting for %s" % (timeout, what))


# -- /proc


def proc_mem(pid):
    """VmRSS, RssAnon, RssFile, VmHWM and Threads (KiB, count) and fds of pid."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    return out


def proc_cpu(pid):
    """utime + stime of pid in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fl = s[s.rindex(")") + 2:].split()
    return (int(fl[11]) + int(fl[12])) / CLK_TCK


def proc_comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# -- statistics


def pct(values, p):
    """The p-th percentile (nearest rank) of values, or None."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def dist_ms(values):
    """'min / p50 / p90 / p99 / max' of seconds, in ms."""
    if not values:
        return "n/a"
    return "min %.1f, p50 %.1f, p90 %.1f, p99 %.1f, max %.1f ms (n=%d)" % tuple(
        [1000 * min(values)] + [1000 * pct(values, p) for p in (50, 90, 99)] +
        [1000 * max(values), len(values)])


def machine():
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return "%d cores (%s), Linux %s" % (os.cpu_count(), model, os.uname().release)


# -- an echo server in a process of its own (asyncio)


async def _echo(reader, writer):
    try:
        while True:
            b = await reader.read(65536)
            if not b:
                break
            writer.write(b)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _echo_main(port_file):
    srv = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=4096)
    port = srv.sockets[0].getsockname()[1]
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, port_file)
    async with srv:
        await srv.serve_forever()


def start_echo_server(procs, tmp, nofile):
    """Starts this file as an asyncio echo server (a process of its own, so that it does
    not compete with the clients' event loop); returns (its Popen, port)."""
    port_file = str(Path(tmp) / "echo.port")
    if os.path.exists(port_file):
        os.unlink(port_file)
    p = procs.start("echo", [sys.executable, __file__, "echo-server", port_file], nofile=nofile,
                    log_command=False)
    wait_for(lambda: os.path.exists(port_file) or p.poll() is not None, 15, "the echo server")
    if p.poll() is not None:
        raise RuntimeError("echo server exited:\n" + log_tail(p))
    return p, int(Path(port_file).read_text())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo-server":
        asyncio.run(_echo_main(sys.argv[2]))
    else:
        sys.exit("usage: loadlib.py echo-server PORT_FILE")
