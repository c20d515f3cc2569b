"""The agent's SSH server end to end: real clients (OpenSSH, rsync, git, paramiko) reach the
real agent through `tether ssh-proxy` and the relay, as a user would with the ssh_config
that `tether config-ssh` writes.

Most tests share one relay and agent per module (ssh_module_env); those that restart the
agent or measure its memory and descriptors get their own (ssh_env). Where mount namespaces
are available, the agent runs with a home directory and an /etc/motd under tmp (see SshEnv
in conftest.py), so nothing here reads or writes the real home directory.
"""
import hashlib
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pexpect
import pytest

from conftest import (SSH_HOST_KEY, DataGen, env_lines, proc_rss_kib, proc_status_kib,
                      wait_until)

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def env(ssh_module_env):
    return ssh_module_env




def host_public_key(state_dir):
    """'ssh-ed25519 BASE64' of the host key the agent keeps in state_dir."""
    r = subprocess.run(["ssh-keygen", "-y", "-f", str(Path(state_dir) / SSH_HOST_KEY)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split()[:2])


def proc_stat_fields(pid):
    """Fields 3.. of /proc/PID/stat: [0] state, [1] ppid, [2] pgrp, [3] session."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pids_in_session(sid):
    """Live (not zombie) processes whose session id is sid."""
    found = []
    for pid in all_pids():
        try:
            f = proc_stat_fields(pid)
        except (OSError, ValueError):
            continue
        if int(f[3]) == sid and f[0] != "Z":
            found.append(pid)
    return found


def pids_with_marker(marker, parent=None):
    """Live processes whose command line contains marker (children of parent, if given)."""
    found = []
    for pid in all_pids():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read()
            if marker.encode() not in cmdline:
                continue
            f = proc_stat_fields(pid)
        except (OSError, ValueError):
            continue
        if f[0] != "Z" and (parent is None or int(f[1]) == parent):
            found.append(pid)
    return found


def read_bounded(pipe, n, timeout):
    """Up to n bytes from a pipe, stopping at EOF or after timeout seconds."""
    fd = pipe.fileno()
    parts, got = [], 0
    deadline = time.monotonic() + timeout
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        b = os.read(fd, min(n - got, 1024 * 1024))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def hwm_kib(pid):
    """VmHWM: the peak resident set size of the process so far."""
    return proc_status_kib(pid, "VmHWM")


def stable_fd_count(pid, settle=0.5, timeout=15):
    """The agent's descriptor count once it stays the same for `settle` seconds."""
    last = [fd_count(pid), time.monotonic()]

    def stable():
        n = fd_count(pid)
        now = time.monotonic()
        if n != last[0]:
            last[0], last[1] = n, now
            return None
        return now - last[1] >= settle and (n,)
    return wait_until(stable, timeout=timeout, interval=0.1, what="a stable fd count")[0]


class RssSampler:
    """Samples a process's RSS (conftest.proc_rss_kib) every 20 ms in a thread."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = proc_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, proc_rss_kib(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.peak


def feed(pipe, chunks, errors):
    """Writes chunks to pipe and closes it (EOF); records a failure in errors."""
    try:
        for c in chunks:
            pipe.write(c)
        pipe.close()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(repr(e))


def finish(p, timeout, what):
    """Waits for a Popen, bounded; on timeout kills its process group and fails."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
        raise AssertionError("%s did not finish within %ss" % (what, timeout))


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------------
# 1. exec


def test_exec_stdout_and_status_0(env):
    r = env.ssh("echo hello; printf 'two\\nlines\\n'")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\ntwo\nlines\n"
    assert r.stderr == b""


def test_exec_exit_status_3(env):
    r = env.ssh("echo before; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"before\n"


def test_exec_missing_command_127(env):
    r = env.ssh("tether-no-such-command-x7")
    assert r.returncode == 127, r.stderr
    assert r.stdout == b""
    assert re.search(rb"tether-no-such-command-x7: (command )?not found", r.stderr), r.stderr


def test_exec_stderr_kept_apart_from_stdout(env):
    r = env.ssh("echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"out1\nout2\n"
    assert r.stderr == b"err1\nerr2\n"


def test_exec_killed_by_signal(env):
    """A command killed by a signal: the server sends exit-signal (no exit-status), and
    OpenSSH exits 255. (paramiko checks the signal's name in test_paramiko_exit_signal.)"""
    t0 = time.monotonic()
    r = env.ssh("echo started; kill -TERM $$; sleep 30", opts=["LogLevel=DEBUG1"])
    assert time.monotonic() - t0 < 25, "the session outlived its killed shell"
    assert r.returncode == 255, r.stderr[-2000:]
    assert r.stdout == b"started\n"
    assert b"rtype exit-signal" in r.stderr, r.stderr[-2000:]
    assert b"rtype exit-status" not in r.stderr


def test_exec_stdin_eof_reaches_the_command(env):
    data = random.Random(5).randbytes(300001)
    r = env.ssh("wc -c", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"300001"
    r = env.ssh("wc -c", input=b"")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"0"
    r = env.ssh("cat; echo; echo after-eof", input=b"abc")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"abc\nafter-eof\n"


# ---------------------------------------------------------------------------------------
# 2. environment


def test_env_of_a_session_without_pty(env):
    r = env.ssh("env")
    assert r.returncode == 0, r.stderr
    e = env_lines(r.stdout)
    assert e.get("USER") == env.user
    assert e.get("HOME") == str(env.home)
    assert e.get("SHELL") == env.shell
    assert "/usr/bin" in e.get("PATH", "").split(":"), e.get("PATH")
    assert len(e.get("SSH_CONNECTION", "").split()) == 4, e.get("SSH_CONNECTION")
    assert len(e.get("SSH_CLIENT", "").split()) == 3, e.get("SSH_CLIENT")
    assert "SSH_TTY" not in e, "SSH_TTY without a pty: %r" % e.get("SSH_TTY")


def test_env_ssh_tty_with_pty(env):
    r = env.ssh("env; echo tty=$(tty)", tty=True)
    assert r.returncode == 0, r.stderr
    e = env_lines(r.stdout)
    assert e.get("SSH_TTY", "").startswith("/dev/"), e
    assert e["SSH_TTY"] == e.get("tty"), "SSH_TTY %r but tty(1) says %r" % (e["SSH_TTY"],
                                                                         e.get("tty"))
    assert e.get("TERM"), "no TERM with a pty"


def test_env_sendenv_allowed_names_pass_others_refused(env):
    client_env = dict(os.environ, LANG="C.UTF-8", LC_ALL="POSIX", TETHER_SESSION_TYPE="vscode",
                      FOO="from-the-client")
    r = env.ssh("env", opts=["SendEnv=LANG LC_ALL TETHER_SESSION_TYPE FOO"], env=client_env)
    assert r.returncode == 0, r.stderr
    e = env_lines(r.stdout)
    assert e.get("LANG") == "C.UTF-8"
    assert e.get("LC_ALL") == "POSIX"
    assert e.get("TETHER_SESSION_TYPE") == "vscode"
    assert "FOO" not in e, "FOO was not refused: FOO=%r" % e["FOO"]


def test_env_setenv_allowed_names_pass_others_refused(env):
    r = env.ssh("env", opts=["SetEnv=LANG=C.UTF-8 LC_ALL=C TETHER_SESSION_TYPE=jetbrains "
                             "FOO=set-by-client"])
    assert r.returncode == 0, r.stderr
    e = env_lines(r.stdout)
    assert e.get("LANG") == "C.UTF-8"
    assert e.get("LC_ALL") == "C"
    assert e.get("TETHER_SESSION_TYPE") == "jetbrains"
    assert "FOO" not in e, "FOO was not refused: FOO=%r" % e["FOO"]


# ---------------------------------------------------------------------------------------
# 3. interactive sessions (OpenSSH on a PTY of pexpect's)


PROMPT = b"tether-prompt> "
SET_PROMPT = "PS1='tether-prompt''> '; unset HISTFILE PROMPT_COMMAND"  # echo != prompt


def spawn_ssh_shell(env, rows=24, cols=80):
    argv = env.ssh_argv(tty=True)
    child = pexpect.spawn(argv[0], argv[1:], dimensions=(rows, cols), timeout=30,
                          env=dict(os.environ, TERM="xterm"))
    return child


_line_no = [0]


def run_line(child, line, timeout=30):
    """Sends a command line; returns what it printed. The end is a marker the command
    prints (its echo on the terminal differs: '<<'N'>>' vs <<N>>), so prompts redrawn
    after a window change cannot shift what belongs to which command."""
    _line_no[0] += 1
    n = _line_no[0]
    child.sendline("%s; echo '<<'%d'>>'" % (line, n))
    child.expect(b"<<%d>>\r\n" % n, timeout=timeout)
    out = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", child.before)   # terminal modes
    out = out.replace(b"\r\n", b"\n").replace(b"\r", b"")
    echoed = b"'<<'%d'>>'\n" % n
    assert echoed in out, "the command line's echo is missing: %r" % out
    return out[out.rindex(echoed) + len(echoed):]


def stty_size(child):
    out = run_line(child, "stty size")
    m = re.search(rb"(\d+) (\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def close_child(child):
    if child.isalive():
        child.terminate(force=True)
    child.close(force=True)


def test_interactive_shell(env):
    child = spawn_ssh_shell(env, rows=24, cols=80)
    try:
        child.expect(rb"[#$>] ")
        child.sendline(SET_PROMPT)
        child.expect(PROMPT)

        out = run_line(child, "echo $((6*7))")
        assert out.strip() == b"42", out

        assert stty_size(child) == (24, 80)
        child.setwinsize(37, 113)
        # the window change travels ssh -> agent -> TIOCSWINSZ: bounded wait for it
        wait_until(lambda: stty_size(child) == (37, 113), timeout=15, interval=0.2,
                   what="stty size to show 37 113 after the resize")

        out = run_line(child, "echo $0")
        assert out.strip().startswith(b"-"), "not a login shell: $0 = %r" % out.strip()

        t0 = time.monotonic()
        child.sendline("sleep 100")
        time.sleep(0.5)
        child.sendcontrol("c")
        out = run_line(child, "echo status=$?", timeout=10)   # not after 100 s
        assert time.monotonic() - t0 < 10
        assert b"status=130" in out, out

        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)
    finally:
        close_child(child)


def test_interactive_exit_status_of_the_shell(env):
    child = spawn_ssh_shell(env)
    try:
        child.expect(rb"[#$>] ")
        child.sendline("exit 7")
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 7, (child.exitstatus, child.signalstatus)
    finally:
        close_child(child)


def test_login_shell_shows_motd_unless_hushlogin(ssh_env):
    if not ssh_env.isolated:
        pytest.skip("cannot control /etc/motd and ~/.hushlogin without touching the real "
                    "system: no private mount namespace here (needs root and unshare -m)")
    marker = "tether-motd-%016x" % random.getrandbits(64)
    ssh_env.motd.write_text("Welcome to the test workspace\n%s\n" % marker)

    child = spawn_ssh_shell(ssh_env)
    try:
        i = child.expect([marker.encode(), rb"[#$>] "])
        assert i == 0, "no motd before the first prompt: %r" % child.before
        child.expect(rb"[#$>] ")
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        close_child(child)

    # a command (not a login shell) never shows the motd
    r = ssh_env.ssh("echo only-this")
    assert r.returncode == 0 and r.stdout == b"only-this\n", (r.stdout, r.stderr)

    (ssh_env.home / ".hushlogin").write_text("")
    child = spawn_ssh_shell(ssh_env)
    try:
        i = child.expect([marker.encode(), rb"[#$>] "])
        assert i == 1, "motd shown despite ~/.hushlogin"
        seen = child.before
        out = run_line(child, "echo hushed")
        assert b"hushed" in out
        seen += child.before
        assert marker.encode() not in seen, "motd shown despite ~/.hushlogin"
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        close_child(child)


# ---------------------------------------------------------------------------------------
# 4. throughput and integrity


BIG = 256 * MiB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 256 MiB file of random bytes and its sha256."""
    path = tmp_path_factory.mktemp("big") / "random-256MiB"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // (4 * MiB)):
            b = os.urandom(4 * MiB)
            h.update(b)
            f.write(b)
    return path, h.hexdigest()


def test_upload_256mib_sha256(env, big_file):
    path, digest = big_file
    with open(path, "rb") as f:
        r = subprocess.run(env.ssh_argv("sha256sum"), stdin=f, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == digest


def test_download_256mib_sha256(env, big_file):
    path, digest = big_file
    p = env.ssh_popen("cat %s" % shlex.quote(str(path)))
    got = {}

    def drain():
        h = hashlib.sha256()
        n = 0
        while True:
            b = p.stdout.read(1024 * 1024)
            if not b:
                break
            h.update(b)
            n += len(b)
        got["n"], got["digest"] = n, h.hexdigest()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t.join(300)
    try:
        assert not t.is_alive(), "download did not finish in 300 s (%r)" % got
        assert finish(p, 30, "ssh cat") == 0, p.stderr.read()
    finally:
        kill_group(p)
    assert got["n"] == BIG
    assert got["digest"] == digest


# The agent's memory for one SSH upload is bounded by its flow-control windows: the tunnel
# stream's credit (256 KiB), libssh's channel window (at most 1,280,000 bytes, libssh's
# WINDOWBASE), the session's stdin buffer (16 KiB) and a few packet buffers: about 2 MiB.
# Without working backpressure the agent would hold what the reader has not taken yet, up
# to the whole 64 MiB. 16 MiB above the idle agent is far above the first and far below the
# second.
RSS_BOUND_KIB = 16 * 1024
UPLOAD = 64 * MiB


def upload_with_memory_watch(ssh_env, command, seed):
    """Uploads UPLOAD bytes (DataGen(seed)) into command; returns ((rc, stdout, stderr),
    the agent's RSS growth as sampled, and its peak RSS growth by VmHWM), in KiB."""
    pid = ssh_env.agent.pid
    r = ssh_env.ssh("true")   # libssh and the session code are loaded and warm
    assert r.returncode == 0, r.stderr
    base = proc_rss_kib(pid)
    hwm0 = hwm_kib(pid)
    sampler = RssSampler(pid)
    p = ssh_env.ssh_popen(command, stdin=subprocess.PIPE)
    errors = []
    writer = threading.Thread(target=feed,
                              args=(p.stdin, DataGen(seed).chunks(UPLOAD), errors), daemon=True)
    writer.start()
    out = {}
    reader = threading.Thread(target=lambda: out.update(o=p.stdout.read()), daemon=True)
    reader.start()
    try:
        writer.join(120)
        assert not writer.is_alive(), "the upload stalled (deadlock?) for 120 s"
        rc = finish(p, 60, "the upload")
        reader.join(10)
    finally:
        peak = sampler.stop()
        kill_group(p)
    assert not errors, errors
    stderr = p.stderr.read()
    # VmHWM catches a peak between samples, once it exceeds what the agent had before
    hwm1 = hwm_kib(pid)
    return (rc, out.get("o", b""), stderr), peak - base, (hwm1 if hwm1 > hwm0 else peak) - base


@pytest.mark.plain_build
def test_slow_reader_upload_no_deadlock_bounded_memory(ssh_env):
    (rc, out, err), grew, hwm_grew = upload_with_memory_watch(
        ssh_env, "sleep 2; cat > /dev/null; echo done", seed=11)
    assert rc == 0, err
    assert out == b"done\n"
    assert grew < RSS_BOUND_KIB, "agent RSS grew by %d KiB (bound %d)" % (grew, RSS_BOUND_KIB)
    assert hwm_grew < RSS_BOUND_KIB, "agent peak RSS grew by %d KiB (bound %d)" % (
        hwm_grew, RSS_BOUND_KIB)


THROTTLED_READER = ("/usr/bin/python3 -c 'import sys, time, hashlib\n"
                    "h = hashlib.sha256(); n = 0\n"
                    "while True:\n"
                    "    b = sys.stdin.buffer.read1(65536)\n"
                    "    if not b: break\n"
                    "    h.update(b); n += len(b); time.sleep(0.004)\n"
                    "print(n, h.hexdigest())'")


@pytest.mark.plain_build
def test_steady_slower_reader_upload_bounded_memory(ssh_env):
    """A reader that keeps reading, but slower than the link (64 KiB per 4 ms, <= 16 MB/s,
    like a hashing or decompressing consumer on a busy machine): the bytes arrive intact
    and the agent does not hold the backlog."""
    (rc, out, err), grew, hwm_grew = upload_with_memory_watch(ssh_env, THROTTLED_READER,
                                                              seed=12)
    assert rc == 0, err
    assert out.decode().split() == [str(UPLOAD), DataGen(12).digest(UPLOAD)]
    assert hwm_grew < RSS_BOUND_KIB and grew < RSS_BOUND_KIB, (
        "agent peak RSS grew by %d KiB (sampled %d KiB) while a slower reader took %d MiB; "
        "bound %d KiB" % (hwm_grew, grew, UPLOAD // MiB, RSS_BOUND_KIB))


# ---------------------------------------------------------------------------------------
# 5. rsync and git over ssh


def make_tree(root):
    rnd = random.Random(21)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    (root / "with space and ünïcode.txt").write_text("name with space\n")
    (root / "a" / "big.bin").write_bytes(rnd.randbytes(3 * MiB + 17))
    for i in range(40):
        (root / "a" / "b" / ("f%02d" % i)).write_bytes(rnd.randbytes(rnd.randrange(0, 70000)))
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "link-to-small").symlink_to("small.txt")


def snapshot(root):
    """{relative path: (kind, mode, sha256 or link target)} of a tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", None, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o777, None)
            else:
                out[rel] = ("file", st.st_mode & 0o777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def rsync(env, *args, timeout=120):
    assert shutil.which("rsync"), "rsync is not installed (apt-get install rsync)"
    r = subprocess.run(["rsync", "-a", "--stats", "-e", "ssh -F %s" % shlex.quote(str(env.config))]
                       + [str(a) for a in args], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout)
    assert r.returncode == 0, "rsync %s: rc %d\n%s\n%s" % (
        args, r.returncode, r.stderr.decode(errors="replace"), env.agent_log())
    return r.stdout.decode(errors="replace")


def test_rsync_both_ways(env, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    remote = tmp_path / "remote"   # the workspace's side (same machine, reached over ssh)
    rsync(env, str(src) + "/", "%s:%s/" % (env.host, remote))
    assert snapshot(remote) == snapshot(src)

    # a change in the middle of a large file goes over as a delta
    big = src / "a" / "big.bin"
    data = bytearray(big.read_bytes())
    data[MiB:MiB + 5] = b"XXXXX"
    big.write_bytes(bytes(data))
    st = big.stat()   # same size; a new mtime, or rsync's quick check skips the file
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))
    stats = rsync(env, str(src) + "/", "%s:%s/" % (env.host, remote))
    assert snapshot(remote) == snapshot(src)
    m = re.search(r"Matched data: ([\d,]+)", stats)
    assert m and int(m.group(1).replace(",", "")) > MiB, stats

    # and back: changes made on the workspace side come home
    r = env.ssh("cd %s && echo new > a/made-remotely && rm small.txt link-to-small"
                % shlex.quote(str(remote)))
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    rsync(env, "%s:%s/" % (env.host, remote), str(back) + "/")
    assert snapshot(back) == snapshot(remote)
    assert (back / "a" / "made-remotely").read_text() == "new\n"


def git(*args, cwd=None, env=None, timeout=60):
    assert shutil.which("git"), "git is not installed (apt-get install git)"
    r = subprocess.run(["git"] + [str(a) for a in args], cwd=cwd, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, "git %s: rc %d\n%s" % (" ".join(map(str, args)), r.returncode,
                                                     r.stderr)
    return r.stdout.strip()


def test_git_clone_and_push_over_ssh(env, tmp_path):
    genv = dict(os.environ, GIT_SSH_COMMAND="ssh -F %s" % shlex.quote(str(env.config)),
                GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
                GIT_AUTHOR_NAME="T", GIT_AUTHOR_EMAIL="t@example.invalid",
                GIT_COMMITTER_NAME="T", GIT_COMMITTER_EMAIL="t@example.invalid")
    bare = tmp_path / "repo.git"
    git("init", "--bare", "-b", "main", bare, env=genv)
    work = tmp_path / "work"
    git("init", "-b", "main", work, env=genv)
    (work / "README").write_text("tether over ssh\n")
    (work / "data.bin").write_bytes(random.Random(3).randbytes(2 * MiB))
    git("add", ".", cwd=work, env=genv)
    git("commit", "-q", "-m", "first", cwd=work, env=genv)
    git("push", "-q", str(bare), "main", cwd=work, env=genv)
    head = git("rev-parse", "HEAD", cwd=work, env=genv)

    clone = tmp_path / "clone"
    git("clone", "-q", "%s:%s" % (env.host, bare), clone, env=genv, timeout=120)
    assert git("rev-parse", "HEAD", cwd=clone, env=genv) == head
    assert (clone / "README").read_text() == "tether over ssh\n"
    assert (clone / "data.bin").read_bytes() == (work / "data.bin").read_bytes()

    (clone / "second").write_text("pushed over ssh\n")
    git("add", "second", cwd=clone, env=genv)
    git("commit", "-q", "-m", "second", cwd=clone, env=genv)
    git("push", "-q", "origin", "main", cwd=clone, env=genv, timeout=120)
    assert git("--git-dir", bare, "rev-parse", "main", env=genv) == \
        git("rev-parse", "HEAD", cwd=clone, env=genv)


# ---------------------------------------------------------------------------------------
# 6. paramiko as a second client


class ParamikoSession:
    """paramiko's Transport on one end of a socketpair; `tether ssh-proxy` on the other
    (stdin and stdout), as OpenSSH runs a ProxyCommand. Authenticates with "none"."""

    def __init__(self, env):
        self.sock, theirs = socket.socketpair()
        self.errlog = open(env.tmp / ("paramiko-proxy-%d.stderr" % id(self)), "wb")
        self.proxy = subprocess.Popen(env.proxy_command(), stdin=theirs, stdout=theirs,
                                      stderr=self.errlog, start_new_session=True)
        theirs.close()
        self.signals = []   # (channel id, signal name) of every exit-signal received
        self.transport = paramiko.Transport(self.sock)
        # paramiko ignores exit-signal; look at every channel request on the way in
        table = dict(self.transport._channel_handler_table)
        handle = table[paramiko.common.MSG_CHANNEL_REQUEST]

        def on_request(chan, m):
            peek = paramiko.Message(m.get_remainder())
            if peek.get_text() == "exit-signal":
                peek.get_boolean()
                self.signals.append((chan.get_id(), peek.get_text()))
            return handle(chan, m)
        table[paramiko.common.MSG_CHANNEL_REQUEST] = on_request
        self.transport._channel_handler_table = table
        try:
            self.transport.start_client(timeout=30)
            self.transport.auth_none(env.user)
        except BaseException:
            self.close()
            raise

    def exec(self, command, timeout=30):
        """Runs command; returns (exit status or -1, stdout, stderr, channel id)."""
        chan = self.transport.open_session(timeout=timeout)
        chan.settimeout(timeout)
        chan.exec_command(command)
        chan.shutdown_write()
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        assert chan.status_event.wait(timeout), "no exit status or close in %ss" % timeout
        status = chan.exit_status
        cid = chan.get_id()
        chan.close()
        return status, out, err, cid

    def close(self):
        try:
            self.transport.close()
        finally:
            self.sock.close()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self.proxy)
            self.errlog.close()


@pytest.fixture
def pk(env):
    s = ParamikoSession(env)
    yield s
    s.close()


def test_paramiko_connects_through_the_proxy(env, pk):
    assert pk.transport.is_authenticated()
    key = pk.transport.get_remote_server_key()
    assert "%s %s" % (key.get_name(), key.get_base64()) == host_public_key(env.state_dir)


def test_paramiko_proxycommand(env):
    """paramiko's own ProxyCommand class (a subprocess with pipes) works too."""
    proxy = paramiko.ProxyCommand(" ".join(shlex.quote(a) for a in env.proxy_command()))
    t = paramiko.Transport(proxy)
    try:
        t.start_client(timeout=30)
        t.auth_none(env.user)
        chan = t.open_session(timeout=30)
        chan.settimeout(30)
        chan.exec_command("echo via-proxycommand")
        assert chan.makefile("rb").read() == b"via-proxycommand\n"
        assert chan.status_event.wait(30) and chan.exit_status == 0
    finally:
        t.close()
        proxy.close()


def test_paramiko_exec_status_and_stderr(pk):
    status, out, err, _ = pk.exec("printf out; printf err >&2; exit 7")
    assert (status, out, err) == (7, b"out", b"err")
    status, out, err, _ = pk.exec("cat", timeout=30)   # stdin EOF from shutdown_write
    assert (status, out, err) == (0, b"", b"")


def test_paramiko_exit_signal(pk):
    status, out, err, cid = pk.exec("echo x; kill -TERM $$")
    assert out == b"x\n"
    assert status == -1, "an exit-status (%d) for a killed process" % status
    assert (cid, "TERM") in pk.signals, pk.signals


def test_paramiko_pty_invoke_shell(pk):
    chan = pk.transport.open_session(timeout=30)
    chan.settimeout(30)
    chan.get_pty(term="xterm", width=100, height=30)
    chan.invoke_shell()
    seen = bytearray()

    def until(pattern, timeout=20):
        """Reads until pattern matches the output (terminal modes and CRs removed);
        consumes the output up to the match."""
        deadline = time.monotonic() + timeout
        while True:
            text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", bytes(seen)).replace(b"\r", b"")
            m = re.search(pattern, text)
            if m:
                seen.clear()
                seen.extend(text[m.end():])
                return m
            assert time.monotonic() < deadline, "no %r in %r" % (pattern, text[-500:])
            b = chan.recv(65536)
            assert b, "channel closed; got %r" % text[-500:]
            seen.extend(b)

    # each value is printed with a tag its echoed command line does not contain
    chan.sendall(b"echo \"si\"\"ze=$(stty size)\"; echo \"an\"\"swer=$((6*7))\"; "
                 b"echo \"ze\"\"ro=$0\"\n")
    assert until(rb"size=(\d+ \d+)").group(1) == b"30 100"
    assert until(rb"answer=(\d+)").group(1) == b"42"
    zero = until(rb"zero=(\S+)").group(1)
    assert zero.startswith(b"-"), "not a login shell: $0 = %r" % zero
    chan.resize_pty(width=120, height=40)
    deadline = time.monotonic() + 15
    while True:
        chan.sendall(b"echo \"si\"\"ze=$(stty size)\"\n")
        size = until(rb"size=(\d+ \d+)").group(1)
        if size == b"40 120":
            break
        assert time.monotonic() < deadline, "stty size stays %r after resize" % size
        time.sleep(0.2)
    chan.sendall(b"exit 0\n")
    assert chan.status_event.wait(20)
    assert chan.exit_status == 0
    chan.close()


# ---------------------------------------------------------------------------------------
# 7. robustness


def test_50_concurrent_sessions(env):
    procs = [env.ssh_popen("echo $$; sleep 1") for _ in range(50)]
    results = []
    try:
        deadline = time.monotonic() + 180
        for p in procs:
            left = max(1, deadline - time.monotonic())
            out, err = p.communicate(timeout=left)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            kill_group(p)
    failed = [(i, rc, err[-300:]) for i, (rc, out, err) in enumerate(results) if rc != 0]
    assert not failed, "%d of 50 failed: %r\n%s" % (len(failed), failed[:5], env.agent_log())
    pids = [out.strip() for _, out, _ in results]
    assert all(re.fullmatch(rb"\d+", p) for p in pids), pids
    assert len(set(pids)) == 50, "sessions shared a shell: %r" % pids


@pytest.mark.parametrize("command", ["cat /dev/zero", "sleep 1000"])
def test_killed_client_ends_its_session(ssh_env, command):
    agent = ssh_env.agent.pid
    r = ssh_env.ssh("true")
    assert r.returncode == 0, r.stderr
    base_fds = stable_fd_count(agent)

    marker = "tether-kill-marker-%016x" % random.getrandbits(64)
    p = ssh_env.ssh_popen("%s; true %s" % (command, marker))
    leader = None
    try:
        leader = wait_until(lambda: pids_with_marker(marker, parent=agent), timeout=20,
                            what="the session's shell")[0]
        # the shell runs in a session of its own (setsid): everything of it is in there
        members = wait_until(lambda: len(pids_in_session(leader)) >= 2 and
                             pids_in_session(leader), timeout=20,
                             what="%r to run in the session" % command)
        if command.startswith("cat"):
            got = read_bounded(p.stdout, 4 * MiB, timeout=30)   # the transfer is under way
            assert len(got) == 4 * MiB and got.count(0) == len(got), len(got)
        os.kill(p.pid, signal.SIGKILL)   # the client dies, not its ProxyCommand
        p.wait(10)
        p.stdout.close()
        p.stderr.close()

        wait_until(lambda: not pids_in_session(leader), timeout=10,
                   what="the killed client's session %r (pids %r) to end" % (command, members))
        assert not pids_with_marker(marker)
        # the orphaned ssh-proxy notices its closed stdin and exits
        wait_until(lambda: not pids_in_session(p.pid), timeout=10,
                   what="the ssh-proxy of the killed client to exit")
        wait_until(lambda: fd_count(agent) == base_fds, timeout=10,
                   what="the agent's fd count to return to %d (now %d)" % (
                       base_fds, fd_count(agent)))
    finally:
        kill_group(p)
        for pid in pids_in_session(leader) if leader else []:   # what the agent left
            os.kill(pid, signal.SIGKILL)
    r = ssh_env.ssh("echo still-serving")
    assert r.returncode == 0 and r.stdout == b"still-serving\n", (r.stdout, r.stderr,
                                                                  ssh_env.agent_log())


# ---------------------------------------------------------------------------------------
# 8. host key


def known_hosts_opts(path, strict):
    return ["UserKnownHostsFile=%s" % path, "StrictHostKeyChecking=%s" % strict]


def test_host_key_survives_restart(ssh_env, tmp_path):
    key = ssh_env.state_dir / SSH_HOST_KEY
    assert key.stat().st_mode & 0o777 == 0o600, oct(key.stat().st_mode)
    mode = ssh_env.state_dir.stat().st_mode & 0o777
    assert mode == 0o700, "state directory mode %o" % mode
    kh = tmp_path / "known_hosts"
    r = ssh_env.ssh("true", opts=known_hosts_opts(kh, "accept-new"))
    assert r.returncode == 0, r.stderr
    assert kh.read_text().split() == [ssh_env.host] + host_public_key(ssh_env.state_dir).split()
    before = key.read_bytes()

    ssh_env.restart_agent()
    r = ssh_env.ssh("echo same-key", opts=known_hosts_opts(kh, "yes"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"same-key\n"
    assert key.read_bytes() == before
    assert key.stat().st_mode & 0o777 == 0o600


def test_host_key_of_a_fresh_state_dir_differs(ssh_env, tmp_path):
    kh = tmp_path / "known_hosts"
    r = ssh_env.ssh("true", opts=known_hosts_opts(kh, "accept-new"))
    assert r.returncode == 0, r.stderr
    old = host_public_key(ssh_env.state_dir)

    fresh = tmp_path / "fresh-state"
    ssh_env.restart_agent(state_dir=fresh)
    key = fresh / SSH_HOST_KEY
    assert key.stat().st_mode & 0o777 == 0o600, oct(key.stat().st_mode)
    assert host_public_key(fresh) != old
    r = ssh_env.ssh("echo should-not-run", opts=known_hosts_opts(kh, "yes"))
    assert r.returncode == 255
    assert r.stdout == b""
    assert b"Host key verification failed" in r.stderr, r.stderr


# ---- processes, garbage, and config-ssh with no flags ----

def test_session_processes_yield_to_the_agent(env):
    """Children run nicer than the agent and are first for the OOM killer."""
    pid = env.agent.pid
    with open("/proc/%d/oom_score_adj" % pid) as f:
        agent_oom = int(f.read())
    agent_nice = int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[16])
    r = env.ssh("cat /proc/self/oom_score_adj; nice")
    assert r.returncode == 0, r.stderr
    oom, nice = [int(x) for x in r.stdout.split()]
    assert oom == min(1000, agent_oom + 100)
    assert nice == min(19, agent_nice + 5)


def test_garbage_from_a_client_hurts_no_one(env):
    """Bytes that are not SSH end that connection only; no fd is left behind."""
    pid = env.agent.pid

    def fds():
        return len(os.listdir("/proc/%d/fd" % pid))
    env.ssh("true")
    before = fds()
    for seed in range(3):
        junk = random.Random(seed).randbytes(200_000)
        if seed == 1:
            junk = b"SSH-2.0-bogus\r\n" + junk  # a banner, then nonsense packets
        r = subprocess.run(env.proxy_command(), input=junk, capture_output=True, timeout=30)
        assert r.returncode in (0, 1)
    wait_until(lambda: fds() <= before, timeout=15, what="the agent's fds to return")
    assert env.ssh("echo fine").stdout == b"fine\n"


def test_config_ssh_then_plain_ssh_with_no_flags(ssh_env):
    """`tether config-ssh` into the user's real ~/.ssh/config (a private home in a mount
    namespace), run twice: one block; then `ssh tether.NAME true` with no other flags."""
    if not ssh_env.isolated:
        pytest.skip("needs a private mount namespace to give the user a scratch home")

    def in_home(*argv):
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             'mount --bind "$1" /etc/passwd && shift && exec "$@"', "sh",
             str(ssh_env._passwd)] + [str(a) for a in argv],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    args = [ssh_env.harness.bin, "config-ssh", "--url", ssh_env.relay.url, "--token-file",
            str(ssh_env.tokens.user_file())]
    for _ in range(2):
        r = in_home(*args)
        assert r.returncode == 0, r.stderr
    config = (ssh_env.home / ".ssh" / "config").read_text()
    assert config.count("START-TETHER") == 1
    assert "Host %s" % ssh_env.host in config
    r = in_home("ssh", ssh_env.host, "true")
    assert r.returncode == 0, r.stderr


def test_sigterm_hangs_up_then_kills_what_ignores_it(ssh_env):
    """SIGTERM: sessions get SIGHUP; a process that ignores it is killed after the grace
    period, and the agent exits 0 within a bounded time."""
    p = ssh_env.ssh_popen("trap '' HUP; echo PID=$$; exec sleep 300")
    line = p.stdout.readline().decode()
    assert line.startswith("PID="), line
    pid = int(line.split("=")[1])
    assert os.path.exists("/proc/%d" % pid)
    t0 = time.monotonic()
    rc = ssh_env.agent.terminate(timeout=15)
    took = time.monotonic() - t0
    assert rc == 0, "agent exit status %r" % rc
    assert took < 10, "the agent took %.1fs to stop" % took
    wait_until(lambda: not os.path.exists("/proc/%d" % pid) or
               open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] == "Z",
               timeout=5, what="the HUP-ignoring process to be killed")
    p.kill()
    p.wait(timeout=10)
