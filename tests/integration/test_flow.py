"""Flow control end to end: a stalled consumer holds no more than a window of memory and does
not stall other streams; when it reads again, it gets every byte intact."""
import hashlib
import random
import socket
import struct
import threading
import time

import pytest

from conftest import echo_roundtrip, proc_rss_kib, recv_all, wait_until

MiB = 1024 * 1024
RSS_BOUND_KIB = 16 * 1024


def tcp_buffer_max():
    """The most the kernel may buffer on one loopback TCP connection: the receiver's and the
    sender's autotuning maxima (tcp_rmem, tcp_wmem)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open("/proc/sys/net/ipv4/" + name) as f:
            total += int(f.read().split()[2])
    return total


# What a stalled consumer may leave in flight: the kernel's buffers on the four TCP
# connections of the path (source -> agent -> relay -> forward -> consumer), whose
# autotuning alone made the stall point vary from 14 to 41 MB here, plus the tunnel's
# credit windows. The source sends twice as much, so that "no backpressure" cannot pass.
STALL_BOUND = 4 * tcp_buffer_max() + 8 * MiB
SOURCE_TOTAL = max(64 * MiB, 2 * STALL_BOUND)


def wait_stable(fn, settle=1.0, timeout=20.0):
    """Waits until fn() stops changing for `settle` seconds; returns the value."""
    deadline = time.monotonic() + timeout
    last = fn()
    since = time.monotonic()
    for _ in range(int(timeout / 0.1) + 10):
        time.sleep(0.1)
        v = fn()
        if v != last:
            last, since = v, time.monotonic()
        elif time.monotonic() - since >= settle:
            return v
        if time.monotonic() > deadline:
            break
    raise AssertionError("value kept changing for %.0fs (last %r)" % (timeout, last))


@pytest.mark.plain_build
def test_stalled_consumer_bounded_memory(harness, relay, agent, servers):
    src = servers.source(SOURCE_TOTAL, seed=31)
    echo = servers.echo()
    fwd_a = harness.forward(relay, "alpha", src.port)
    fwd_b = harness.forward(relay, "alpha", echo.port)
    pids = {"agent": agent.pid, "relay": relay.pid, "forward": fwd_a.proc.pid}

    # warm up the B path so one-time allocations are behind us
    echo_roundtrip(fwd_b.port, nbytes=8 * MiB, seed=1, timeout=60)
    before = {k: proc_rss_kib(p) for k, p in pids.items()}

    # stream A: read a little, then stop reading
    a = socket.create_connection(("127.0.0.1", fwd_a.port), timeout=60)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    a.settimeout(60)
    h = hashlib.sha256()
    head = recv_all(a, limit=64 * 1024)
    assert len(head) == 64 * 1024
    h.update(head)
    wait_until(lambda: 0 in src.sent, timeout=10, what="the source to start")

    # backpressure must reach the source: it stops sending well before the end
    stalled_at = wait_stable(lambda: src.sent[0], settle=1.5, timeout=30)
    assert stalled_at < STALL_BOUND, (
        "the source sent %d of %d bytes to a consumer that reads nothing: no backpressure"
        % (stalled_at, SOURCE_TOTAL))

    # meanwhile stream B moves 8 MiB intact
    echo_roundtrip(fwd_b.port, nbytes=8 * MiB, seed=2, timeout=60)
    time.sleep(1.0)
    after = {k: proc_rss_kib(p) for k, p in pids.items()}
    growth = {k: after[k] - before[k] for k in pids}
    print("stalled at %d bytes sent; RSS growth KiB: %r" % (stalled_at, growth))
    assert src.sent[0] < STALL_BOUND, "source kept sending while A was stalled"
    for k, g in growth.items():
        assert g < RSS_BOUND_KIB, "%s RSS grew by %d KiB while stream A was stalled" % (k, g)

    # A reads again: every byte, in order, then EOF
    n, digest = recv_all(a, hasher=h)
    a.close()
    wait_until(lambda: 0 in src.digests, timeout=30, what="the source to finish")
    assert n + len(head) == SOURCE_TOTAL, "A got %d of %d bytes" % (n + len(head), SOURCE_TOTAL)
    assert digest == src.digests[0]
    for k in ("agent", "relay"):
        assert (agent if k == "agent" else relay.proc).alive()


@pytest.mark.plain_build
def test_stalled_uploads_bounded_memory(harness, relay, agent, servers):
    """The reverse direction: many clients upload into targets that do not read. The client
    side is slowed down (its sends block) and agent/relay memory stays bounded."""
    stop = threading.Event()

    def blackhole(conn, idx):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stop.wait(120)

    hole = servers.custom(blackhole, rcvbuf=4096)
    fwd = harness.forward(relay, "alpha", hole.port)
    pids = {"agent": agent.pid, "relay": relay.pid, "forward": fwd.proc.pid}
    before = {k: proc_rss_kib(p) for k, p in pids.items()}
    n_conn = 8
    pushed = [0] * n_conn
    socks = []
    threads = []

    def pusher(i, s):
        chunk = b"\x5a" * 65536
        try:
            for _ in range(64 * 16):  # at most 64 MiB each
                s.sendall(chunk)
                pushed[i] += len(chunk)
        except OSError:
            pass

    try:
        for i in range(n_conn):
            s = socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            s.settimeout(60)
            socks.append(s)
            t = threading.Thread(target=pusher, args=(i, s), daemon=True)
            t.start()
            threads.append(t)
        total = wait_stable(lambda: sum(pushed), settle=2.0, timeout=40)
        after = {k: proc_rss_kib(p) for k, p in pids.items()}
        growth = {k: after[k] - before[k] for k in pids}
        print("pushed %d bytes into %d stalled uploads; RSS growth KiB: %r" % (
            total, n_conn, growth))
        assert total < n_conn * 32 * MiB, "uploads were not slowed down: %d bytes" % total
        for k, g in growth.items():
            # per stream: one window in the relay, a window of buffers in forward
            assert g < RSS_BOUND_KIB + n_conn * 1024, "%s RSS grew by %d KiB" % (k, g)
        assert relay.connected("alpha")
    finally:
        stop.set()
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        for t in threads:
            t.join(10)
