"""SSH forwarding through the agent's SSH server, with OpenSSH's ssh (and paramiko for
cancel-tcpip-forward): -L, -D (curl through the SOCKS proxy), -R, agent forwarding, the
refusals (closed port, port in use, unix sockets), and the optional local listener's
public-key authentication."""
import os
import shutil
import socket
import subprocess
import threading

import paramiko
import pytest

from conftest import echo_roundtrip, free_port, wait_until


@pytest.fixture(scope="module")
def env(ssh_module_env):
    return ssh_module_env


def wait_port(port, timeout=15):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(up, timeout=timeout, what="port %d to listen" % port)


def closed_without_data(port, timeout=10):
    """Connects to port; True if the connection ends (EOF or reset) with no bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


@pytest.fixture
def forwarder(env):
    """Starts `ssh -N` with forwarding options; stops it at the end."""
    started = []

    def start(*opts, extra_opts=()):
        argv = ["ssh", "-F", str(env.config), "-N", "-o", "ExitOnForwardFailure=yes"]
        for o in extra_opts:
            argv += ["-o", o]
        argv += list(opts) + [env.host]
        q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        started.append(q)
        return q
    yield start
    for q in started:
        if q.poll() is None:
            q.kill()
        q.wait(timeout=10)


def test_local_forward_carries_bytes_both_ways(env, forwarder, servers):
    echo = servers.echo()
    port = free_port()
    forwarder("-L", "%d:127.0.0.1:%d" % (port, echo.port))
    wait_port(port)
    echo_roundtrip(port, nbytes=8 * 1024 * 1024, seed=3)
    # Several at once, on one SSH connection.
    threads = [threading.Thread(target=echo_roundtrip, args=(port,),
                                kwargs={"nbytes": 512 * 1024, "seed": i}) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


def test_local_forward_to_a_closed_port_fails_the_open(env, servers):
    port, closed = free_port(), free_port()
    argv = ["ssh", "-v", "-F", str(env.config), "-N", "-L",
            "%d:127.0.0.1:%d" % (port, closed), env.host]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(port)
        assert closed_without_data(port)
        # The agent refused the channel open (libssh 0.10 can only say "administratively
        # prohibited"); its log says why.
        wait_until(lambda: "connect failed: Connection refused" in env.agent_log(), timeout=10,
                   what="the agent to log the refused forward")
        # The SSH connection is still fine: another forward on it works.
    finally:
        p.kill()
        err = p.communicate(timeout=10)[1].decode(errors="replace")
    assert "open failed" in err, err[-2000:]
    assert env.ssh("echo still serving").stdout == b"still serving\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_dynamic_forward_socks_with_curl(env, forwarder, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    body = os.urandom(3 * 1024 * 1024)
    (site / "blob.bin").write_bytes(body)
    http_port = free_port()
    httpd = subprocess.Popen(["/usr/bin/python3", "-m", "http.server", str(http_port),
                              "--bind", "127.0.0.1", "--directory", str(site)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(http_port)
        socks = free_port()
        forwarder("-D", "127.0.0.1:%d" % socks)
        wait_port(socks)
        for proxy in ("--socks5-hostname", "--socks5"):  # a name, then an address
            out = tmp_path / ("got%s.bin" % proxy)
            r = subprocess.run(["curl", "-sS", "-o", str(out), proxy, "127.0.0.1:%d" % socks,
                                "http://localhost:%d/blob.bin" % http_port],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert out.read_bytes() == body
    finally:
        httpd.kill()
        httpd.wait(timeout=10)


def test_remote_forward_listens_in_the_workspace(env, forwarder, servers):
    echo = servers.echo()
    port = free_port()
    forwarder("-R", "%d:127.0.0.1:%d" % (port, echo.port))
    wait_port(port)  # the agent listens on the workspace's side
    echo_roundtrip(port, nbytes=4 * 1024 * 1024, seed=5)


def test_remote_forward_on_a_port_in_use_is_refused(env):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = subprocess.run(["ssh", "-F", str(env.config), "-N", "-o", "ExitOnForwardFailure=yes",
                            "-R", "%d:127.0.0.1:9" % port, env.host],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    finally:
        busy.close()
    assert r.returncode == 255
    assert b"remote port forwarding failed" in r.stderr


def test_remote_forward_cancel_with_paramiko(env, servers):
    """tcpip-forward with port 0 (the server picks), then cancel-tcpip-forward."""
    sock = paramiko.ProxyCommand(" ".join(env.proxy_command()))
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=20)
        t.auth_none("someone")
        assert t.is_authenticated()
        got = []

        def handler(channel, origin, server):
            got.append(server)
            channel.sendall(b"from the client side")
            channel.close()
        port = t.request_port_forward("127.0.0.1", 0, handler=handler)
        assert port > 0
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.settimeout(10)
        data = b""
        while len(data) < 20:
            b = s.recv(100)
            if not b:
                break
            data += b
        s.close()
        assert data == b"from the client side"
        assert got and got[0][1] == port
        t.cancel_port_forward("127.0.0.1", port)

        def gone():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True
        wait_until(gone, timeout=10, what="the cancelled listener to close")
    finally:
        t.close()


def test_unix_socket_forward_is_refused_cleanly(env, tmp_path):
    """libssh 0.10 cannot serve direct-streamlocal@openssh.com: the open fails, the agent
    keeps serving."""
    target = tmp_path / "target.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(target))
    srv.listen(1)
    port = free_port()
    p = subprocess.Popen(["ssh", "-F", str(env.config), "-N", "-L",
                          "%d:%s" % (port, target), env.host],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(port)
        assert closed_without_data(port)
    finally:
        p.kill()
        p.wait(timeout=10)
        srv.close()
    assert env.ssh("echo ok").stdout == b"ok\n"


def test_agent_forwarding_with_ssh_agent(env, tmp_path):
    key = tmp_path / "id_fwd"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fwd-test-key",
                    "-f", str(key)], check=True, timeout=30, stdin=subprocess.DEVNULL)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(sock.exists, timeout=10, what="ssh-agent's socket")
        e = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env=e, timeout=30,
                       stdin=subprocess.DEVNULL)
        r = env.ssh('echo "$SSH_AUTH_SOCK"; stat -c %a "$(dirname "$SSH_AUTH_SOCK")"; '
                    'ssh-add -l', opts=("ForwardAgent=yes",), env=e)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        remote_sock = lines[0]
        assert remote_sock and remote_sock != str(sock)
        assert lines[1] == "700"  # only the user reaches the forwarded agent
        assert "fwd-test-key" in lines[2]
        # Without -A the session has no agent.
        r = env.ssh('echo "[$SSH_AUTH_SOCK]"', env=e)
        assert r.stdout == b"[]\n"
        # The socket goes away with its connection.
        wait_until(lambda: not os.path.exists(remote_sock), timeout=10,
                   what="the forwarded agent socket to be removed")
    finally:
        agent.kill()
        agent.wait(timeout=10)


# ---- the local listener: public keys only ----

@pytest.fixture
def listener(ssh_env, tmp_path):
    """An agent with --ssh-listen and an authorized_keys file holding one key; a login grace
    time of 1 s, which authenticated sessions outlive."""
    keys = {}
    for name in ("good", "other", "restricted"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / name)], check=True, timeout=30, stdin=subprocess.DEVNULL)
        keys[name] = tmp_path / name
    ak = tmp_path / "authorized_keys"
    ak.write_text((tmp_path / "good.pub").read_text() +
                  'command="echo restricted" ' + (tmp_path / "restricted.pub").read_text())
    port = free_port()
    ssh_env.restart_agent(extra=["--ssh-listen", "127.0.0.1:%d" % port,
                                 "--authorized-keys", str(ak), "--ssh-login-grace", "1s"])
    wait_port(port)
    return ssh_env, port, keys


def local_ssh(port, key=None, user=None, extra=(), cmd="echo local-ok"):
    argv = ["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
    if key:
        argv += ["-i", str(key)]
    argv += list(extra)
    argv += ["%s@127.0.0.1" % (user or os.environ.get("USER") or "root"), cmd]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def test_local_listener_accepts_an_authorized_key(listener):
    env, port, keys = listener
    r = local_ssh(port, keys["good"], user=env.user)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"local-ok\n"


def test_authenticated_sessions_outlive_the_login_grace_time(listener):
    env, port, keys = listener
    r = local_ssh(port, keys["good"], user=env.user, cmd="sleep 2.5; echo local-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"local-ok\n"
    r = env.ssh("sleep 2.5; echo via-tunnel")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"via-tunnel\n"


def test_local_listener_refuses_other_keys_and_options_lines(listener):
    env, port, keys = listener
    for k in ("other", "restricted"):  # unknown; a line with options tether cannot enforce
        r = local_ssh(port, keys[k], user=env.user)
        assert r.returncode == 255
        assert b"Permission denied (publickey)" in r.stderr


def test_local_listener_never_takes_none_or_passwords(listener):
    env, port, keys = listener
    r = local_ssh(port, None, user=env.user,
                  extra=("-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=yes",
                         "-o", "KbdInteractiveAuthentication=yes"))
    assert r.returncode == 255
    assert b"Permission denied (publickey)" in r.stderr
    # paramiko's "none" attempt is refused too, and publickey is all that is offered.
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.start_client(timeout=20)
        with pytest.raises(paramiko.BadAuthenticationType) as e:
            t.auth_none(env.user)
        assert e.value.allowed_types == ["publickey"]
    finally:
        t.close()


def test_local_listener_requires_the_agents_user(listener):
    env, port, keys = listener
    r = local_ssh(port, keys["good"], user="not-" + env.user)
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr


def test_tunnel_sessions_still_skip_auth_with_a_listener(listener):
    env, port, keys = listener
    r = env.ssh("echo via-tunnel")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"via-tunnel\n"
