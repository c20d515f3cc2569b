"""The agent's forward policy: port forwards reach loopback by default, `--forward-allow
CIDR:PORTS` widens that, and a denied target is refused before any connect: a tcp stream
with OPEN_FAIL FORBIDDEN "administratively prohibited: HOST:PORT is not allowed
(--forward-allow)", an SSH direct-tcpip channel (ssh -L, ssh -D) with
SSH_OPEN_ADMINISTRATIVELY_PROHIBITED. Each refusal is one info line in the agent's log.

The non-loopback targets are this host's own addresses (a listener bound there), so the
only thing between the agent and the target is the policy; without such an address the
tests that need one are skipped.
"""
import json
import socket
import struct
import subprocess
import threading

import pytest

import tetherproto as tp
from conftest import echo_handler, echo_roundtrip, free_port, wait_until
from test_hostile_relay import FakeRelay, agent_handshake, run

REFUSAL = "administratively prohibited: %s is not allowed (--forward-allow)"


def host_addresses(family):
    """This host's global-scope addresses of family ("inet" or "inet6") that a socket can
    bind, from `ip -j addr`; [] if there are none or `ip` is missing."""
    try:
        r = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                           timeout=10)
        links = json.loads(r.stdout) if r.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    found = []
    for link in links:
        for a in link.get("addr_info", []):
            if a.get("family") != family or a.get("scope") != "global" or a.get("tentative"):
                continue
            addr = a.get("local")
            s = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET)
            try:
                s.bind((addr, 0))
                found.append(addr)
            except OSError:
                pass
            finally:
                s.close()
    return found


@pytest.fixture(scope="module")
def host_ip():
    addrs = host_addresses("inet")
    if not addrs:
        pytest.skip("this host has no non-loopback IPv4 address to forward to")
    return addrs[0]


@pytest.fixture(scope="module")
def host_ip6():
    addrs = host_addresses("inet6")
    if not addrs:
        pytest.skip("this host has no global IPv6 address to forward to")
    return addrs[0]


class EchoAt:
    """An echo server on one address (IPv4 or IPv6); counts the connections it accepts."""

    def __init__(self, addr):
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._handler = echo_handler()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def target(self):
        """HOST:PORT as the agent names it in its refusals."""
        return ("[%s]:%d" if ":" in self.addr else "%s:%d") % (self.addr, self.port)

    def _loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(30)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._handler(conn, self.accepted)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def echo_at():
    started = []

    def start(addr):
        e = EchoAt(addr)
        started.append(e)
        return e
    yield start
    for e in started:
        e.close()


# ---- tcp streams, from a scripted relay ----

async def open_answer(peer, sid, port, host):
    """Sends OPEN tcp host:port on stream sid; returns the agent's answer frame."""
    await peer.send(tp.open_tcp_frame(sid, port, host))
    return await peer.until(
        lambda f: f.stream == sid and f.type in (tp.OPEN_OK, tp.OPEN_FAIL, tp.RST),
        what="the answer to OPEN %d (%s:%d)" % (sid, host, port))


async def echo_on(peer, sid, data=b"through the policy"):
    """Sends data + FIN on an open stream sid and expects the same bytes + FIN back."""
    st = peer.stream(sid)
    await peer.send(tp.data_frame(sid, data, fin=True))
    await peer.until_state(lambda: st.fin or st.rst is not None, what="echo on %d" % sid)
    assert st.rst is None, st.rst
    assert bytes(st.data) == data


def start_agent(harness, fake, extra=()):
    return harness.agent(None, "alpha", wait=False, url="ws://127.0.0.1:%d" % fake.port,
                         extra=extra)


def test_relay_tcp_to_loopback_works_by_default(harness, relay, servers, start_forward):
    """The real relay asks for 127.0.0.1:PORT: an agent with no --forward-allow serves it."""
    echo = servers.echo()
    harness.agent(relay, "alpha")
    port = start_forward(echo.port)
    echo_roundtrip(port, nbytes=1024 * 1024, seed=11)


def test_hostile_relay_gets_open_fail_for_non_loopback_targets(harness, servers):
    """A relay that asks for anything but loopback gets OPEN_FAIL FORBIDDEN with the reason,
    nothing is dialed, the tunnel goes on, and loopback (also as "localhost" and ::1) still
    works on it."""
    echo = servers.echo()
    addrs = host_addresses("inet") + host_addresses("inet6")
    targets = [EchoAt(a) for a in addrs[:2]]
    echo6 = EchoAt("::1")
    denied = [(t.addr, t.port) for t in targets] + [
        ("10.0.0.1", 5432), ("169.254.169.254", 80), ("0.0.0.0", echo.port),
        ("::ffff:10.1.2.3", 80), ("fd00::1", 22), ("::", echo.port)]

    async def go():
        fake = await FakeRelay().start()
        proc = start_agent(harness, fake)
        try:
            peer = await agent_handshake(fake, harness)
            sid = 2
            for host, port in denied:
                f = await open_answer(peer, sid, port, host)
                assert f.type == tp.OPEN_FAIL, "OPEN %s:%d answered %r" % (host, port, f)
                want = REFUSAL % (("[%s]:%d" if ":" in host else "%s:%d") % (host, port))
                assert f.reason() == (tp.CODE_FORBIDDEN, want)
                sid += 2
            assert peer.goaway is None
            for host, port in (("127.0.0.1", echo.port), ("localhost", echo.port),
                               ("::1", echo6.port)):
                f = await open_answer(peer, sid, port, host)
                assert f.type == tp.OPEN_OK, "OPEN %s answered %r" % (host, f)
                await echo_on(peer, sid)
                sid += 2
            # All of 127/8 is loopback: allowed, so the connect itself answers (nothing
            # listens there).
            f = await open_answer(peer, sid, echo.port, "127.3.2.1")
            assert f.type == tp.OPEN_FAIL and f.reason()[0] == tp.CODE_REFUSED, f
            return proc
        finally:
            await fake.stop()
    try:
        proc = run(go())
        assert all(t.accepted == 0 for t in targets), "a denied target was dialed"
        log = proc.stderr()
        for host, port in denied:
            what = REFUSAL % (("[%s]:%d" if ":" in host else "%s:%d") % (host, port))
            assert log.count("tcp forward refused: " + what) == 1, log[-3000:]
    finally:
        for t in targets + [echo6]:
            t.close()


def test_forward_allow_widens_tcp_streams(harness, echo_at, host_ip):
    """--forward-allow HOST/32:PORT lets the relay reach that address and port, and no
    other port of it."""
    target = echo_at(host_ip)
    other = echo_at(host_ip)

    async def go():
        fake = await FakeRelay().start()
        start_agent(harness, fake, extra=["--forward-allow", "%s/32:%d" % (host_ip, target.port)])
        try:
            peer = await agent_handshake(fake, harness)
            f = await open_answer(peer, 2, target.port, host_ip)
            assert f.type == tp.OPEN_OK, f
            await echo_on(peer, 2)
            f = await open_answer(peer, 4, other.port, host_ip)
            assert f.reason() == (tp.CODE_FORBIDDEN, REFUSAL % other.target)
        finally:
            await fake.stop()
    run(go())
    assert target.accepted == 1 and other.accepted == 0


# ---- SSH: ssh -L and ssh -D ----

def listening(port):
    """Does a socket listen on port (read from /proc: connecting to an ssh -L or -D port
    would itself open a channel, and a refusal, in the agent)?"""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port(port, timeout=15):
    wait_until(lambda: listening(port), timeout=timeout, what="port %d to listen" % port)


def closed_without_data(sock, timeout=10):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def echoes(sock, data=b"hello through ssh", timeout=10):
    sock.settimeout(timeout)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        b = sock.recv(len(data) - len(got))
        if not b:
            break
        got += b
    return got == data


class LocalForward:
    """`ssh -v -N -L PORT:HOST:HOSTPORT` through the agent; stderr kept for the reason."""

    def __init__(self, env, host, hostport):
        self.port = free_port()
        h = "[%s]" % host if ":" in host else host
        argv = ["ssh", "-v", "-F", str(env.config), "-N", "-L",
                "%d:%s:%d" % (self.port, h, hostport), env.host]
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True)
        wait_port(self.port)

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self):
        """Kills ssh; returns its stderr (once; later calls return "")."""
        if self.p.returncode is not None:
            return ""
        self.p.kill()
        return self.p.communicate(timeout=10)[1].decode(errors="replace")


@pytest.fixture
def local_forward(ssh_env):
    started = []

    def start(host, hostport):
        f = LocalForward(ssh_env, host, hostport)
        started.append(f)
        return f
    yield start
    for f in started:
        f.stop()


def test_ssh_local_forward_to_loopback_and_localhost(ssh_env, local_forward, servers):
    echo = servers.echo()
    for host in ("127.0.0.1", "localhost"):
        s = local_forward(host, echo.port).connect()
        try:
            assert echoes(s), host
        finally:
            s.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ssh_local_forward_to_a_non_loopback_address(ssh_env, local_forward, echo_at, family,
                                                     request):
    """-L to this host's own non-loopback address: refused with "administratively
    prohibited" (and one log line) by default; allowed once --forward-allow covers it."""
    addr = request.getfixturevalue("host_ip" if family == "ipv4" else "host_ip6")
    target = echo_at(addr)
    fwd = local_forward(addr, target.port)
    s = fwd.connect()
    try:
        assert closed_without_data(s)
    finally:
        s.close()
    what = "ssh: forward refused: " + REFUSAL % target.target
    wait_until(lambda: what in ssh_env.agent_log(), timeout=10, what="the agent's refusal line")
    err = fwd.stop()
    assert "administratively prohibited" in err, err[-2000:]
    assert target.accepted == 0
    assert ssh_env.agent.stderr().count(what) == 1
    # The SSH connection itself was fine throughout.
    assert ssh_env.ssh("echo still serving").stdout == b"still serving\n"

    rule = ("%s/32:%d" if family == "ipv4" else "[%s]/128:%d") % (addr, target.port)
    ssh_env.restart_agent(extra=["--forward-allow", rule])
    s = local_forward(addr, target.port).connect()
    try:
        assert echoes(s)
    finally:
        s.close()
    assert target.accepted == 1
    # Another port of the same address is still refused.
    other = echo_at(addr)
    s = local_forward(addr, other.port).connect()
    try:
        assert closed_without_data(s)
    finally:
        s.close()
    assert other.accepted == 0


def socks5_connect(port, host, dport):
    """A SOCKS5 CONNECT through ssh -D on port. Returns the socket once ssh answered
    success (it does so after the agent accepted the channel), or None if ssh closed the
    connection instead (the channel open was refused)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    if host == "localhost":
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    elif ":" in host:
        addr = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    else:
        addr = b"\x01" + socket.inet_aton(host)
    s.sendall(b"\x05\x01\x00" + addr + struct.pack(">H", dport))
    try:
        head = s.recv(4)
    except ConnectionResetError:
        head = b""
    if not head:
        s.close()
        return None
    assert len(head) == 4 and head[:2] == b"\x05\x00", head
    size = {1: 4, 4: 16}.get(head[3])
    if head[3] == 3:
        size = s.recv(1)[0]
    assert size is not None, head
    s.recv(size + 2)
    return s


def test_ssh_dynamic_forward_obeys_the_policy(ssh_env, echo_at, servers, host_ip):
    """ssh -D: loopback (by address and as "localhost") works, this host's other address is
    refused until --forward-allow covers it."""
    echo = servers.echo()
    target = echo_at(host_ip)
    what = "ssh: forward refused: " + REFUSAL % target.target

    for allowed in (False, True):
        if allowed:
            ssh_env.restart_agent(extra=["--forward-allow", "%s/24:%d" % (host_ip, target.port)])
        port = free_port()
        p = subprocess.Popen(["ssh", "-F", str(ssh_env.config), "-N", "-D",
                              "127.0.0.1:%d" % port, ssh_env.host],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port)
            for host in ("127.0.0.1", "localhost"):
                s = socks5_connect(port, host, echo.port)
                assert s is not None, host
                try:
                    assert echoes(s), host
                finally:
                    s.close()
            s = socks5_connect(port, host_ip, target.port)
            if allowed:
                assert s is not None
                try:
                    assert echoes(s)
                finally:
                    s.close()
            else:
                assert s is None
        finally:
            p.kill()
            p.wait(timeout=10)
        if not allowed:
            wait_until(lambda: what in ssh_env.agent_log(), timeout=10,
                       what="the agent's refusal line")
            assert target.accepted == 0
    assert target.accepted == 1


# ---- the option itself ----

@pytest.mark.parametrize("value,said", [
    ("db.internal:5432", "host name"),
    ("localhost:22", "host name"),
    ("10.0.0.0/8", "CIDR:PORTS"),
    ("10.0.0.0/33:80", "prefix"),
    ("fd00::/8:80", "brackets"),
    ("[fd00::]/8:", "no ports"),
    ("10.0.0.0/8:0", "1..65535"),
    ("10.0.0.0/8:80-70", "N <= M"),
    ("", "no address"),
])
def test_bad_forward_allow_exits_2_with_one_line(harness, tmp_path, value, said):
    r = harness.run("agent", "--url", "ws://127.0.0.1:9", "--token-file",
                    harness.tokens.agent_file("alpha"), "--state-dir", tmp_path / "state",
                    "--forward-allow", "127.0.0.0/8:1-65535", "--forward-allow", value)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tether: bad --forward-allow '%s': " % value), lines[0]
    assert said in lines[0], lines[0]


def test_too_many_forward_allow_rules_exit_2(harness, tmp_path):
    args = []
    for i in range(65):
        args += ["--forward-allow", "10.0.%d.0/24:80" % i]
    r = harness.run("agent", "--url", "ws://127.0.0.1:9", "--token-file",
                    harness.tokens.agent_file("alpha"), "--state-dir", tmp_path / "state", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "at most 64 rules" in r.stderr, r.stderr


def test_help_names_the_option(harness):
    r = harness.run("agent", "--help")
    assert r.returncode == 0
    assert "--forward-allow CIDR:PORTS" in r.stdout
