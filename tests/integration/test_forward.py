"""tether forward end to end: bulk integrity both ways, half close, concurrency, failures."""
import hashlib
import random
import socket
import struct
import threading
import time

import pytest

from conftest import (DataGen, connection_closed, echo_roundtrip, recv_all, wait_until)

MiB = 1024 * 1024
BULK = 256 * MiB


def test_echo_small(servers, agent, start_forward):
    echo = servers.echo()
    port = start_forward(echo.port)
    echo_roundtrip(port, nbytes=100)
    echo_roundtrip(port, nbytes=3 * MiB + 17)


def test_upload_256MiB_sha256(servers, agent, start_forward):
    """256 MiB of pseudo-random bytes to a hashing sink: the sink sees exactly what we sent."""
    sink = servers.sink(reply=True)
    port = start_forward(sink.port)
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.settimeout(120)
    h = hashlib.sha256()
    t0 = time.monotonic()
    try:
        for c in DataGen(11).chunks(BULK):
            s.sendall(c)
            h.update(c)
        s.shutdown(socket.SHUT_WR)
        # the sink answers after our EOF: the reverse direction works after a half close
        reply = recv_all(s, limit=1000)
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    n, digest = sink.wait_result(0, timeout=60)
    assert n == BULK, "sink got %d bytes, sent %d" % (n, BULK)
    assert digest == h.hexdigest()
    assert reply.decode().split() == [str(BULK), h.hexdigest()]
    print("upload 256 MiB in %.1fs (%.0f MB/s)" % (elapsed, BULK / elapsed / 1e6))


def test_download_256MiB_sha256(servers, agent, start_forward):
    """256 MiB from a source server: we receive exactly what it sent, then EOF."""
    src = servers.source(BULK, seed=12)
    port = start_forward(src.port)
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.settimeout(120)
    t0 = time.monotonic()
    try:
        n, digest = recv_all(s, hasher=hashlib.sha256())
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    assert n == BULK, "received %d bytes of %d" % (n, BULK)
    wait_until(lambda: 0 in src.digests, timeout=30, what="source to finish")
    assert digest == src.digests[0]
    print("download 256 MiB in %.1fs (%.0f MB/s)" % (elapsed, BULK / elapsed / 1e6))


def test_half_close_echo(servers, agent, start_forward):
    """Client sends, half-closes; the server echoes, sees EOF, then still sends a trailer
    and closes. Everything arrives, in order, then EOF."""
    echo = servers.echo(trailer=lambda total: b"TRAILER %d" % total)
    port = start_forward(echo.port)
    data = random.Random(5).randbytes(2 * MiB + 3)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.settimeout(60)
    got = {}

    def reader():
        got["data"] = recv_all(s)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    s.close()
    assert not t.is_alive(), "no EOF after the half close"
    expected = data + b"TRAILER %d" % len(data)
    assert len(got["data"]) == len(expected)
    assert got["data"] == expected


def test_half_close_server_first(servers, agent, start_forward):
    """The server half-closes first (sends a banner, SHUT_WR); the client can still send and
    the server still receives everything, then answers on the other connection's EOF."""
    results = {}

    def handler(conn, idx):
        conn.sendall(b"BANNER")
        conn.shutdown(socket.SHUT_WR)
        h = hashlib.sha256()
        n = 0
        while True:
            b = conn.recv(65536)
            if not b:
                break
            h.update(b)
            n += len(b)
        results[idx] = (n, h.hexdigest())

    srv = servers.custom(handler)
    port = start_forward(srv.port)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.settimeout(60)
    assert recv_all(s) == b"BANNER"  # then EOF from the server's half close
    data = random.Random(9).randbytes(MiB)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    wait_until(lambda: 0 in results, timeout=30, what="server to get the client's bytes")
    assert results[0] == (len(data), hashlib.sha256(data).hexdigest())
    # the forward closes the client connection once both directions are done
    assert connection_closed(s, timeout=15)
    s.close()


def test_100_concurrent_connections(servers, agent, start_forward):
    """100 connections at once, 1 MiB each way, all echoed intact."""
    echo = servers.echo()
    port = start_forward(echo.port)
    n_conn = 100
    size = MiB
    errors = []
    ok = []
    lock = threading.Lock()

    def client(i):
        try:
            data = random.Random(1000 + i).randbytes(size)
            s = socket.create_connection(("127.0.0.1", port), timeout=120)
            s.settimeout(120)
            res = {}

            def reader():
                res["got"] = recv_all(s)

            rt = threading.Thread(target=reader, daemon=True)
            rt.start()
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            rt.join(150)
            s.close()
            if rt.is_alive():
                raise AssertionError("conn %d: no EOF" % i)
            if res.get("got") != data:
                raise AssertionError("conn %d: got %d bytes, mismatch" % (i, len(res.get("got") or b"")))
            with lock:
                ok.append(i)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_conn)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, 200 - (time.monotonic() - t0)))
    alive = sum(t.is_alive() for t in threads)
    assert alive == 0, "%d clients still running after 200s" % alive
    assert not errors, errors[:10]
    assert len(ok) == n_conn
    assert echo.accepted == n_conn
    assert not echo.errors, echo.errors[:5]


def refused_promptly(port):
    """Connects and expects the forward to close the connection. Under load the forward's
    reset can overtake connect() itself (ECONNRESET from connect): that is closed too."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionResetError:
        return True
    try:
        return connection_closed(s, timeout=15)
    finally:
        s.close()


def test_nothing_listening_refused(harness, relay, agent):
    from conftest import free_port
    port_closed = free_port()
    fwd = harness.forward(relay, "alpha", port_closed)
    port = fwd.port
    fwd = fwd.proc
    assert refused_promptly(port), "client connection not closed"
    wait_until(lambda: "connection refused" in fwd.stderr(), timeout=10,
               what="forward to report 'connection refused'")
    assert fwd.alive()
    # still serves the next connection
    assert refused_promptly(port)


def test_workspace_offline(harness, relay):
    """No agent for alpha: the connection is closed and the forward says 'offline'."""
    f = harness.forward(relay, "alpha", 9)
    fwd = f.proc
    s = socket.create_connection(("127.0.0.1", f.port), timeout=30)
    try:
        assert connection_closed(s, timeout=15)
    finally:
        s.close()
    wait_until(lambda: "offline" in fwd.stderr(), timeout=10, what="forward to report offline")
    assert "alpha" in fwd.stderr()
    assert fwd.alive()


def test_forward_bad_token(harness, relay, agent, servers):
    echo = servers.echo()
    fwd = harness.forward(relay, "alpha", echo.port, token_file=harness.tokens.bogus_file())
    s = fwd.connect()
    try:
        assert connection_closed(s, timeout=15)
    finally:
        s.close()
    wait_until(lambda: "401" in fwd.proc.stderr(), timeout=10, what="forward to report 401")
    secret = harness.tokens.bogus_file().read_text().strip()
    assert secret not in fwd.proc.stderr()
    assert echo.accepted == 0


def test_forward_forbidden_workspace(harness, relay, agent, servers):
    """A user token limited to alpha cannot reach beta: 404, nothing connects."""
    from conftest import ONLY_A
    harness.agent(relay, "beta")
    echo = servers.echo()
    fwd = harness.forward(relay, "beta", echo.port, token_file=harness.tokens.user_file(ONLY_A))
    s = fwd.connect()
    try:
        assert connection_closed(s, timeout=15)
    finally:
        s.close()
    wait_until(lambda: "404" in fwd.proc.stderr(), timeout=10, what="forward to report 404")
    assert echo.accepted == 0


def test_forward_survives_client_reset(servers, agent, start_forward, relay):
    """A client that resets mid-transfer: the agent closes the target connection, and the
    next connection works."""
    closed = threading.Event()

    def endless(conn, idx):
        chunk = b"\x42" * 65536
        try:
            for _ in range(16 * 1024):  # bounded: 1 GiB
                conn.sendall(chunk)
        except OSError:
            pass
        closed.set()

    src = servers.custom(endless)
    echo = servers.echo()
    port = start_forward(src.port)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.settimeout(30)
    assert len(recv_all(s, limit=MiB)) == MiB
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
    s.close()
    assert closed.wait(15), "the target connection stayed open after the client reset"
    port2 = start_forward(echo.port)
    echo_roundtrip(port2, nbytes=MiB)
    assert relay.connected("alpha")


def fd_count(pid):
    import os
    return len(os.listdir("/proc/%d/fd" % pid))


def test_no_fd_leak_after_many_connections(harness, relay, agent, servers):
    """300 short connections (normal, refused, client reset) leave no file descriptors
    behind in the agent, the relay or the forward."""
    from conftest import free_port
    echo = servers.echo()
    ok = harness.forward(relay, "alpha", echo.port)
    refused = harness.forward(relay, "alpha", free_port())
    pids = {"agent": agent.pid, "relay": relay.pid, "forward": ok.proc.pid,
            "forward-refused": refused.proc.pid}
    echo_roundtrip(ok.port, nbytes=1000)  # warm up
    before = {k: fd_count(p) for k, p in pids.items()}
    for i in range(100):
        echo_roundtrip(ok.port, nbytes=1000 + i, seed=i)
    for i in range(100):
        assert refused_promptly(refused.port)
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", ok.port), timeout=30)
        s.sendall(b"x" * 1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def settled():
        now = {k: fd_count(p) for k, p in pids.items()}
        return now if all(now[k] <= before[k] + 2 for k in pids) else None
    try:
        wait_until(settled, timeout=20, what="file descriptors to be released")
    except AssertionError:
        now = {k: fd_count(p) for k, p in pids.items()}
        raise AssertionError("fd counts before %r, after %r" % (before, now))


def test_forward_explicit_bind_address(harness, relay, agent, servers):
    echo = servers.echo()
    args = [harness.bin, "forward", "--url", relay.url, "--token-file",
            harness.tokens.user_file(), "alpha", "127.0.0.1:0:%d" % echo.port]
    proc = harness.procs.start("forward-bind", args)
    from conftest import FORWARD_RE
    m = wait_until(lambda: FORWARD_RE.search(proc.stdout()), timeout=15,
                   what="forward to listen")
    assert m.group(2) == "alpha" and int(m.group(3)) == echo.port
    echo_roundtrip(int(m.group(1)), nbytes=64 * 1024)


def test_forward_env_url_and_token(harness, relay, agent, servers):
    """TETHER_URL and TETHER_TOKEN instead of flags."""
    import os
    echo = servers.echo()
    env = dict(os.environ, TETHER_URL=relay.url, TETHER_TOKEN=harness.tokens.user_token())
    env.pop("TETHER_TOKEN_FILE", None)
    proc = harness.procs.start("forward-env", [harness.bin, "forward", "alpha",
                                               "0:%d" % echo.port], env=env)
    from conftest import FORWARD_RE
    m = wait_until(lambda: FORWARD_RE.search(proc.stdout()), timeout=15,
                   what="forward to listen")
    echo_roundtrip(int(m.group(1)), nbytes=64 * 1024)
