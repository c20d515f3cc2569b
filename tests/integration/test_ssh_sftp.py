"""SFTP over the tunnel: the agent's built-in server (subsystem sftp) driven by OpenSSH's
scp and sftp and by paramiko, and --sftp-server naming an external one."""
import hashlib
import os
import subprocess
from pathlib import Path

import paramiko
import pytest

from conftest import wait_until


@pytest.fixture(scope="module")
def env(ssh_module_env):
    return ssh_module_env


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    p = tmp_path_factory.mktemp("sftp-blob") / "blob.bin"
    with open(p, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    return p


def test_scp_upload_and_download(env, blob, tmp_path):
    remote = tmp_path / "remote.bin"
    r = subprocess.run(["scp", "-F", str(env.config), str(blob), "%s:%s" % (env.host, remote)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha(remote) == sha(blob)
    back = tmp_path / "back.bin"
    r = subprocess.run(["scp", "-F", str(env.config), "%s:%s" % (env.host, remote), str(back)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha(back) == sha(blob)


def test_scp_recursive_with_times(env, tmp_path):
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("deep\n")
    (src / "top.txt").write_text("top\n")
    os.utime(src / "top.txt", (1_600_000_000, 1_600_000_000))
    dst = tmp_path / "copy"
    r = subprocess.run(["scp", "-F", str(env.config), "-r", "-p", str(src),
                        "%s:%s" % (env.host, dst)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (dst / "a" / "b" / "f.txt").read_text() == "deep\n"
    assert int((dst / "top.txt").stat().st_mtime) == 1_600_000_000


def test_sftp_batch(env, blob, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    batch = tmp_path / "batch"
    batch.write_text("\n".join([
        "cd %s" % work,
        "put %s up.bin" % blob,
        "mkdir sub",
        "rename up.bin sub/moved.bin",
        "ln -s sub/moved.bin link",
        "ls -l sub",
        "get sub/moved.bin %s" % (tmp_path / "got.bin"),
        "df -h .",
        "rm link",
        "bye", ""]))
    r = subprocess.run(["sftp", "-F", str(env.config), "-b", str(batch), env.host],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"moved.bin" in r.stdout
    assert sha(work / "sub" / "moved.bin") == sha(blob)
    assert sha(tmp_path / "got.bin") == sha(blob)
    assert not (work / "link").exists()


def test_sftp_errors_are_reported(env, tmp_path):
    batch = tmp_path / "batch"
    batch.write_text("get %s/missing.bin %s/x\n" % (tmp_path, tmp_path))
    r = subprocess.run(["sftp", "-F", str(env.config), "-b", str(batch), env.host],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert r.returncode != 0
    assert b"No such file" in r.stderr or b"not found" in r.stderr


def test_paramiko_sftp(env, tmp_path):
    t = paramiko.Transport(paramiko.ProxyCommand(" ".join(env.proxy_command())))
    try:
        t.start_client(timeout=20)
        t.auth_none("someone")
        sftp = paramiko.SFTPClient.from_transport(t)
        data = os.urandom(5 * 1024 * 1024 + 17)
        path = str(tmp_path / "pm.bin")
        with sftp.open(path, "wb") as f:
            f.set_pipelined(True)
            f.write(data)
        assert sftp.stat(path).st_size == len(data)
        with sftp.open(path, "rb") as f:
            f.prefetch()
            assert f.read() == data
        sftp.chmod(path, 0o640)
        assert sftp.stat(path).st_mode & 0o777 == 0o640
        assert sftp.normalize(".") == str(Path(env.home))
        with pytest.raises(FileNotFoundError):
            sftp.stat(str(tmp_path / "nope"))
        sftp.close()
    finally:
        t.close()


def test_client_killed_mid_transfer_leaves_no_fds(env, blob, tmp_path):
    pid = env.agent.pid

    def fds():
        return len(os.listdir("/proc/%d/fd" % pid))
    env.ssh("true")
    before = fds()
    p = subprocess.Popen(["scp", "-F", str(env.config), str(blob),
                          "%s:%s" % (env.host, tmp_path / "cut.bin")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: (tmp_path / "cut.bin").exists() and
               (tmp_path / "cut.bin").stat().st_size > 0, timeout=30,
               what="the upload to start")
    os.killpg(p.pid, 9)
    p.wait(timeout=10)
    wait_until(lambda: fds() <= before, timeout=15, what="the agent's fds to return")
    assert env.ssh("echo alive").stdout == b"alive\n"


@pytest.mark.skipif(not os.path.exists("/usr/lib/openssh/sftp-server"),
                    reason="OpenSSH's sftp-server is not installed")
def test_external_sftp_server(ssh_env, blob, tmp_path):
    marker = tmp_path / "external-ran"
    wrapper = tmp_path / "sftp-wrapper"
    wrapper.write_text("#!/bin/sh\necho ran > %s\nexec /usr/lib/openssh/sftp-server\n" % marker)
    wrapper.chmod(0o755)
    ssh_env.restart_agent(extra=["--sftp-server", str(wrapper)])
    remote = tmp_path / "ext.bin"
    r = subprocess.run(["scp", "-F", str(ssh_env.config), str(blob),
                        "%s:%s" % (ssh_env.host, remote)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha(remote) == sha(blob)
    assert marker.read_text() == "ran\n"
