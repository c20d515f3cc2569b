"""Load (issue 6), in CI sizes: 1,020 concurrent tcp streams through one agent, 200
concurrent SSH sessions, 600 connections through one `tether forward`, one relay with 500
agents and its heartbeats on time.

The scripts in tests/load run the same loads at full size and report figures; these tests
reuse their clients (imported from there) and assert only that the load is held: every
stream and session up, byte-exact echoes, all held open together, clean ends, every
workspace connected and fresh in GET /api/v1/workspaces. Nothing here asserts timing
beyond generous bounds; memory only with generous bounds, and not under sanitizers
(TETHER_SANITIZED set).

The relay, agent and forward under load start with the soft RLIMIT_NOFILE of 1024 that
systemd gives services (and what they start) by default, the hard limit above it: 1,020 streams
need about 1,033 descriptors in the agent and in the relay, 200 SSH sessions about 1,213 in
the agent, 600 connections about 1,213 in `tether forward`, so each must raise its own soft
limit (agent/main.c), and the agent give its children the old one back.
"""
import argparse
import asyncio
import importlib.machinery
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (FORWARD_RE, LISTEN_RE, REPO_ROOT, Forward, Relay, SshEnv, proc_rss_kib,
                      proc_status_kib, wait_until, write_private)

LOAD_DIR = REPO_ROOT / "tests" / "load"
SANITIZED = bool(os.environ.get("TETHER_SANITIZED"))
STARTING_NOFILE = 1024      # the soft limit relay, agent and forward start with
NEED_HARD = 4096            # the hard limit this module needs (else it is skipped)
STREAMS = 1020              # below the agent's max_streams (1024); more than 1024 fds
# 200 sessions set up on 2 cores in 12-25 s with the plain build; under sanitizers the
# clients' ssh-proxy processes (the same instrumented binary) take minutes between them
SSH_SESSIONS = 50 if SANITIZED else 200
SSH_SETUP_CONCURRENCY = 32  # sessions setting up at once (all 200 are then open together)
FORWARD_CONNECTIONS = 600   # two descriptors each in `tether forward`
AGENTS = 500
MiB = 1024                  # in KiB, the unit of VmRSS


def load_script(name):
    """A script of tests/load (no .py) as a module; its main() does not run."""
    loader = importlib.machinery.SourceFileLoader("load_" + name, str(LOAD_DIR / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


streams_mod = load_script("streams")
ssh_mod = load_script("ssh_sessions")
agents_mod = load_script("agents")
loadlib = sys.modules["loadlib"]


@pytest.fixture(scope="module", autouse=True)
def nofile():
    """This process holds a websocket per stream and the relay inherits its limit: raise the
    soft limit (the agents get STARTING_NOFILE from prlimit). Restored at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEED_HARD:
        pytest.skip("RLIMIT_NOFILE hard limit %d < %d" % (hard, NEED_HARD))
    want = NEED_HARD * 2 if hard == resource.RLIM_INFINITY else min(hard, NEED_HARD * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def limited(args, hard):
    """args run under prlimit with the usual soft limit (prlimit execs: same pid)."""
    hard = NEED_HARD * 2 if hard == resource.RLIM_INFINITY else hard
    return ["prlimit", "--nofile=%d:%d" % (STARTING_NOFILE, hard), "--"] + [str(a) for a in args]


def limited_relay(harness, hard, extra=()):
    """The relay, started with the usual soft limit; waits until its API answers."""
    proc = harness.procs.start("relay", limited([
        harness.bin, "relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path] +
        list(extra), hard))
    m = wait_until(lambda: LISTEN_RE.search(proc.stderr()) or not proc.alive(), timeout=15,
                   what="the relay to listen")
    assert proc.alive(), proc.describe()
    relay = Relay(proc, int(m.group(1)), harness.tokens)
    wait_until(lambda: relay.api("/api/v1/workspaces")[0] == 200, timeout=15,
               what="the relay's API to answer")
    return relay


def limited_agent(harness, relay, hard, state_dir):
    agent = harness.procs.start("agent-alpha", limited([
        harness.bin, "agent", "--url", relay.url, "--token-file",
        harness.tokens.agent_file("alpha"), "--state-dir", state_dir], hard))
    wait_until(lambda: relay.connected("alpha") or not agent.alive(), timeout=20,
               what="the agent to connect")
    assert agent.alive(), agent.describe()
    return agent


def start_echo(procs, tmp):
    port_file = Path(tmp) / "echo.port"
    p = procs.start("echo", [sys.executable, str(LOAD_DIR / "loadlib.py"), "echo-server",
                             str(port_file)])
    wait_until(lambda: port_file.exists() or not p.alive(), timeout=15, what="the echo server")
    assert p.alive(), p.describe()
    return int(port_file.read_text())


def rss_and_fds(pid):
    m = loadlib.proc_mem(pid)
    return m["VmRSS"], m["fds"]


def test_1020_streams_through_one_agent(harness, procs, tokens, tmp_path, nofile):
    """1,020 websockets to /tcp/ECHO at once through a relay and an agent that start with a
    soft limit of 1024: each echoes 8 KiB byte-exact, all are held open together (the relay
    counts 1,020 forward sessions), echo 8 KiB more and end cleanly (FIN both ways, close
    1000); the agent's descriptors come back."""
    relay = limited_relay(harness, nofile, extra=["--stats-interval", "1"])
    agent = limited_agent(harness, relay, nofile, tmp_path / "state")
    echo_port = start_echo(procs, tmp_path)
    url = "%s/api/v1/workspaces/alpha/tcp/%d" % (relay.url, echo_port)
    user = tokens.user_token()
    streams = [streams_mod.Stream(i) for i in range(STREAMS)]
    seen = {}

    async def go():
        warm = streams_mod.Stream(-1)
        ev = asyncio.Event()
        ev.set()
        await streams_mod.one_stream(warm, url, user, 1024, lambda: None, ev, 60)
        assert not warm.error, warm.error
        await asyncio.sleep(0.5)
        seen["idle"] = (rss_and_fds(agent.pid), rss_and_fds(relay.pid))
        count = [0]
        all_in = asyncio.Event()

        def echoed():
            count[0] += 1
            if count[0] == STREAMS:
                all_in.set()

        hold = asyncio.Event()
        tasks = [asyncio.ensure_future(streams_mod.one_stream(s, url, user, 8192, echoed, hold,
                                                              90)) for s in streams]
        for _ in range(1200):
            if all_in.is_set() or all(s.round1 or s.error for s in streams):
                break
            await asyncio.sleep(0.1)
        seen["held"] = sum(1 for s in streams if s.round1 and not s.error)
        if seen["held"] == STREAMS:
            # all open together: the relay's stats show them, and they stay open a while
            loop = asyncio.get_running_loop()
            for _ in range(100):
                doc = await loop.run_in_executor(None, relay.workspace, "alpha")
                if doc.get("sessions", {}).get("forward") == STREAMS:
                    seen["forward"] = STREAMS
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            seen["open"] = (rss_and_fds(agent.pid), rss_and_fds(relay.pid))
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(asyncio.wait_for(go(), 240))
    bad = {}
    for s in streams:
        if not (s.round1 and s.round2 and s.eof and s.close_code == 1000 and not s.error):
            bad.setdefault(s.error or "incomplete in %s" % s.phase, []).append(s.i)
    assert not bad, "%d of %d streams failed: %s\nagent log:\n%s" % (
        sum(map(len, bad.values())), STREAMS,
        {k: (len(v), v[:5]) for k, v in bad.items()}, agent.stderr()[-2000:])
    assert seen.get("forward") == STREAMS, "the relay never counted %d forward sessions" % (
        STREAMS)
    (a_rss0, a_fds0), (r_rss0, _) = seen["idle"]
    (a_rss1, a_fds1), (r_rss1, _) = seen["open"]
    assert a_fds1 >= a_fds0 + STREAMS, "the agent held %d fds with %d streams open" % (
        a_fds1, STREAMS)
    wait_until(lambda: rss_and_fds(agent.pid)[1] <= a_fds0 + 4, timeout=20,
               what="the agent's fds to come back (%d before)" % a_fds0)
    assert agent.alive() and relay.proc.alive()
    print("\n%d streams: agent %d -> %d KiB, relay %d -> %d KiB, agent fds %d -> %d" % (
        STREAMS, a_rss0, a_rss1, r_rss0, r_rss1, a_fds0, a_fds1))
    if not SANITIZED:
        # issue 7's goal is 64 MiB in all for 1,000 idle streams; measured about 60
        assert a_rss1 - a_rss0 < 48 * MiB, "agent grew %d KiB" % (a_rss1 - a_rss0)
        assert a_rss1 + r_rss1 < 128 * MiB, "agent + relay: %d KiB" % (a_rss1 + r_rss1)


@pytest.mark.plain_build
def test_memory_comes_back_after_1000_streams_close(tether_bin, tmp_path, nofile):
    """tests/load/streams: 1,000 streams open, echo and close; 2.5 s later (past the agent's
    stats tick, 1 s there, and the relay's 500 ms tick) both give their free heap pages back:
    glibc alone kept about 9 MB of the agent's and 18 MB of the relay's."""
    out = tmp_path / "streams.json"
    r = subprocess.run([sys.executable, str(LOAD_DIR / "streams"), "--streams", "1000",
                        "--hold", "1", "--tether", str(tether_bin), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["streams"] == 1000 and doc["held"] and doc["failed"] == 0, doc
    grew = {k: doc["open"][k]["RssAnon"] - doc["idle"][k]["RssAnon"] for k in doc["idle"]}
    kept = {k: doc["after"][k]["RssAnon"] - doc["idle"][k]["RssAnon"] for k in doc["idle"]}
    print("\nRssAnon KiB grown with 1000 open %s, kept after closing %s" % (grew, kept))
    for k in ("agent", "relay"):
        assert grew[k] > 6 * MiB, "%s grew only %d KiB with 1000 streams" % (k, grew[k])
        assert kept[k] < 3 * MiB, "%s kept %d KiB of the %d KiB it grew" % (k, kept[k], grew[k])


@pytest.mark.plain_build
def test_memory_comes_back_after_a_download(harness, servers):
    """64 MiB downloaded through one forward stream, then the agent idle past its stats
    tick (1 s here): it gives back the heap's free pages and those of the tunnel's 1 MiB
    output buffer, which big batches touch (dial_trim). The agent's anonymous memory ends
    within 128 KiB of what it was before the download (0 here); without dial_trim it kept
    260 KiB."""
    relay = harness.relay(extra=["--stats-interval", "1"])
    agent = harness.agent(relay)
    src = servers.source(64 * 1024 * 1024, seed=41)
    fwd = harness.forward(relay, "alpha", src.port)
    time.sleep(2.5)  # past the agent's stats tick after start-up
    before = proc_status_kib(agent.pid, "RssAnon")
    s = socket.create_connection(("127.0.0.1", fwd.port), timeout=60)
    s.settimeout(60)
    try:
        n = 0
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            n += len(b)
    finally:
        s.close()
    assert n == 64 * 1024 * 1024, n
    wait_until(lambda: relay.workspace("alpha").get("sessions", {}).get("forward") == 0,
               timeout=15, what="the forward session to end")
    time.sleep(2.5)  # two stats ticks with nothing open
    after = proc_status_kib(agent.pid, "RssAnon")
    print("\nagent RssAnon before %d KiB, after 64 MiB down and idle %d KiB" % (before, after))
    assert after - before < 128, "the agent kept %d KiB after a 64 MiB download" % (
        after - before)


def test_200_ssh_sessions(harness, tmp_path, nofile):
    """200 OpenSSH clients (each its own connection through ssh-proxy, at most 32 setting up
    at a time) to an agent that starts with a soft limit of 1024, each running cat: every
    first line echoes, all are held open together, a second round of 4 KiB echoes
    byte-exact, ssh exits 0; the sessions' own limit is the one the agent was started
    with. (50 sessions under sanitizers.)"""
    env = SshEnv(harness, tmp_path / "ssh")
    env.stop_agent()
    agent = env.procs.start("agent-alpha-limited", limited(env.agent_args(), nofile))
    wait_until(lambda: env.relay.connected("alpha") or not agent.alive(), timeout=20,
               what="the agent to connect")
    assert agent.alive(), agent.describe()
    env.agent = agent
    argv = env.ssh_argv("cat")
    logdir = tmp_path / "ssh-logs"
    logdir.mkdir()
    sessions = [ssh_mod.Session(i) for i in range(SSH_SESSIONS)]
    seen = {}

    async def go():
        seen["idle"] = rss_and_fds(agent.pid)
        count = [0]
        all_up = asyncio.Event()

        def up():
            count[0] += 1
            if count[0] == SSH_SESSIONS:
                all_up.set()

        hold = asyncio.Event()
        gate = asyncio.Semaphore(SSH_SETUP_CONCURRENCY)
        tasks = [asyncio.ensure_future(ssh_mod.one_session(s, argv, logdir, 4096, hold, 120,
                                                           up, gate)) for s in sessions]
        for _ in range(1500):
            if all_up.is_set() or all(s.round1 or s.error for s in sessions):
                break
            await asyncio.sleep(0.1)
        if all_up.is_set():
            await asyncio.sleep(1.0)
            seen["open"] = rss_and_fds(agent.pid)
            seen["children"] = len(loadlib.children(agent.pid))
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 150)

    try:
        asyncio.run(asyncio.wait_for(go(), 300))
    finally:
        for s in sessions:
            if s.proc is not None and s.proc.returncode is None:
                os.killpg(s.proc.pid, 9)
    bad = {}
    for s in sessions:
        if not (s.round1 and s.round2 and s.rc == 0 and not s.error):
            bad.setdefault(s.error or "incomplete in %s (rc %s)" % (s.phase, s.rc),
                           []).append(s.i)
    assert not bad, "%d of %d sessions failed: %s\nagent log:\n%s" % (
        sum(map(len, bad.values())), SSH_SESSIONS,
        {k: (len(v), v[:5]) for k, v in bad.items()}, env.agent_log())
    assert seen["children"] >= SSH_SESSIONS, "the agent had %d children with %d sessions" % (
        seen["children"], SSH_SESSIONS)
    rss0, fds0 = seen["idle"]
    rss1, fds1 = seen["open"]
    print("\n%d SSH sessions: agent %d -> %d KiB, fds %d -> %d" % (SSH_SESSIONS, rss0, rss1,
                                                                   fds0, fds1))
    wait_until(lambda: not loadlib.children(agent.pid), timeout=20,
               what="the sessions' processes to end")
    # the agent raised its own limit; its sessions have the one it was started with
    r = env.ssh("ulimit -n", timeout=60)
    assert r.returncode == 0 and r.stdout.decode().strip() == str(STARTING_NOFILE), \
        "a session's soft RLIMIT_NOFILE: %r %r" % (r.stdout, r.stderr)
    if not SANITIZED:
        # tests/bench/run_ssh's goal: 256 KiB per idle session; measured about 30
        assert rss1 - rss0 < SSH_SESSIONS * 256, "agent grew %d KiB" % (rss1 - rss0)


async def _forward_client(port, i, results, hold, nbytes=4096):
    data = os.urandom(nbytes)
    w = None
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        w.write(data)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(nbytes), 60)
        results[i] = "echoed" if got == data else "bytes differ"
        await hold.wait()
        w.write_eof()   # half close: FIN through the tunnel, the echo server's EOF back
        rest = await asyncio.wait_for(r.read(), 60)
        results[i] = "ok" if not rest else "%d bytes after EOF" % len(rest)
    except Exception as e:  # noqa: BLE001 - counted per connection
        results[i] = "%s in state %s" % (repr(e)[:120], results.get(i, "connecting"))
    finally:
        if w is not None:
            w.close()


def test_600_connections_through_tether_forward(harness, tmp_path, nofile):
    """600 TCP connections at once to one `tether forward` that starts with a soft limit of
    1024 (two descriptors per connection): each echoes 4 KiB byte-exact through the relay
    and agent, all are held open together, then each half-closes and reads the echo server's
    EOF."""
    relay = harness.relay()
    agent = limited_agent(harness, relay, nofile, tmp_path / "state")
    echo_port = start_echo(harness.procs, tmp_path)
    proc = harness.procs.start("forward", limited([
        harness.bin, "forward", "--url", relay.url, "--token-file",
        harness.tokens.user_file(), "alpha", "0:%d" % echo_port], nofile))
    m = wait_until(lambda: FORWARD_RE.search(proc.stdout()) or not proc.alive(), timeout=15,
                   what="tether forward to listen")
    assert proc.alive(), proc.describe()
    fwd = Forward(proc, int(m.group(1)))
    results = {}
    seen = {}

    async def go():
        hold = asyncio.Event()
        tasks = [asyncio.ensure_future(_forward_client(fwd.port, i, results, hold))
                 for i in range(FORWARD_CONNECTIONS)]
        for _ in range(600):
            if len(results) == FORWARD_CONNECTIONS or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        seen["fds"] = rss_and_fds(proc.pid)[1]
        seen["echoed"] = sum(1 for v in results.values() if v == "echoed")
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(asyncio.wait_for(go(), 240))
    kinds = {}
    for v in results.values():
        kinds[v] = kinds.get(v, 0) + 1
    assert kinds == {"ok": FORWARD_CONNECTIONS}, "%r\nforward log:\n%s" % (
        kinds, proc.stderr()[-2000:])
    assert seen["echoed"] == FORWARD_CONNECTIONS, "only %d held open together" % (
        seen["echoed"])
    print("\n%d connections through tether forward: %d fds in it" % (FORWARD_CONNECTIONS,
                                                                   seen["fds"]))
    assert proc.alive() and agent.alive()


def test_500_agents_heartbeats_on_time(harness, tokens, tmp_path):
    """One relay, 500 agents played by tests/load/agents' generator (HELLO, hello,
    manifest, stats every second, PINGs, PONGs to the relay's PINGs at --keepalive-idle
    500ms): every one connects, stays connected, and every poll of GET /api/v1/workspaces
    finds every workspace connected with last_seen and its latest stats at most
    interval + margin old; every PING gets its PONG within the margin."""
    args = argparse.Namespace(ping_interval=2.0, margin=2.0, poll=0.5, timeout=60.0)
    agents = [agents_mod.Agent(i, "load-agent-%03d-%s" % (i, os.urandom(8).hex()),
                               "ws-%03d" % i) for i in range(AGENTS)]
    doc = {"agents": {a.token: a.name for a in agents},
           "users": {tokens.user_token(): ["*"]}}
    path = write_private(tmp_path / "tokens-500.json", json.dumps(doc))
    relay = harness.relay(tokens_path=path, extra=[
        "--stats-interval", "1", "--keepalive-idle", "500ms", "--keepalive-timeout", "60s"])
    rss0 = proc_rss_kib(relay.pid)
    poller = agents_mod.Poller(relay.port, tokens.user_token(), agents, relay.pid, 1, args)
    url = relay.url + "/api/v1/agent"

    async def go():
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(agents_mod.agent_run(a, url, args, stop, lambda: None))
                 for a in agents]
        poller.start()
        for _ in range(600):
            if all(a.ready or a.error for a in agents) and poller.all_connected_at:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)      # the first heartbeats of every agent land
        poller.measuring.set()
        await asyncio.sleep(6.0)
        poller.stop.set()
        await asyncio.get_running_loop().run_in_executor(None, poller.join, 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    try:
        asyncio.run(asyncio.wait_for(go(), 180))
    finally:
        poller.stop.set()
        poller.join(30)
    failed = [(a.name, a.error or "not ready") for a in agents if a.error or not a.ready]
    assert not failed, "%d agents failed, e.g. %s" % (len(failed), failed[:5])
    assert poller.all_connected_at is not None, "the API never listed all %d connected" % AGENTS
    assert len(poller.list_lat) >= 3, "only %d polls while measuring" % len(poller.list_lat)
    assert not poller.errors, poller.errors[:5]
    assert not poller.violations, "%d late or disconnected, e.g. %s" % (
        len(poller.violations), poller.violations[:5])
    late = sum(a.pongs_late for a in agents)
    assert late == 0, "%d PINGs without their PONG within %gs" % (late, args.margin)
    assert sum(a.relay_pings for a in agents) > 0, "the relay never pinged (keepalive idle)"
    assert relay.proc.alive()
    rss1 = max(poller.rss) if poller.rss else proc_rss_kib(relay.pid)
    print("\n%d agents: relay %d -> %d KiB; worst last_seen %.2fs, last_activity %.2fs" % (
        AGENTS, rss0, rss1, poller.worst_seen, poller.worst_activity))
    if not SANITIZED:
        assert rss1 - rss0 < 64 * MiB, "the relay grew %d KiB for %d agents" % (rss1 - rss0,
                                                                                AGENTS)
