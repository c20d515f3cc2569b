"""Activity and idleness (issue 5, first part): the agent's stats, the relay's idle_seconds
and its --on-idle policy. What counts is someone working: typing into SSH or a terminal,
traffic through a forward; an open but silent session does not keep a workspace alive."""
import asyncio
import json
import subprocess
import time
import uuid

import websockets

from conftest import echo_roundtrip, wait_until


def ws_json(relay, name="alpha"):
    code, body = relay.api("/api/v1/workspaces/%s" % name)
    assert code == 200, body
    return body if isinstance(body, dict) else json.loads(body)


def idle(relay):
    return ws_json(relay)["idle_seconds"]


def start(harness, tmp_path, timeout="3s"):
    marker = tmp_path / "idle.log"
    relay = harness.relay(extra=["--stats-interval", "1", "--idle-timeout", timeout,
                                 "--on-idle", 'echo "$TETHER_WORKSPACE" >> %s' % marker])
    agent = harness.agent(relay, "alpha")
    wait_until(lambda: ws_json(relay)["idle_seconds"] is not None, timeout=15,
               what="the first stats")
    return relay, agent, marker


def fired(marker):
    return marker.read_text().splitlines() if marker.exists() else []


def ssh_config(harness, relay, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host ws\n  ProxyCommand %s ssh-proxy --url %s --token-file %s alpha\n"
                   "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                   "  LogLevel ERROR\n  BatchMode yes\n" % (
                       harness.bin, relay.url, harness.tokens.user_file()))
    return cfg


def test_workspace_json_has_the_activity_fields(harness, tmp_path):
    relay, agent, _ = start(harness, tmp_path, timeout="1h")
    w = ws_json(relay)
    for key in ("last_activity", "idle_seconds", "sessions", "rx_bytes", "tx_bytes"):
        assert key in w, w
    assert w["last_activity"] is None  # nobody did anything yet
    assert set(w["sessions"]) >= {"ssh", "vscode", "jetbrains", "sftp", "pty", "forward"}
    assert set(w["rx_bytes"]) >= {"ssh", "sftp", "pty", "forward"}
    first = w["idle_seconds"]
    wait_until(lambda: idle(relay) >= first + 2, timeout=15, what="idle_seconds to grow")


def test_on_idle_runs_once_per_idle_period_and_typing_resets(harness, tmp_path):
    relay, agent, marker = start(harness, tmp_path)
    cfg = ssh_config(harness, relay, tmp_path)
    # A session left open and silent: the workspace still goes idle, the command runs once.
    silent = subprocess.Popen(["ssh", "-F", str(cfg), "ws", "sleep 60"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    typing = subprocess.Popen(["ssh", "-F", str(cfg), "ws", "cat > /dev/null"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: ws_json(relay)["sessions"].get("ssh") == 2, timeout=20,
                   what="two ssh sessions in the stats")
        wait_until(lambda: fired(marker) == ["alpha"], timeout=20, what="--on-idle to run")
        time.sleep(3)
        assert fired(marker) == ["alpha"], "ran again within one idle period"
        assert ws_json(relay)["sessions"]["ssh"] == 2
        # Typing into a session is activity: idle drops, last_activity is set.
        before = ws_json(relay)["rx_bytes"]["ssh"]
        typing.stdin.write(b"some typing\n")
        typing.stdin.flush()
        wait_until(lambda: idle(relay) <= 1, timeout=15, what="typing to reset idle_seconds")
        w = ws_json(relay)
        assert w["last_activity"] is not None
        assert w["rx_bytes"]["ssh"] >= before + len(b"some typing\n")
        # A new idle period: the command runs a second time.
        wait_until(lambda: len(fired(marker)) == 2, timeout=20, what="--on-idle again")
    finally:
        for p in (silent, typing):
            p.kill()
            p.wait(timeout=10)


def test_forward_traffic_is_activity(harness, tmp_path, servers):
    relay, agent, marker = start(harness, tmp_path, timeout="1h")
    echo = servers.echo()
    fwd = harness.forward(relay, "alpha", echo.port)
    wait_until(lambda: idle(relay) >= 2, timeout=15, what="an idle workspace")
    echo_roundtrip(fwd.port, nbytes=100000)
    wait_until(lambda: idle(relay) <= 1, timeout=15, what="forward traffic to reset idle")

    # Both ways counted: a stats message (one a second) may fall between the bytes going
    # to the echo server and their echo coming back, so the next one carries the rest.
    def both_ways():
        w = ws_json(relay)
        return w["rx_bytes"]["forward"] >= 100000 and w["tx_bytes"]["forward"] >= 100000
    wait_until(both_ways, timeout=15, what="100,000 forward bytes counted each way")


def test_an_open_terminal_with_nothing_typed_is_not_activity(harness, tmp_path):
    relay, agent, marker = start(harness, tmp_path, timeout="1h")

    async def go():
        ws = await websockets.connect(
            "%s/api/v1/workspaces/alpha/pty?id=%s&rows=24&cols=80" % (relay.url, uuid.uuid4()),
            extra_headers={"Authorization": "Bearer " + harness.tokens.user_token()},
            ping_interval=None)
        wait_until(lambda: ws_json(relay)["sessions"].get("pty") == 1, timeout=15,
                   what="the pty in the stats")
        first = idle(relay)
        await asyncio.sleep(3)  # the shell prints its prompt; nobody types
        later = idle(relay)
        assert later >= first + 2, (first, later)
        await ws.send(json.dumps({"data": "echo typed\r"}))
        for _ in range(150):
            if idle(relay) <= 1:
                break
            await asyncio.sleep(0.1)
        assert idle(relay) <= 1, "typing into the terminal did not count"
        await ws.close()
    asyncio.run(asyncio.wait_for(go(), 60))


def test_metrics_endpoint(harness, tmp_path):
    relay, agent, _ = start(harness, tmp_path, timeout="1h")
    code, body = relay.api("/metrics")
    assert code == 200
    text = body.decode()
    assert '# TYPE tether_workspace_idle_seconds gauge' in text
    assert 'tether_workspace_connected{workspace="alpha"} 1' in text
    assert 'tether_workspace_connected{workspace="beta"} 0' in text
    assert 'tether_workspace_sessions{workspace="alpha",type="ssh"} 0' in text
    assert 'tether_workspace_rx_bytes{workspace="alpha",kind="forward"} 0' in text
    for line in text.splitlines():  # every sample line parses as name{labels} integer
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("tether_workspace_") and "{" in name and value.isdigit(), line
    assert relay.api("/metrics", token="wrong")[0] == 401
    # A token limited to alpha sees only alpha.
    from conftest import ONLY_A
    code, body = relay.api("/metrics", user=ONLY_A)
    assert code == 200 and b'workspace="beta"' not in body


def test_listening_ports_appear_and_go(harness, tmp_path):
    import socket
    relay, agent, _ = start(harness, tmp_path, timeout="1h")
    v4 = socket.socket(socket.AF_INET)
    v4.bind(("127.0.0.1", 0))
    v4.listen(1)
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # an IPv6-only listener
    v6.bind(("::1", 0))
    v6.listen(1)
    p4, p6 = v4.getsockname()[1], v6.getsockname()[1]

    def listed():
        return {(p["port"], p["family"]): p for p in ws_json(relay)["ports"]}
    try:
        wait_until(lambda: (p4, "ipv4") in listed() and (p6, "ipv6") in listed(), timeout=5,
                   what="both listeners in the workspace's ports")
        now = listed()
        assert now[(p4, "ipv4")]["address"] == "127.0.0.1"
        assert now[(p6, "ipv6")]["address"] == "::1"
        assert now[(p4, "ipv4")].get("process")  # this test's own process, readable
    finally:
        v4.close()
        v6.close()
    wait_until(lambda: (p4, "ipv4") not in listed() and (p6, "ipv6") not in listed(), timeout=5,
               what="the closed listeners to go")
