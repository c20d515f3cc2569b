"""The relay's HTTP API: /api/v1/workspaces and /api/v1/workspaces/NAME, auth and scoping."""
import json
import time

import pytest

from conftest import ADMIN, ONLY_A, WORKSPACES, wait_until

FIELDS = {"name", "connected", "agent_version", "last_seen", "hostname", "os", "arch",
          # activity (PROTOCOL.md 12.5, 12.6): null / empty until the agent's first stats
          "last_activity", "idle_seconds", "sessions", "rx_bytes", "tx_bytes", "ports",
          # lifecycle and reports (PROTOCOL.md 12.7, 12.9): null / empty until reported
          "lifecycle", "lifecycle_changed_at", "metadata", "forward_ports"}


def test_list_before_any_agent(relay):
    doc = relay.api_json("/api/v1/workspaces")
    assert isinstance(doc, list)
    assert [w["name"] for w in doc] == list(WORKSPACES)  # tokens file order
    for w in doc:
        assert set(w) == FIELDS, w
        assert w["connected"] is False
        assert w["last_seen"] is None
        assert w["agent_version"] is None
        assert w["idle_seconds"] is None and w["last_activity"] is None
        assert w["sessions"] == {} and w["ports"] == []


def test_list_and_one_with_agent(relay, agent):
    now_ms = time.time() * 1000
    doc = relay.api_json("/api/v1/workspaces")
    byname = {w["name"]: w for w in doc}
    a = byname["alpha"]
    assert a["connected"] is True
    assert isinstance(a["agent_version"], str) and a["agent_version"]
    assert isinstance(a["last_seen"], int)
    assert abs(a["last_seen"] - now_ms) < 10000, "last_seen %d is not fresh (now %d)" % (
        a["last_seen"], now_ms)
    assert a["os"] == "linux"
    assert a["hostname"] and a["arch"]
    for other in WORKSPACES[1:]:
        assert byname[other]["connected"] is False
    one = relay.api_json("/api/v1/workspaces/alpha")
    assert set(one) == FIELDS
    assert one["name"] == "alpha" and one["connected"] is True
    assert one["agent_version"] == a["agent_version"]


def test_agent_version_matches_binary(harness, relay, agent):
    r = harness.run("version")
    version = r.stdout.split()[1]
    assert relay.workspace("alpha")["agent_version"] == version


def test_last_seen_advances_with_keepalive(harness):
    """With a 1 s keepalive the agent's PINGs/PONGs keep last_seen fresh."""
    relay = harness.relay(keepalive=("1s", "3s"))
    harness.agent(relay, "alpha", keepalive=("1s", "3s"))
    first = relay.workspace("alpha")["last_seen"]
    wait_until(lambda: relay.workspace("alpha")["last_seen"] > first, timeout=10,
               what="last_seen to advance")
    time.sleep(2.5)
    w = relay.workspace("alpha")
    assert w["connected"] is True
    assert abs(w["last_seen"] - time.time() * 1000) < 10000


def _assert_generic_401(status, body, tokens):
    assert status == 401, (status, body)
    text = body.decode("utf-8", "replace")
    assert len(body) < 200, "401 body too detailed: %r" % text
    for ws in WORKSPACES:
        assert ws not in text, "401 body reveals workspace names: %r" % text
    for tok in list(tokens.agent.values()) + [t for t, _ in tokens.user.values()]:
        assert tok not in text
    if body.strip():
        doc = json.loads(body)
        assert set(doc) <= {"error"}, doc


@pytest.mark.parametrize("path", ["/api/v1/workspaces", "/api/v1/workspaces/alpha",
                                  "/api/v1/workspaces/nosuch"])
def test_401_without_token(relay, path):
    status, body = relay.api(path, token=None, user=None)
    _assert_generic_401(status, body, relay.tokens)


@pytest.mark.parametrize("path", ["/api/v1/workspaces", "/api/v1/workspaces/alpha",
                                  "/api/v1/workspaces/nosuch"])
def test_401_wrong_token(relay, path):
    status, body = relay.api(path, token="wrong-token")
    _assert_generic_401(status, body, relay.tokens)


def test_401_bodies_identical(relay):
    """No hint whether a token was missing, wrong, an agent's, or a prefix of a real one."""
    real = relay.tokens.user_token(ADMIN)
    bodies = set()
    for tok in (None, "wrong", real[:-1], real + "x", relay.tokens.agent["alpha"], ""):
        status, body = relay.api("/api/v1/workspaces", token=tok, user=None)
        assert status == 401, (tok, status, body)
        bodies.add(body)
    assert len(bodies) == 1, bodies


def test_agent_token_cannot_read_api(relay):
    status, body = relay.api("/api/v1/workspaces", token=relay.tokens.agent["alpha"])
    _assert_generic_401(status, body, relay.tokens)


def test_non_bearer_scheme_refused(relay):
    status, _ = relay.api("/api/v1/workspaces", token=None, user=None)
    assert status == 401
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("GET", "/api/v1/workspaces",
                     headers={"Authorization": "Basic " + relay.tokens.user_token(ADMIN)})
        r = conn.getresponse()
        r.read()
        assert r.status == 401
    finally:
        conn.close()


def test_healthz_answers_without_a_token_and_tells_nothing_else(relay, agent):
    """GET /healthz: 200 {"status":"ok"} for probes, with no token, naming no workspace;
    a neighbouring path or another method is not it."""
    status, body = relay.api("/healthz", token=None, user=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}, (status, body)
    status, body = relay.api("/healthz", token="wrong-token")
    assert status == 200 and b"alpha" not in body, (status, body)
    for path in ("/healthz/", "/healthz/alpha", "/api/v1/healthz"):
        assert relay.api(path, token=None, user=None)[0] in (401, 404), path
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("HEAD", "/healthz")
        r = conn.getresponse()
        r.read()
        assert r.status == 405
    finally:
        conn.close()


def test_404_unknown_workspace(relay):
    status, body = relay.api("/api/v1/workspaces/nosuch")
    assert status == 404, body


def test_404_bad_path(relay):
    for path in ("/api/v1/nothing", "/api/v1/workspaces/alpha/extra", "/"):
        status, _ = relay.api(path)
        assert status == 404, path


def test_limited_user_sees_only_its_workspace(relay, agent):
    doc = relay.api_json("/api/v1/workspaces", user=ONLY_A)
    assert [w["name"] for w in doc] == ["alpha"]
    assert doc[0]["connected"] is True
    assert relay.api_json("/api/v1/workspaces/alpha", user=ONLY_A)["name"] == "alpha"
    status_b, body_b = relay.api("/api/v1/workspaces/beta", user=ONLY_A)
    assert status_b == 404
    # indistinguishable from a workspace that does not exist
    status_x, body_x = relay.api("/api/v1/workspaces/nosuch", user=ONLY_A)
    assert status_x == 404
    assert body_b == body_x, (body_b, body_x)
    assert b"beta" not in body_b


def test_connected_false_after_sigterm(relay, agent):
    agent.terminate()
    wait_until(lambda: relay.workspace("alpha")["connected"] is False, timeout=10,
               what="alpha to go offline")
    w = relay.workspace("alpha")
    assert w["last_seen"] is not None  # remembered after the agent left
    assert w["agent_version"]           # the latest hello stays visible


def test_second_agent_replaces_first(harness, relay, agent):
    """A second agent for the same workspace replaces the first: the relay sends the old
    connection GOAWAY REPLACED (the old agent logs it); the workspace stays connected."""
    second = harness.agent(relay, "alpha", wait=False)
    wait_until(lambda: "connected to the relay" in second.stderr(), timeout=15,
               what="second agent to connect")
    wait_until(lambda: "replaced" in agent.stderr().lower(), timeout=15,
               what="the first agent to be told it was replaced")
    # "connected" needs the second agent's HELLO, which may follow its websocket's opening.
    wait_until(lambda: relay.connected("alpha"), timeout=15, what="alpha connected again")
    assert second.alive() and agent.alive()
