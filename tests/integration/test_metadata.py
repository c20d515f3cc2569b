"""Metadata (issue 5, second half): manifest items {key, script, interval, timeout} from the
relay's --manifest run on their schedule in the agent; their output (trailing whitespace
trimmed, cut at 10 KiB on a UTF-8 boundary) or their error shows in the workspace JSON's
metadata, updated on change.

Also the listening-ports scanner's --ports-interval (test_activity.py already checks that
IPv4 and IPv6-only listeners appear and go with the default interval) and /proc unreadable
(ports unavailable, a log line, nothing crashes)."""
import socket
import time

import pytest

from conftest import mount_namespace_available, wait_until
from lifecyclelib import Workspace, now_ms, pid_gone, read_pid, write_manifest

KiB = 1024


def start(harness, tmp_path, items, star=None, extra_members=None):
    doc = {"alpha": dict(extra_members or {}, metadata=items)}
    if star is not None:
        doc["*"] = star
    manifest = write_manifest(tmp_path / "manifest.json", doc)
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent(["--directory", ws.dir])
    return ws


def meta(ws):
    return ws.json()["metadata"]


def wait_item(ws, key, pred, timeout=20, what=None):
    def check():
        item = meta(ws).get(key)
        return item if item is not None and pred(item) else None
    try:
        return wait_until(check, timeout=timeout, interval=0.2,
                          what=what or "metadata %s" % key)
    except AssertionError as e:
        raise AssertionError("%s; metadata now: %r" % (e, meta(ws))) from None


def test_values_errors_and_changes(harness, tmp_path):
    data = tmp_path / "value.txt"
    data.write_text("first value\n")
    t0 = now_ms()
    ws = start(harness, tmp_path, [
        {"key": "static", "script": "echo hello-meta", "interval": 60},
        {"key": "file", "script": "cat %s" % data, "interval": 1},
        {"key": "fails", "script": "echo partial; echo the-first-err >&2; echo second >&2; "
                                   "exit 3", "interval": 60},
        {"key": "trim", "script": "printf 'a b  \\n\\n\\t '", "interval": 60},
        {"key": "slow", "script": "sleep 30", "interval": 60, "timeout": 1},
    ])
    st = wait_item(ws, "static", lambda i: i["value"] == "hello-meta")
    assert st["error"] == "" and isinstance(st["collected_at"], int)
    assert t0 - 5000 <= st["collected_at"] <= now_ms() + 5000, st
    assert set(st) == {"value", "error", "collected_at"}, st
    wait_item(ws, "file", lambda i: i["value"] == "first value")
    wait_item(ws, "trim", lambda i: i["value"] == "a b")
    f = wait_item(ws, "fails", lambda i: i["error"] != "")
    assert "exit status 3" in f["error"], f
    assert "the-first-err" in f["error"] and "second" not in f["error"], f
    s = wait_item(ws, "slow", lambda i: i["error"] != "", timeout=20)
    assert "timed out" in s["error"] and "1s" in s["error"], s
    # The script's output changes: the value follows within a few intervals.
    before = meta(ws)["file"]["collected_at"]
    data.write_text("second value\n")
    changed = wait_item(ws, "file", lambda i: i["value"] == "second value", timeout=15)
    assert changed["collected_at"] > before
    # Back to success after a failure clears the error.
    data.unlink()
    gone = wait_item(ws, "file", lambda i: i["error"] != "", timeout=15)
    assert "exit status 1" in gone["error"], gone
    data.write_text("third\n")
    wait_item(ws, "file", lambda i: i["value"] == "third" and i["error"] == "", timeout=15)


def test_value_is_capped_at_10_kib(harness, tmp_path):
    ws = start(harness, tmp_path, [
        {"key": "big", "script": "head -c 20000 /dev/zero | tr '\\0' a", "interval": 60},
        # 3-byte characters: 10240 is not a multiple of 3, the cut must not split one.
        {"key": "utf8", "script": "i=0; while [ $i -lt 5000 ]; do printf '\\342\\202\\254'; "
                                  "i=$((i+1)); done", "interval": 60},
        {"key": "exact", "script": "head -c 10240 /dev/zero | tr '\\0' b", "interval": 60},
    ])
    big = wait_item(ws, "big", lambda i: i["value"] != "")
    assert big["value"] == "a" * 10240, len(big["value"])
    u = wait_item(ws, "utf8", lambda i: i["value"] != "", timeout=30)
    assert u["value"] == "\u20ac" * 3413, (len(u["value"]), len(u["value"].encode()))
    e = wait_item(ws, "exact", lambda i: i["value"] != "")
    assert e["value"] == "b" * 10240


def test_metadata_in_the_star_entry_applies_to_every_workspace(harness, tmp_path):
    manifest = write_manifest(tmp_path / "manifest.json", {
        "*": {"metadata": [{"key": "who", "script": "echo everyone", "interval": 60}]},
        "beta": {"metadata": [{"key": "own", "script": "echo beta-only", "interval": 60}]},
    })
    alpha = Workspace(harness, tmp_path / "a", relay_extra=["--manifest", manifest])
    beta = Workspace(harness, tmp_path / "b", workspace="beta", relay=alpha.relay)
    alpha.start_agent()
    beta.start_agent()
    wait_item(alpha, "who", lambda i: i["value"] == "everyone")
    wait_item(beta, "own", lambda i: i["value"] == "beta-only")
    time.sleep(2)
    assert set(meta(alpha)) == {"who"}
    assert set(meta(beta)) == {"own"}, "the workspace's entry replaces *'s metadata"


def test_a_new_agent_connection_resets_and_resends(harness, tmp_path):
    ws = start(harness, tmp_path, [{"key": "k", "script": "echo v", "interval": 3600}])
    wait_item(ws, "k", lambda i: i["value"] == "v")
    port = ws.relay.port
    ws.relay.proc.kill()
    ws.relay = harness.relay(port=port, extra=["--manifest", tmp_path / "manifest.json"])
    wait_until(lambda: ws.relay.connected("alpha"), timeout=45, what="the agent to reconnect")
    # interval is an hour: the value comes again only because a reconnect resends all.
    wait_item(ws, "k", lambda i: i["value"] == "v", timeout=20)


def test_a_new_agent_process_resets_the_metadata(harness, tmp_path):
    """The relay forgets the old agent's metadata at the new agent's hello: until the new
    agent's script reports, the key is absent, not the old value."""
    value, delay = tmp_path / "value", tmp_path / "delay"
    value.write_text("one\n")
    delay.write_text("0\n")
    ws = start(harness, tmp_path, [{"key": "k", "script": "sleep $(cat %s); cat %s" % (
        delay, value), "interval": 3600, "timeout": 60}])
    wait_item(ws, "k", lambda i: i["value"] == "one")
    assert ws.agent.terminate(timeout=30) == 0
    wait_until(lambda: not ws.relay.connected("alpha"), timeout=20, what="the agent to go")
    value.write_text("two\n")
    delay.write_text("8\n")
    ws.start_agent(["--directory", ws.dir])
    assert "k" not in meta(ws), "the old agent's value outlived its connection: %r" % meta(ws)
    wait_item(ws, "k", lambda i: i["value"] == "two", timeout=30)


def test_a_running_metadata_script_does_not_hold_up_shutdown(harness, tmp_path):
    """After SIGTERM the agent exits 0 promptly with a metadata script running, and the
    script does not outlive it."""
    pidfile = tmp_path / "meta.pid"
    ws = start(harness, tmp_path, [{"key": "slow", "script": "echo $$ > %s; exec sleep 300"
                                    % pidfile, "interval": 1, "timeout": 3600}])
    pid = wait_until(lambda: read_pid(pidfile), timeout=20, what="the metadata script to run")
    assert not pid_gone(pid)
    t0 = time.monotonic()
    assert ws.agent.terminate(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    wait_until(lambda: pid_gone(pid), timeout=10, what="the metadata script to be killed")


BAD = [
    ([{"key": "bad key", "script": "true"}], "key"),
    ([{"key": "k", "script": "true"}, {"key": "k", "script": "false"}], "key"),
    ([{"key": "k"}], "script"),
    ([{"key": "k", "script": ""}], "script"),
    ([{"key": "k", "script": "true", "interval": 0}], "interval"),
    ([{"key": "k", "script": "true", "interval": 86401}], "interval"),
    ([{"key": "k", "script": "true", "timeout": 3601}], "timeout"),
    ([{"key": "k", "script": "true", "timeout": 0}], "timeout"),
    ([{"key": "k%d" % i, "script": "true"} for i in range(33)], "metadata"),
    ([{"key": "k" * 65, "script": "true"}], "key"),
    ("not-a-list", "metadata"),
]


@pytest.mark.parametrize("items,word", BAD, ids=[
    "key-chars", "duplicate-key", "no-script", "empty-script", "interval-0", "interval-big",
    "timeout-big", "timeout-0", "33-items", "long-key", "not-a-list"])
def test_bad_metadata_in_the_manifest_is_a_usage_error(harness, tmp_path, items, word):
    path = write_manifest(tmp_path / "manifest.json", {"alpha": {"metadata": items}})
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", path, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "alpha" in r.stderr and "metadata" in r.stderr, r.stderr
    assert word in r.stderr.lower(), r.stderr


# ---------------------------------------------------------------------------------------
# listening ports: --ports-interval and /proc unreadable


def listeners():
    v4 = socket.socket(socket.AF_INET)
    v4.bind(("127.0.0.1", 0))
    v4.listen(1)
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::1", 0))
    v6.listen(1)
    return v4, v6


def port_set(ws):
    return {(p["port"], p["family"]) for p in ws.json()["ports"]}


def test_ports_interval_short_listeners_appear_and_go_within_3s(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--ports-interval", "500ms"])
    v4, v6 = listeners()
    want = {(v4.getsockname()[1], "ipv4"), (v6.getsockname()[1], "ipv6")}
    try:
        wait_until(lambda: want <= port_set(ws), timeout=3,
                   what="both listeners within 3 s (interval 500ms)")
    finally:
        v4.close()
        v6.close()
    wait_until(lambda: not (want & port_set(ws)), timeout=3,
               what="both listeners gone within 3 s")


def test_ports_interval_long_means_no_rescan(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--ports-interval", "1h"])
    time.sleep(1)
    v4, v6 = listeners()
    try:
        time.sleep(4)
        # The first scan may have run before the listeners; no rescan comes within an hour.
        assert (v4.getsockname()[1], "ipv4") not in port_set(ws)
    finally:
        v4.close()
        v6.close()


def test_idle_agent_reads_ports_only_with_its_stats_until_a_stream_wakes_it(harness, servers,
                                                                           tmp_path):
    """--ports-idle-after 1s: with no stream open, the 200 ms scans stop and the ports are read
    only with the stats (every 30 s here); a forward's stream brings the interval back at
    once, and it holds while the stream is open."""
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--ports-interval", "200ms", "--ports-idle-after", "1s"])
    echo = servers.echo()
    time.sleep(2.5)  # idle by now: nothing opened a stream
    v4, v6 = listeners()
    want = (v4.getsockname()[1], "ipv4")
    try:
        time.sleep(3)
        assert want not in port_set(ws), "an idle agent went on scanning every 200 ms"
        fwd = harness.forward(ws.relay, "alpha", echo.port)
        c = fwd.connect()
        wait_until(lambda: want in port_set(ws), timeout=3,
                   what="the listener once a stream woke the scanner")
        time.sleep(2)  # past --ports-idle-after, with the stream still open
    finally:
        v4.close()
        v6.close()
    wait_until(lambda: want not in port_set(ws), timeout=3,
               what="the listener gone while the stream keeps the workspace in use")
    c.close()


def test_idle_agent_reads_ports_with_each_stats_report(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--stats-interval", "1"])
    ws.start_agent(["--ports-interval", "200ms", "--ports-idle-after", "1s"])
    time.sleep(2.5)
    v4, v6 = listeners()
    try:
        wait_until(lambda: (v4.getsockname()[1], "ipv4") in port_set(ws), timeout=4,
                   what="the listener, read with a stats report (every 1 s)")
    finally:
        v4.close()
        v6.close()


@pytest.mark.parametrize("option,value", [
    ("ports-interval", v) for v in ["50ms", "99ms", "2h", "0", "abc", "-1s"]] + [
    ("ports-idle-after", v) for v in ["0", "500ms", "25h", "x"]])
def test_ports_options_are_validated(harness, option, value):
    relay = harness.relay()
    r = harness.run("agent", "--url", relay.url, "--token-file",
                    harness.tokens.agent_file("alpha"), "--" + option, value, timeout=30)
    assert r.returncode == 2, (option, value, r.returncode, r.stderr)
    assert option in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["100ms", "1h"])
def test_ports_interval_bounds_are_accepted(harness, tmp_path, value):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--ports-interval", value])
    assert ws.agent.alive()


@pytest.mark.skipif(not mount_namespace_available(), reason="needs mount namespaces (root)")
def test_proc_net_unreadable_ports_unavailable_and_nothing_crashes(harness, tmp_path):
    """/proc/net/tcp and tcp6 hidden from the agent (an empty tmpfs over its /proc/PID/net in a
    private mount namespace): ports are [], one warning reaches the relay's logs, SSH works."""
    ws = Workspace(harness, tmp_path)
    wrap = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            'mount -t tmpfs none "/proc/$$/net" && exec "$@"', "sh"]
    ws.start_agent(["--ports-interval", "500ms"], wrap=wrap)
    v4, v6 = listeners()
    try:
        texts = ws.wait_text("agent", lambda t: any("unavailable" in x for x in t), timeout=15,
                             what="the agent's warning that ports are unavailable")
        assert sum("unavailable" in x for x in texts) == 1, texts
        time.sleep(2)
        assert ws.json()["ports"] == []
        r = ws.ssh("echo", "alive", timeout=60)
        assert r.returncode == 0 and r.stdout == b"alive\n", r
        assert ws.agent.alive()
        assert sum("unavailable" in x for x in ws.texts("agent")) == 1, "warned again"
    finally:
        v4.close()
        v6.close()
