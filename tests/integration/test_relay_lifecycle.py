"""The relay's side of issue 5's second half: lifecycle, logs, metadata, forward_ports and
--manifest (PROTOCOL.md 12.3, 12.6-12.10, 14.3, 14.4.1, 14.4.2).

A Python agent (tetherproto, wspeer) connects to the real relay, sends the control messages
and the tests read what the relay's API shows. Log batches are built here, record by record:
"TIME SP SOURCE SP TEXT LF", zlib, base64.
"""
import asyncio
import base64
import contextvars
import json
import random
import time
import zlib

import pytest
import websockets

import tetherproto as tp
from conftest import ONLY_A, proc_rss_kib, wait_until
from wspeer import Peer

MAX_BATCH = 65536  # PROTO_MAX_LOG_BATCH: a batch's records, uncompressed


# ---------------------------------------------------------------------------------------
# helpers


# The Python agents a run() started, closed when it ends (an open websocket would hold
# asyncio.run for its close_timeout).
_peers = contextvars.ContextVar("peers")


def run(coro, timeout=90):
    async def main():
        peers = []
        _peers.set(peers)
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            for p in peers:
                await p.ws.close()
    return asyncio.run(main())


async def connect(relay, ws_name="alpha"):
    """A Python agent for ws_name through the handshake; its manifest is peer.controls[-1]."""
    ws = await websockets.connect(
        relay.url + "/api/v1/agent", subprotocols=["tether.v1"],
        extra_headers={"Authorization": "Bearer " + relay.tokens.agent[ws_name]},
        max_size=None, ping_interval=None, open_timeout=15, close_timeout=5)
    peer = Peer(ws)
    _peers.get([]).append(peer)
    await peer.send(tp.hello_frame(), tp.agent_hello_control())
    first = await peer.until(lambda f: True, what="the relay's first frame")
    assert first.type == tp.HELLO, first
    await peer.until(lambda f: f.type == tp.CONTROL and f.control().get("type") == "manifest",
                     what="manifest")
    return peer


async def send(peer, *msgs):
    await peer.send(*[tp.control_frame(m) for m in msgs])


async def settle(peer, pred, timeout=15, what="the relay to show it"):
    """Polls pred() (HTTP, blocking) while answering the relay's pings; returns its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    for _ in range(100000):
        try:
            v = pred()
            if v:
                return v
        except AssertionError as e:
            last = e
        if loop.time() >= deadline:
            break
        await peer.drain_for(0.05)
    raise AssertionError("timed out after %ss waiting for %s (%r)" % (timeout, what, last))


def workspace(relay, name="alpha"):
    return relay.api_json("/api/v1/workspaces/%s" % name)


def logs(relay, after=None, name="alpha"):
    path = "/api/v1/workspaces/%s/logs" % name
    if after is not None:
        path += "?after=%d" % after
    return relay.api_json(path)


def all_logs(relay, name="alpha", after=0):
    """Every kept line after `after`, following "next" through as many replies as it takes."""
    lines = []
    for _ in range(10000):
        doc = logs(relay, after, name)
        lines += doc["lines"]
        if doc["next"] - 1 == after:
            return lines, doc
        after = doc["next"] - 1
    raise AssertionError("logs never ended")


def batch(seq, records):
    """A logs message of records (time, source, text)."""
    raw = b"".join(b"%d %s %s\n" % (t, s.encode(), x.encode("utf-8")) for t, s, x in records)
    assert len(raw) <= MAX_BATCH
    return {"type": "logs", "seq": seq, "lines": len(records),
            "data": base64.b64encode(zlib.compress(raw)).decode()}


def batches(records, first_seq=1):
    """Logs messages for any number of records, each batch at most MAX_BATCH bytes."""
    out, cur, size = [], [], 0
    for t, s, x in records:
        n = len(b"%d %s %s\n" % (t, s.encode(), x.encode("utf-8")))
        if cur and size + n > MAX_BATCH:
            out.append(batch(first_seq + len(out), cur))
            cur, size = [], 0
        cur.append((t, s, x))
        size += n
    if cur:
        out.append(batch(first_seq + len(out), cur))
    return out


def texts(lines):
    return [l["text"] for l in lines]


def relay_markers(lines):
    return [l["text"] for l in lines if l["source"] == "relay"]


# ---------------------------------------------------------------------------------------
# lifecycle


def test_new_fields_before_any_agent(relay):
    w = workspace(relay)
    assert w["lifecycle"] is None and w["lifecycle_changed_at"] is None
    assert w["metadata"] == {} and w["forward_ports"] == []
    doc = logs(relay)
    assert doc == {"lines": [], "first": 1, "next": 1}


def test_lifecycle_shown_and_reset_by_a_new_connection(relay):
    async def go():
        peer = await connect(relay)
        t0 = int(time.time() * 1000)
        await send(peer, {"type": "lifecycle", "state": "created", "changed_at": t0},
                   {"type": "lifecycle", "state": "starting", "changed_at": t0 + 1},
                   {"type": "lifecycle", "state": "ready", "changed_at": t0 + 2})
        w = await settle(peer, lambda: (lambda w: w if w["lifecycle"] == "ready" else None)(
            workspace(relay)))
        assert w["lifecycle_changed_at"] == t0 + 2
        # other workspaces are not touched
        assert workspace(relay, "beta")["lifecycle"] is None
        # A new connection for the workspace: the state was the old agent's.
        peer2 = await connect(relay)
        w = workspace(relay)
        assert w["lifecycle"] is None and w["lifecycle_changed_at"] is None
        await send(peer2, {"type": "lifecycle", "state": "shutting_down", "changed_at": t0 + 9})
        await settle(peer2, lambda: workspace(relay)["lifecycle"] == "shutting_down")
        # The replaced connection's reports are stale: ignored.
        try:
            await send(peer, {"type": "lifecycle", "state": "off", "changed_at": t0 + 10})
        except websockets.exceptions.ConnectionClosed:
            pass
        await peer2.drain_for(0.5)
        assert workspace(relay)["lifecycle"] == "shutting_down"
    run(go())


def test_metrics_lifecycle_line(relay):
    async def go():
        peer = await connect(relay)
        await send(peer, {"type": "lifecycle", "state": "starting", "changed_at": 1},
                   {"type": "lifecycle", "state": "start_error", "changed_at": 2})
        await settle(peer, lambda: workspace(relay)["lifecycle"] == "start_error")
        code, body = relay.api("/metrics")
        assert code == 200
        text = body.decode()
        assert "# TYPE tether_workspace_lifecycle gauge" in text
        assert 'tether_workspace_lifecycle{workspace="alpha",state="start_error"} 1' in text
        # the current state only, and nothing for workspaces that reported none
        assert text.count("tether_workspace_lifecycle{") == 1, text
        code, body = relay.api("/metrics", user=ONLY_A)
        assert code == 200 and 'state="start_error"' in body.decode()
    run(go())


# ---------------------------------------------------------------------------------------
# logs


def test_logs_round_trip_in_order_with_after(relay):
    async def go():
        peer = await connect(relay)
        recs = [(1796000000000 + i, "startup" if i % 2 else "script:build",
                 "line %d: héllo \t wörld" % i) for i in range(1, 101)]
        await send(peer, batch(1, recs[:40]), batch(2, recs[40:41]), batch(3, recs[41:]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 100 else None)(
            logs(relay)))
        assert doc["first"] == 1 and doc["next"] == 101
        assert [l["n"] for l in doc["lines"]] == list(range(1, 101))
        assert [(l["time"], l["source"], l["text"]) for l in doc["lines"]] == recs
        # after= gives the lines after line N; a poll with after=next-1 gets nothing new
        doc = logs(relay, 60)
        assert [l["n"] for l in doc["lines"]] == list(range(61, 101))
        assert doc["next"] == 101
        assert logs(relay, 100) == {"lines": [], "first": 1, "next": 101}
        assert logs(relay, 5000)["lines"] == []
        # An empty text and the longest one (4096 bytes, multi-byte characters) arrive whole.
        long_text = "é" * 2048
        await send(peer, batch(4, [(5, "agent", ""), (6, "agent", long_text)]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 2 else None)(
            logs(relay, 100)))
        assert texts(doc["lines"]) == ["", long_text]
        # The lines survive the agent's connection; numbering goes on with the next one.
        await peer.ws.close()
        peer = await connect(relay)
        await send(peer, batch(1, [(7, "agent", "after reconnect")]))
        doc = await settle(peer, lambda: (lambda d: d if d["lines"] else None)(logs(relay, 102)))
        assert [(l["n"], l["text"]) for l in doc["lines"]] == [(103, "after reconnect")]
        assert relay_markers(all_logs(relay)[0]) == []  # seq 1 again is a new agent, no loss
    run(go())


def test_one_mib_of_lines_complete_and_in_order(harness):
    relay = harness.relay(extra=["--log-lines", "100000"])
    rnd = random.Random(5)
    recs, total = [], 0
    while total < 1024 * 1024:
        text = "%06d %s" % (len(recs), "".join(
            rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 -_/:éü") for _ in range(
                rnd.randrange(0, 300))))
        recs.append((1796000000000 + len(recs), "script:build", text))
        total += len(text.encode())
    msgs = batches(recs)
    assert len(msgs) >= 16

    async def go():
        peer = await connect(relay)
        for m in msgs:
            await send(peer, m)
        await settle(peer, lambda: logs(relay, len(recs) - 1)["lines"], timeout=60,
                     what="the last line")
    run(go())
    lines, last = all_logs(relay)
    assert len(lines) == len(recs)
    assert [l["n"] for l in lines] == list(range(1, len(recs) + 1))
    assert [(l["time"], l["source"], l["text"]) for l in lines] == recs
    assert last["first"] == 1
    assert relay_markers(lines) == []


def test_log_lines_bound_pushes_out_the_oldest(harness):
    relay = harness.relay(extra=["--log-lines", "50"])

    async def go():
        peer = await connect(relay)
        recs = [(i, "agent", "line %d" % i) for i in range(1, 201)]
        for m in batches(recs[:120]) + batches(recs[120:], first_seq=2):
            await send(peer, m)
        return await settle(peer, lambda: (lambda d: d if d["next"] == 201 else None)(
            logs(relay)))
    doc = run(go())
    assert doc["first"] == 151 and len(doc["lines"]) == 50
    assert [l["n"] for l in doc["lines"]] == list(range(151, 201))
    assert texts(doc["lines"]) == ["line %d" % i for i in range(151, 201)]
    # asking for lines that were pushed out gives what is kept, from "first"
    assert [l["n"] for l in logs(relay, 3)["lines"]] == list(range(151, 201))


@pytest.mark.plain_build
def test_log_lines_bound_holds_memory(harness):
    """Lines of the longest text: the relay's memory stays near --log-lines' worth."""
    relay = harness.relay(extra=["--log-lines", "100"])

    async def go():
        peer = await connect(relay)
        await peer.drain_for(0.3)
        base = proc_rss_kib(relay.pid)
        text = "x" * 4096
        seq = 0
        for _ in range(200):  # 200 * 15 lines of 4 KiB = 12 MiB sent
            seq += 1
            await send(peer, batch(seq, [(i, "agent", text) for i in range(15)]))
        await settle(peer, lambda: logs(relay, 2999)["next"] == 3001, what="the last batch")
        return base, proc_rss_kib(relay.pid)
    base, after = run(go())
    doc = logs(relay)
    assert doc["first"] == 2901 and len(doc["lines"]) == 100
    # 100 lines of 4 KiB are 400 KiB; allow for the allocator and the JSON just served (an
    # ASan build's quarantine keeps freed memory: this holds for normal builds only)
    assert after - base < 3072, "relay RSS grew by %d KiB" % (after - base)


@pytest.mark.parametrize("name,msg,why", [
    ("bad_base64", {"type": "logs", "seq": 2, "lines": 1, "data": "!!!not base64!!!"},
     "base64"),
    ("zlib_bomb", {"type": "logs", "seq": 2, "lines": 1,
                   "data": base64.b64encode(zlib.compress(b"a" * (20 << 20), 9)).decode()},
     "inflates to more than"),
    ("not_zlib", {"type": "logs", "seq": 2, "lines": 1,
                  "data": base64.b64encode(b"plain text, no zlib").decode()}, None),
    ("lines_disagree", dict(batch(2, [(1, "agent", "one"), (2, "agent", "two")]), lines=3),
     None),
    ("bad_record", dict(batch(2, [(1, "agent", "x")]),
                        data=base64.b64encode(zlib.compress(b"notatime agent x\n")).decode()),
     None),
])
def test_corrupt_batch_gives_a_marker_and_the_connection_stays(relay, name, msg, why):
    async def go():
        peer = await connect(relay)
        await send(peer, batch(1, [(1, "agent", "before")]), msg,
                   batch(3, [(3, "agent", "after")]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 3 else None)(
            logs(relay)))
        t = texts(doc["lines"])
        assert t[0] == "before" and t[2] == "after", t
        marker = doc["lines"][1]
        assert marker["source"] == "relay"
        assert marker["text"].startswith("[relay: a log batch was dropped: "), marker
        assert marker["text"].endswith("]")
        if why:
            assert why in marker["text"], marker
        assert abs(marker["time"] - time.time() * 1000) < 60000
        assert peer.closed is None and peer.goaway is None
        assert workspace(relay)["connected"] is True
    run(go())
    err = relay.proc.stderr()
    assert "workspace alpha: log batch 2 dropped: " in err, err[-2000:]


def test_seq_gap_gives_the_missing_marker(relay):
    async def go():
        peer = await connect(relay)
        await send(peer, batch(1, [(1, "agent", "one")]), batch(2, [(2, "agent", "two")]),
                   batch(5, [(5, "agent", "five")]), batch(6, [(6, "agent", "six")]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 5 else None)(
            logs(relay)))
        assert texts(doc["lines"]) == ["one", "two", "[relay: 2 log batches missing]", "five",
                                       "six"]
        assert doc["lines"][2]["source"] == "relay"
        # A number not above the last one is a restarted agent: no marker.
        await send(peer, batch(1, [(7, "agent", "restarted")]), batch(2, [(8, "agent", "on")]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 2 else None)(
            logs(relay, 5)))
        assert texts(doc["lines"]) == ["restarted", "on"]
        # Agents number batches across reconnects: one lost with a dropped connection shows.
        peer = await connect(relay)
        await send(peer, batch(4, [(9, "agent", "after reconnect")]))
        doc = await settle(peer, lambda: (lambda d: d if len(d["lines"]) == 2 else None)(
            logs(relay, 7)))
        assert texts(doc["lines"]) == ["[relay: 1 log batches missing]", "after reconnect"]
    run(go())
    assert "workspace alpha: 2 log batches are missing" in relay.proc.stderr()


def test_one_agent_connection_cannot_flood_the_relays_log(relay):
    """200 corrupt batches and 199 seq gaps: the workspace's /logs gets a marker for each
    (it is bounded by --log-lines), but the relay's own log takes at most
    WSSTATUS_LOG_BUDGET (64) lines from one agent connection, then says it stops; a new
    connection gets a new budget."""
    budget = 64

    def relay_lines():
        err = relay.proc.stderr()
        return [ln for ln in err.splitlines() if "workspace alpha: " in ln and (
            "dropped" in ln or "missing" in ln or "not logged" in ln)]

    async def go():
        peer = await connect(relay)
        msgs = []
        seq = 0
        for _ in range(200):
            seq += 2  # one number skipped: a gap each time
            msgs.append(batch(seq, [(seq, "agent", "gap")]))
            seq += 1
            msgs.append({"type": "logs", "seq": seq, "lines": 1, "data": "!!!"})
        await send(peer, *msgs)
        # 200 lines, 200 dropped-batch markers, 199 missing-batch markers (the first batch's
        # number is where counting starts).
        await settle(peer, lambda: len(all_logs(relay)[0]) == 599, what="all 599 lines")
        assert peer.closed is None and peer.goaway is None
        return seq
    seq = run(go())
    lines = relay_lines()
    assert len(lines) == budget, "%d lines:\n%s" % (len(lines), "\n".join(lines[-5:]))
    assert "more lifecycle and log-batch events from this agent connection are not logged" \
        in lines[-1]

    async def again():
        peer = await connect(relay)
        await send(peer, batch(seq + 2, [(seq + 2, "agent", "after")]))
        await settle(peer, lambda: any(ln["text"] == "after" for ln in all_logs(relay)[0]),
                     what="the new connection's batch")
    run(again())
    wait_until(lambda: len(relay_lines()) == budget + 1, timeout=10,
               what="a new connection's first line in the relay's log")


# ---------------------------------------------------------------------------------------
# metadata and forward_ports


def test_metadata_merged_and_shown(relay):
    async def go():
        peer = await connect(relay)
        await send(peer, {"type": "metadata", "items": [
            {"key": "load", "value": "0.1 0.2 0.3", "error": "", "collected_at": 1000},
            {"key": "disk", "value": "", "error": "exit status 3: df: no", "collected_at": 1001},
        ]})
        await settle(peer, lambda: len(workspace(relay)["metadata"]) == 2)
        await send(peer, {"type": "metadata", "items": [
            {"key": "load", "value": "0.5 0.4 0.3", "error": "", "collected_at": 2000}]})
        md = await settle(peer, lambda: (lambda m: m if m["load"]["collected_at"] == 2000
                                         else None)(workspace(relay)["metadata"]))
        assert md == {
            "load": {"value": "0.5 0.4 0.3", "error": "", "collected_at": 2000},
            "disk": {"value": "", "error": "exit status 3: df: no", "collected_at": 1001},
        }
        # At most 32 keys are kept; new ones past that are ignored (with one warning), known
        # ones still change.
        many = [{"key": "k%02d" % i, "value": str(i), "error": "", "collected_at": 3000}
                for i in range(30)]
        await send(peer, {"type": "metadata", "items": many})
        await settle(peer, lambda: len(workspace(relay)["metadata"]) == 32)
        await send(peer, {"type": "metadata", "items": [
            {"key": "extra1", "value": "x", "error": "", "collected_at": 4000},
            {"key": "extra2", "value": "x", "error": "", "collected_at": 4000},
            {"key": "load", "value": "9", "error": "", "collected_at": 4000}]})
        await send(peer, {"type": "metadata", "items": [
            {"key": "extra3", "value": "x", "error": "", "collected_at": 5000}]})
        md = await settle(peer, lambda: (lambda m: m if m["load"]["value"] == "9" else None)(
            workspace(relay)["metadata"]))
        await peer.drain_for(0.3)
        md = workspace(relay)["metadata"]
        assert len(md) == 32 and "extra1" not in md and "extra3" not in md
        # A new connection starts over.
        await connect(relay)
        assert workspace(relay)["metadata"] == {}
    run(go())
    assert relay.proc.stderr().count("metadata keys") == 1, relay.proc.stderr()[-2000:]


def test_forward_ports_shown(relay):
    async def go():
        peer = await connect(relay)
        fwd = [{"port": 3000}, {"port": 5432, "host": "db"}]
        await send(peer, {"type": "ports", "ports": [
            {"port": 8080, "family": "ipv4", "address": "0.0.0.0"}], "forward_ports": fwd})
        w = await settle(peer, lambda: (lambda w: w if w["forward_ports"] else None)(
            workspace(relay)))
        assert w["forward_ports"] == fwd
        assert [p["port"] for p in w["ports"]] == [8080]
        listed = relay.api_json("/api/v1/workspaces")
        assert [x for x in listed if x["name"] == "alpha"][0]["forward_ports"] == fwd
        # Each ports message is the whole picture.
        await send(peer, {"type": "ports", "ports": []})
        await settle(peer, lambda: workspace(relay)["forward_ports"] == [])
        await send(peer, {"type": "ports", "ports": [], "forward_ports": fwd[:1]})
        await settle(peer, lambda: workspace(relay)["forward_ports"] == fwd[:1])
        await connect(relay)  # a new agent resets them
        assert workspace(relay)["forward_ports"] == []
    run(go())


# ---------------------------------------------------------------------------------------
# /logs: authentication and the query


def test_logs_auth_401_404(relay):
    base = "/api/v1/workspaces/%s/logs"
    assert relay.api(base % "alpha", user=None)[0] == 401
    assert relay.api(base % "alpha", token="wrong")[0] == 401
    assert relay.api(base % "alpha", token=relay.tokens.agent["alpha"])[0] == 401
    assert relay.api(base % "zeta")[0] == 404
    assert relay.api(base % "beta", user=ONLY_A)[0] == 404
    # the same body whether the workspace exists or not
    assert relay.api(base % "beta", user=ONLY_A)[1] == relay.api(base % "zeta", user=ONLY_A)[1]
    assert relay.api(base % "alpha", user=ONLY_A)[0] == 200
    assert relay.api("/api/v1/workspaces/alpha/logs/x")[0] == 404
    # the token is checked before the query
    assert relay.api(base % "alpha" + "?after=x", token="wrong")[0] == 401


@pytest.mark.parametrize("query", ["after=x", "after=-1", "after=", "after", "after=1&after=2",
                                   "after=1.5", "after=9223372036854775808",
                                   "after=99999999999999999999999"])
def test_logs_bad_after_400(relay, query):
    code, body = relay.api("/api/v1/workspaces/alpha/logs?" + query)
    assert code == 400, (code, body)
    assert "after" in json.loads(body)["error"]


def test_logs_good_queries(relay):
    for q in ("after=0", "after=9223372036854775807", "after=007", "other=1&after=3", "x"):
        code, body = relay.api("/api/v1/workspaces/alpha/logs?" + q)
        assert code == 200, (q, code, body)
        assert json.loads(body) == {"lines": [], "first": 1, "next": 1}


# ---------------------------------------------------------------------------------------
# --manifest


def write_manifest(tmp_path, doc, name="manifest.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_manifest_merged_into_what_the_agent_receives(harness, tmp_path):
    scripts = [{"name": "build", "script": "make -j8", "run_on": "start", "timeout": 300,
                "blocks_login": True},
               {"name": "save", "script": "sync", "run_on": "stop"}]
    metadata = [{"key": "load", "script": "cat /proc/loadavg", "interval": 10, "timeout": 5}]
    doc = {
        "*": {"motd": "welcome", "env": {"EDITOR": "vi"}, "owner": "ops",
              "metadata": metadata},
        "alpha": {"motd": "alpha's own", "scripts": scripts, "directory": "/src",
                  "authorized_keys": ["ssh-ed25519 AAAAC3Nz alice@laptop"]},
        "gamma": {"env": {"A": "1"}},
    }
    relay = harness.relay(extra=["--manifest", write_manifest(tmp_path, doc),
                                 "--stats-interval", "7"])

    async def manifest(name):
        peer = await connect(relay, name)
        await peer.ws.close()
        return peer.controls[-1]

    got = {name: run(manifest(name)) for name in ("alpha", "beta", "gamma")}
    assert got["alpha"] == {
        "type": "manifest", "workspace": "alpha", "stats_interval": 7, "motd": "alpha's own",
        "env": {"EDITOR": "vi"}, "owner": "ops", "metadata": metadata, "scripts": scripts,
        "directory": "/src", "authorized_keys": ["ssh-ed25519 AAAAC3Nz alice@laptop"]}
    assert got["beta"] == {
        "type": "manifest", "workspace": "beta", "stats_interval": 7, "motd": "welcome",
        "env": {"EDITOR": "vi"}, "owner": "ops", "metadata": metadata}
    # member by member: gamma's env replaces "*"'s whole, the rest comes from "*"
    assert got["gamma"] == {
        "type": "manifest", "workspace": "gamma", "stats_interval": 7, "motd": "welcome",
        "env": {"A": "1"}, "owner": "ops", "metadata": metadata}


def test_no_manifest_file_sends_the_plain_manifest(relay):
    async def go():
        peer = await connect(relay, "beta")
        return peer.controls[-1]
    assert run(go()) == {"type": "manifest", "workspace": "beta", "stats_interval": 30}


BAD_MANIFESTS = [
    ("bad_json", '{"alpha": {"motd": "x",}}', ["invalid JSON", "line 1"]),
    ("not_an_object", '["alpha"]', ["must be a JSON object"]),
    ("unknown_workspace", {"alpha": {"motd": "x"}, "zeta": {"motd": "y"}},
     ['"zeta"', "not in the tokens file"]),
    ("entry_not_object", {"beta": "motd"}, ['"beta"', "object"]),
    ("unknown_member", {"alpha": {"motdd": "x"}}, ['"alpha"', '"motdd"']),
    ("relay_member", {"*": {"stats_interval": 5}}, ['"*"', '"stats_interval"']),
    ("bad_run_on", {"alpha": {"scripts": [{"name": "b", "script": "make", "run_on": "later"}]}},
     ['"alpha"', "scripts", "run_on"]),
    ("bad_script_name", {"gamma": {"scripts": [
        {"name": "has space", "script": "make", "run_on": "start"}]}},
     ['"gamma"', "scripts", "name"]),
    ("script_missing", {"*": {"scripts": [{"name": "b", "run_on": "start"}]}},
     ['"*"', "scripts", "script"]),
    ("too_many_scripts", {"alpha": {"scripts": [
        {"name": "s%d" % i, "script": "true", "run_on": "start"} for i in range(33)]}},
     ['"alpha"', "scripts"]),
    ("duplicate_metadata_key", {"beta": {"metadata": [{"key": "k", "script": "a"},
                                                      {"key": "k", "script": "b"}]}},
     ['"beta"', "metadata", "twice"]),
    ("env_not_strings", {"alpha": {"env": {"A": 1}}}, ['"alpha"', "env"]),
    ("too_big_merged", {"*": {"motd": "m" * 4000,
                              "authorized_keys": ["k" * 4000] * 150},
                        "alpha": {"env": {"V%d" % i: "v" * 4000 for i in range(120)}}},
     ['"alpha"', "bytes"]),
]


@pytest.mark.parametrize("name,doc,needles", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_file_exit_2(harness, tmp_path, name, doc, needles):
    path = write_manifest(tmp_path, doc)
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("tether: "), r.stderr
    assert str(path) in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert r.stdout == ""


def test_manifest_file_missing_or_too_big_exit_2(harness, tmp_path):
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", tmp_path / "nope.json")
    assert r.returncode == 2 and "nope.json" in r.stderr, r.stderr
    big = write_manifest(tmp_path, json.dumps({"*": {"motd": "x" * (16 << 20)}}))
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", big)
    assert r.returncode == 2 and "larger than" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["0", "-1", "1000001", "ten", "", "5x"])
def test_bad_log_lines_exit_2(harness, value):
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--log-lines", value)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--log-lines" in r.stderr


def test_help_mentions_the_new_options(harness):
    r = harness.run("relay", "--help")
    assert r.returncode == 0
    assert "--manifest FILE" in r.stdout and "--log-lines N" in r.stdout
