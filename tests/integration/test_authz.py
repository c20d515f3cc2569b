"""The relay's authorization matrix (PROTOCOL.md §14.1, §14.8): every endpoint the relay
serves, against every class of credential, for a workspace the credential may use, one it
may not, one whose agent is offline, and one that does not exist.

ENDPOINTS below is the list of endpoints; test_every_route_of_the_relay_is_in_the_table
fails when the relay's source (tunnel/relay.c, and tunnel/route*.c where the route parsing
lives) gains a route kind or a path literal that the table does not cover.

What the matrix asserts, besides each status:
  - a user token for A reaches nothing of B, by any endpoint: B answers exactly as a
    workspace that does not exist (status, body, type), for HTTP and websocket upgrades;
  - no credential learns whether a workspace it may not use exists;
  - an agent token is refused (401) on every user endpoint, a user token on /api/v1/agent;
  - the list, /metrics and /logs show only what the token may see;
  - the web terminal's cookie works on the page and, with an Origin that is the relay
    itself, on the pty websocket; nowhere else.

Requests are written by hand on a socket, so malformed headers reach the relay as written.
"""
import asyncio
import base64
import json
import os
import re
import socket
import urllib.parse

import pytest
import websockets

from conftest import (ADMIN, ONLY_A, REPO_ROOT, Harness, Procs, TcpServer, Tokens,
                      echo_handler, wait_until)

A = "alpha"       # the workspace ONLY_A may use; its agent is connected
B = "bravo"       # another workspace; its agent is connected
OFF = "gamma"     # a workspace whose agent is not connected
SPARE = "delta"   # a workspace with no agent: its agent token is the one tried on /api/v1/agent
NOWS = "omega"    # a valid name that is no workspace
WORKSPACES = (A, B, OFF, SPARE)
PROBED = (A, B, OFF, NOWS)
assert len({len(w) for w in PROBED}) == 1  # same length: lengths of answers cannot differ

PTY_ID = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"  # one PTY per workspace, reattached each time
PTY_QUERY = "?id=%s&rows=24&cols=80&command=cat" % PTY_ID


# ---------------------------------------------------------------------------------------
# raw HTTP


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lowercase name -> value (the last one)
        self.body = body

    def __repr__(self):
        return "HTTP %d %r %r" % (self.status, self.headers.get("content-type"),
                                  self.body[:200])


def exchange(port, method, path, headers=(), body=b"", upgrade=False, timeout=15):
    """Sends one request as written; returns a Response (a 101 with an empty body)."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade",
                  "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
                  "Sec-WebSocket-Version: 13"]
    else:
        lines.append("Connection: close")
    if body or method == "POST":
        lines += ["Content-Type: application/x-www-form-urlencoded",
                  "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % (k, v) for k, v in headers]
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, "%s %s: the relay closed without an answer (got %r)" % (
                method, path, data)
            data += chunk
            assert len(data) < 1 << 20, "%s %s: no end of headers" % (method, path)
        head, rest = data.split(b"\r\n\r\n", 1)
        first, *hlines = head.decode("latin-1").split("\r\n")
        status = int(first.split()[1])
        hdrs = {}
        for line in hlines:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status == 101:
            return Response(status, hdrs, b"")
        want = int(hdrs.get("content-length", "-1"))
        while want < 0 or len(rest) < want:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            rest += chunk
        return Response(status, hdrs, rest if want < 0 else rest[:want])
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# credentials


# Authorization headers that carry no usable token: each must be answered as no header.
MALFORMED = {
    "basic": lambda t: "Basic " + t["admin"],
    "noscheme": lambda t: t["admin"],
    "bare": lambda t: "Bearer",
    "empty": lambda t: "Bearer ",
    "twospaces": lambda t: "Bearer  " + t["admin"],
    "suffix": lambda t: "Bearer " + t["admin"] + " x",
    "prefix": lambda t: "Bearer " + t["admin"][:-1],
    "oversize": lambda t: "Bearer " + t["admin"] + "a" * 1200,
}
# The same, as the login form's body (where the token travels on POST /w/NAME/login).
MALFORMED_FORM = {
    "basic": lambda t: "token=Basic+" + t["admin"],
    "noscheme": lambda t: "tokn=" + t["admin"],
    "bare": lambda t: "token",
    "empty": lambda t: "token=",
    "twospaces": lambda t: "token=+" + t["admin"],
    "suffix": lambda t: "token=" + t["admin"] + "+x",
    "prefix": lambda t: "token=" + t["admin"][:-1],
    "oversize": lambda t: "token=" + t["admin"] + "a" * 1200,
}

BEARER_USERS = ("user_a", "admin")
COOKIES = ("cookie_a", "cookie_a_foreign", "cookie_a_no_origin")
CREDS = (["none"] + ["malformed:" + k for k in MALFORMED] +
         ["unknown", "agent", "user_a", "admin"] + list(COOKIES))


def user_of(cred):
    """The user whose workspaces the credential may use, or None."""
    if cred == "admin":
        return ADMIN
    if cred == "user_a" or cred in COOKIES:
        return ONLY_A
    return None


def allowed(cred, ws):
    user = user_of(cred)
    if user == ADMIN:
        return ws in WORKSPACES
    return user == ONLY_A and ws == A


def cred_headers(env, cred, route):
    """The headers of a request with this credential (none for a login POST's body)."""
    t = env.secrets
    origin = "http://127.0.0.1:%d" % env.relay.port
    if cred == "none":
        return []
    if cred.startswith("malformed:"):
        return [("Authorization", MALFORMED[cred.split(":", 1)[1]](t))]
    if cred == "unknown":
        return [("Authorization", "Bearer " + t["unknown"])]
    if cred == "agent":
        # On /api/v1/agent, the token of a workspace without an agent: the live agents
        # must not be replaced. Everywhere else, the token of A's own agent.
        tok = t["agent_spare"] if route is not None and route.kind == "AGENT" else t["agent_a"]
        return [("Authorization", "Bearer " + tok)]
    if cred == "user_a":
        return [("Authorization", "Bearer " + t["user_a"])]
    if cred == "admin":
        return [("Authorization", "Bearer " + t["admin"])]
    h = [("Cookie", env.cookie_a)]
    if cred == "cookie_a":
        h.append(("Origin", origin))
    elif cred == "cookie_a_foreign":
        h.append(("Origin", "http://evil.example"))
    return h


def login_body(env, cred):
    t = env.secrets
    if cred.startswith("malformed:"):
        return MALFORMED_FORM[cred.split(":", 1)[1]](t)
    token = {"unknown": t["unknown"], "agent": t["agent_a"], "user_a": t["user_a"],
             "admin": t["admin"]}.get(cred)
    return "" if token is None else "token=" + urllib.parse.quote(token, safe="")


# ---------------------------------------------------------------------------------------
# the endpoints


class Route:
    """One endpoint: how to ask it, and what each credential gets for each workspace.

    family/kind name the relay's route enum member it exercises (tunnel/route.h:
    enum route_kind -> "api", enum route_web_kind -> "web"); literals, the path strings
    of the relay's source that its matching uses."""

    def __init__(self, rid, method, path, family, kind, literals=(), upgrade=False,
                 subprotocol=None):
        self.id = rid
        self.method = method
        self.path = path            # with {ws} and {port} where they go
        self.family = family
        self.kind = kind
        self.literals = tuple(literals)
        self.upgrade = upgrade
        self.subprotocol = subprotocol
        self.scoped = "{ws}" in path

    def request(self, env, cred, ws):
        path = self.path.format(ws=ws, port=env.echo.port)
        headers = cred_headers(env, cred, self)
        if self.subprotocol:
            headers.append(("Sec-WebSocket-Protocol", self.subprotocol))
        body = b""
        if self.kind == "LOGIN" and self.method == "POST":
            body = login_body(env, cred).encode()
            headers = [h for h in headers if h[0] == "Cookie"]  # the token goes in the body
        return exchange(env.relay.port, self.method, path, headers, body, self.upgrade)

    def expected(self, env, cred, ws):
        """The status for cred on workspace ws (None for unscoped routes)."""
        user = user_of(cred)
        bearer_user = cred in BEARER_USERS
        k = self.kind
        if k in ("LIST", "METRICS"):
            return 200 if bearer_user else 401
        if k == "HEALTH":
            return 200              # for probes: no credential needed, none refused
        if k in ("ONE", "LOGS"):
            if not bearer_user:
                return 401
            return 200 if allowed(cred, ws) else 404
        if k == "AGENT":
            return 101 if cred == "agent" else 401
        if k in ("TCP", "SSH", "PTY"):
            if k == "PTY" and cred in COOKIES:
                if cred != "cookie_a":
                    return 403      # the cookie needs an Origin that is the relay itself
            elif not bearer_user:
                return 401          # the cookie counts on the pty websocket only
            if not allowed(cred, ws):
                return 404
            return 101 if ws in (A, B) else 503
        if k == "PAGE":
            if self.method != "GET":
                return 405
            if not env.assets_complete:
                return 503
            if user is None:
                return 303
            return 200 if allowed(cred, ws) else 404
        if k == "LOGIN":
            if self.method == "GET":
                return 200
            return 303 if bearer_user and allowed(cred, ws) else 401
        if k == "LOGOUT":
            return 303
        raise AssertionError("no expectation for %s" % self.id)

    def check_content(self, env, cred, ws, r):
        """What a successful answer holds, beyond its status."""
        if self.kind == "HEALTH":
            # The same answer for everyone, and it names no workspace.
            assert json.loads(r.body) == {"status": "ok"}, (cred, r.body)
        elif r.status == 200 and self.kind == "LIST":
            names = [w["name"] for w in json.loads(r.body)]
            want = [w for w in WORKSPACES if allowed(cred, w)]
            assert names == want, "list for %s: %r, want %r" % (cred, names, want)
        elif r.status == 200 and self.kind == "ONE":
            assert json.loads(r.body)["name"] == ws
        elif r.status == 200 and self.kind == "LOGS":
            assert "lines" in json.loads(r.body)
        elif r.status == 200 and self.kind == "METRICS":
            seen = set(re.findall(r'workspace="([^"]*)"', r.body.decode()))
            want = {w for w in WORKSPACES if allowed(cred, w)}
            assert seen == want, "/metrics for %s names %r, want %r" % (cred, seen, want)
        elif r.status == 200 and self.kind == "PAGE":
            assert r.headers["content-type"].startswith("text/html")
        elif r.status == 303 and self.kind == "PAGE":
            assert r.headers["location"] == "/w/%s/login" % ws
        elif r.status == 303 and self.kind == "LOGIN":
            assert r.headers["location"] == "/w/%s" % ws
            assert r.headers["set-cookie"].startswith("tether_token=")
            assert "HttpOnly" in r.headers["set-cookie"]
        elif self.kind == "LOGIN":
            assert "set-cookie" not in r.headers, (cred, ws, r.headers)
        elif self.kind == "LOGOUT":
            assert r.headers["set-cookie"].startswith("tether_token=;")
            assert "Max-Age=0" in r.headers["set-cookie"]


API = "/api/v1/workspaces"
ENDPOINTS = [
    Route("list", "GET", API, "api", "LIST", ["/api/v1/workspaces"]),
    Route("list-slash", "GET", API + "/", "api", "LIST", ["/api/v1/workspaces/"]),
    Route("one", "GET", API + "/{ws}", "api", "ONE"),
    Route("logs", "GET", API + "/{ws}/logs", "api", "LOGS", ["/logs"]),
    Route("logs-query", "GET", API + "/{ws}/logs?after=0", "api", "LOGS", ["/logs"]),
    Route("metrics", "GET", "/metrics", "api", "METRICS", ["/metrics"]),
    Route("healthz", "GET", "/healthz", "api", "HEALTH", ["/healthz"]),
    Route("ws-agent", "GET", "/api/v1/agent", "api", "AGENT", ["/api/v1/agent"],
          upgrade=True, subprotocol="tether.v1"),
    Route("ws-tcp", "GET", API + "/{ws}/tcp/{port}", "api", "TCP", ["/tcp/"], upgrade=True),
    Route("ws-ssh", "GET", API + "/{ws}/ssh", "api", "SSH", ["/ssh"], upgrade=True),
    Route("ws-pty", "GET", API + "/{ws}/pty" + PTY_QUERY, "api", "PTY", ["/pty"],
          upgrade=True),
    Route("web-page", "GET", "/w/{ws}", "web", "PAGE", ["/w/"]),
    Route("web-page-slash", "GET", "/w/{ws}/", "web", "PAGE", ["/"]),
    Route("web-page-post", "POST", "/w/{ws}", "web", "PAGE"),
    Route("web-login-form", "GET", "/w/{ws}/login", "web", "LOGIN", ["/login"]),
    Route("web-login", "POST", "/w/{ws}/login", "web", "LOGIN"),
    Route("web-logout", "GET", "/w/{ws}/logout", "web", "LOGOUT", ["/logout"]),
    Route("web-logout-post", "POST", "/w/{ws}/logout", "web", "LOGOUT"),
]
# GET /web/FILE: public, the same for every credential (the files hold no secret).
ASSET_LITERALS = ["/web/"]
OWN_ASSETS = ["term.js", "login.js", "term.css"]
NPM_ASSETS = ["xterm.js", "xterm.css", "addon-fit.js"]

# Every endpoint asked the wrong way, and paths that are no endpoint: 404 (405 for other
# methods on the JSON API) for every credential, before any token is looked at.
WRONG_TRANSPORT = (
    [("GET", p, False) for p in ["/api/v1/agent", API + "/{ws}/tcp/22", API + "/{ws}/ssh",
                                 API + "/{ws}/pty" + PTY_QUERY]] +
    [("GET", p, True) for p in [API, API + "/", API + "/{ws}", API + "/{ws}/logs", "/metrics",
                                "/healthz",
                                "/w/{ws}", "/w/{ws}/login", "/w/{ws}/logout",
                                "/web/term.js"]])
NOT_ENDPOINTS = ["/", "/api", "/api/v1", "/api/v1/", "/api/v1/agent/", "/api/v1/agents",
                 "/metrics/", "/healthz/", API + "/{ws}/", API + "/{ws}/tcp",
                 API + "/{ws}/tcp/", API + "/{ws}/tcp/0", API + "/{ws}/tcp/65536",
                 API + "/{ws}/tcp/22x", API + "/{ws}/tcp/-1", API + "/{ws}/ssh/",
                 API + "/{ws}/pty/x", API + "/{ws}/logs/", API + "/{ws}/extra",
                 API + "/a%20b", API + "/" + "x" * 65, "/w", "/w/", "/w/{ws}/x",
                 "/w/{ws}/login/", "/w/a%20b", "/web"]


# ---------------------------------------------------------------------------------------
# the relay under test


class Env:
    pass


@pytest.fixture(scope="module")
def env(tether_bin, tmp_path_factory):
    """A relay knowing alpha, beta, gamma and delta; agents for alpha and beta; an echo
    server for the tcp websocket; and the web cookie of the user allowed only alpha."""
    tmp = tmp_path_factory.mktemp("authz")
    procs = Procs(tmp / "logs")
    tokens = Tokens(tmp / "tokens", workspaces=WORKSPACES)
    h = Harness(tether_bin, procs, tokens)
    echo = TcpServer(echo_handler())
    try:
        relay = h.relay()
        for ws in (A, B):
            h.agent(relay, ws)

        def reported():
            text = relay.api("/metrics")[1].decode()
            return all('tether_workspace_lifecycle{workspace="%s"' % ws in text and
                       'tether_workspace_idle_seconds{workspace="%s"' % ws in text
                       for ws in (A, B))
        wait_until(reported, timeout=20, what="both agents' stats and lifecycle in /metrics")
        e = Env()
        e.procs, e.tokens, e.relay, e.echo = procs, tokens, relay, echo
        e.secrets = {
            "admin": tokens.user_token(ADMIN), "user_a": tokens.user_token(ONLY_A),
            "agent_a": tokens.agent[A], "agent_spare": tokens.agent[SPARE],
            "unknown": tokens.bogus_file().read_text().strip()}
        r = exchange(relay.port, "POST", "/w/%s/login" % A,
                     body=("token=" + e.secrets["user_a"]).encode())
        assert r.status == 303, r
        e.cookie_a = r.headers["set-cookie"].split(";")[0]
        page = exchange(relay.port, "GET", "/w/" + A,
                        [("Authorization", "Bearer " + e.secrets["admin"])])
        assert page.status in (200, 503), page
        e.assets_complete = page.status == 200
        yield e
    finally:
        echo.close()
        procs.cleanup()


def normalized(r, ws):
    """What a client can compare between two answers, with the workspace's name blanked."""
    def blank(v):
        return v.replace(ws.encode() if isinstance(v, bytes) else ws,
                         b"NAME" if isinstance(v, bytes) else "NAME")
    return (r.status, r.headers.get("content-type"), blank(r.headers.get("location", "")),
            "set-cookie" in r.headers, blank(r.body))


def run_matrix(env, route):
    """Asks route with every credential for every probed workspace; returns the mismatches
    (empty when all is as the table says)."""
    problems = []
    names = PROBED if route.scoped else (None,)
    for cred in CREDS:
        got = {}
        for ws in names:
            r = route.request(env, cred, ws)
            got[ws] = r
            want = route.expected(env, cred, ws)
            if r.status != want:
                problems.append("%s %s as %s: HTTP %d, want %d (%r)" % (
                    route.method, route.path.format(ws=ws, port="PORT"), cred, r.status, want,
                    r.body[:120]))
                continue
            try:
                route.check_content(env, cred, ws, r)
            except AssertionError as ex:
                problems.append("%s as %s on %s: %s" % (route.id, cred, ws, ex))
        if not route.scoped:
            continue
        # A workspace the credential may not use answers as one that does not exist.
        ref = normalized(got[NOWS], NOWS)
        for ws in names:
            if ws != NOWS and not allowed(cred, ws) and normalized(got[ws], ws) != ref:
                problems.append("%s as %s: %s is told apart from a missing workspace: "
                                "%r vs %r" % (route.id, cred, ws, normalized(got[ws], ws), ref))
    return problems


# ---------------------------------------------------------------------------------------
# the matrix


@pytest.mark.parametrize("route", ENDPOINTS, ids=[r.id for r in ENDPOINTS])
def test_matrix(env, route):
    problems = run_matrix(env, route)
    assert not problems, "\n".join(problems)


def test_assets_are_public_and_the_same_for_every_credential(env):
    served = OWN_ASSETS + (NPM_ASSETS if env.assets_complete else [])
    absent = ["nope.js", "index.html", "../tokens.json", "term.js/"] + (
        [] if env.assets_complete else NPM_ASSETS)
    problems = []
    for name in served + absent:
        want = 200 if name in served else 404
        bodies = set()
        for cred in CREDS:
            r = exchange(env.relay.port, "GET", "/web/" + name, cred_headers(env, cred, None))
            bodies.add(r.body)
            if r.status != want:
                problems.append("/web/%s as %s: HTTP %d, want %d" % (name, cred, r.status, want))
            if "set-cookie" in r.headers:
                problems.append("/web/%s as %s sets a cookie" % (name, cred))
        if len(bodies) != 1:
            problems.append("/web/%s: the body depends on the credential" % name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cred", CREDS)
def test_wrong_transport_and_non_endpoints_are_404(env, cred):
    """An endpoint asked over the other transport, and paths that are no endpoint, are 404
    whatever the credential and whether the workspace exists or not."""
    problems = []
    cases = WRONG_TRANSPORT + [("GET", p, u) for p in NOT_ENDPOINTS for u in (False, True)]
    for method, path, upgrade in cases:
        for ws in (PROBED if "{ws}" in path else (None,)):
            p = path.format(ws=ws)
            r = exchange(env.relay.port, method, p, cred_headers(env, cred, None),
                         upgrade=upgrade)
            if r.status != 404:
                problems.append("%s %s%s: HTTP %d, want 404" % (
                    method, p, " (upgrade)" if upgrade else "", r.status))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cred", CREDS)
def test_other_methods_on_the_json_api_are_405(env, cred):
    for path in [API, API + "/" + A, API + "/" + B, API + "/" + NOWS, API + "/" + A + "/logs",
                 "/metrics"]:
        r = exchange(env.relay.port, "POST", path, cred_headers(env, cred, None), b"x=1")
        assert r.status == 405, (path, r)


# ---------------------------------------------------------------------------------------
# details the matrix leaves out


def test_user_a_reaches_a_and_not_b_end_to_end(env):
    """The positive cases carry bytes: user A's tcp websocket echoes through alpha's agent;
    the same request for beta is refused before any stream is opened."""
    async def echo(ws):
        url = "%s%s/%s/tcp/%d" % (env.relay.url, API, ws, env.echo.port)
        async with websockets.connect(
                url, extra_headers={"Authorization": "Bearer " + env.secrets["user_a"]},
                open_timeout=15, ping_interval=None) as c:
            await c.send(b"ping-authz")
            got = b""
            while len(got) < 10:
                got += await asyncio.wait_for(c.recv(), 15)
            return got
    assert asyncio.run(asyncio.wait_for(echo(A), 30)) == b"ping-authz"
    before = env.echo.accepted
    with pytest.raises(Exception) as ei:
        asyncio.run(asyncio.wait_for(echo(B), 30))
    assert getattr(ei.value, "status_code", None) == 404, ei.value
    assert env.echo.accepted == before, "a refused request reached the echo server"


def test_a_bad_pty_query_for_b_is_404_not_400(env):
    """The pty query is checked after the workspace: a bad query cannot probe for names."""
    path = API + "/%s/pty?id=nope&rows=x"
    for cred, ws, want in [("user_a", A, 400), ("user_a", B, 404), ("user_a", NOWS, 404),
                           ("cookie_a", A, 400), ("cookie_a", B, 404), ("admin", B, 400),
                           ("admin", NOWS, 404)]:
        r = exchange(env.relay.port, "GET", path % ws, cred_headers(env, cred, None),
                     upgrade=True)
        assert r.status == want, (cred, ws, r)
    b = exchange(env.relay.port, "GET", path % B, cred_headers(env, "user_a", None), upgrade=True)
    z = exchange(env.relay.port, "GET", path % NOWS, cred_headers(env, "user_a", None),
                 upgrade=True)
    assert b.body == z.body


@pytest.mark.parametrize("origin,want", [
    ("http://127.0.0.1:{port}", 101),
    ("HTTP://127.0.0.1:{port}", 101),           # compared case-insensitively
    ("https://127.0.0.1:{port}", 403),          # the scheme must be the relay's
    ("http://127.0.0.1:{port}/", 403),
    ("http://127.0.0.1:{other}", 403),
    ("http://localhost:{port}", 403),           # not the Host the request names
    ("http://127.0.0.1", 403),
    ("null", 403),
    ("http://evil.example", 403),
    ("", 403),
])
def test_cookie_on_the_pty_websocket_needs_the_relays_own_origin(env, origin, want):
    port = env.relay.port
    o = origin.format(port=port, other=port + 1 if port < 65535 else port - 1)
    headers = [("Cookie", env.cookie_a)] + ([("Origin", o)] if o else [])
    r = exchange(port, "GET", API + "/" + A + "/pty" + PTY_QUERY, headers, upgrade=True)
    assert r.status == want, (o, r)


def test_the_bearer_header_wins_over_the_cookie(env):
    """A request with both is judged by its header alone: a cookie does not rescue a bad
    header, nor widen a good one."""
    port, origin = env.relay.port, "http://127.0.0.1:%d" % env.relay.port
    admin_cookie = exchange(port, "POST", "/w/%s/login" % B,
                            body=("token=" + env.secrets["admin"]).encode())
    assert admin_cookie.status == 303
    cookie = admin_cookie.headers["set-cookie"].split(";")[0]
    pty = API + "/%s/pty" + PTY_QUERY
    cases = [("Bearer " + env.secrets["unknown"], A, 401),
             ("Bearer " + env.secrets["agent_a"], A, 401),
             ("Bearer " + env.secrets["user_a"], B, 404)]
    for auth, ws, want in cases:
        h = [("Authorization", auth), ("Cookie", cookie), ("Origin", origin)]
        r = exchange(port, "GET", pty % ws, h, upgrade=True)
        assert r.status == want, (auth[:20], ws, r)
        r = exchange(port, "GET", "/w/" + ws, h)
        assert r.status == (303 if want == 401 else 404), (auth[:20], ws, r)
    # a cookie with the admin token is still only accepted where cookies are
    for path, up in [(API, False), (API + "/" + B, False), ("/metrics", False),
                     (API + "/%s/tcp/%d" % (B, env.echo.port), True), (API + "/%s/ssh" % B, True),
                     ("/api/v1/agent", True)]:
        r = exchange(port, "GET", path, [("Cookie", cookie), ("Origin", origin)], upgrade=up)
        assert r.status == 401, (path, r)


def test_a_login_needs_the_token_in_the_form_not_a_header(env):
    """POST /w/NAME/login sets a cookie only for a form token allowed NAME; a bearer header
    or a cookie of another user does not log anyone in."""
    port = env.relay.port
    for headers in ([("Authorization", "Bearer " + env.secrets["admin"])],
                    [("Cookie", env.cookie_a)]):
        for ws in (A, B):
            r = exchange(port, "POST", "/w/%s/login" % ws, headers, b"")
            assert r.status == 401 and "set-cookie" not in r.headers, (headers[0][0], ws, r)


def test_an_agent_token_connects_only_as_its_own_workspace(env):
    """delta's agent token opens /api/v1/agent as delta: alpha and beta stay connected and
    keep their agents."""
    r = exchange(env.relay.port, "GET", "/api/v1/agent",
                 [("Authorization", "Bearer " + env.secrets["agent_spare"]),
                  ("Sec-WebSocket-Protocol", "tether.v1")], upgrade=True)
    assert r.status == 101, r
    for ws in (A, B):
        assert env.relay.connected(ws), ws
    for p in env.procs.procs:
        assert p.alive(), p.describe()


def test_logs_of_b_stay_hidden_from_a(env):
    """alpha's /logs holds alpha's lines; user A gets nothing of beta's, even with a query."""
    for q in ("", "?after=0", "?after=x", "?after=0&after=1"):
        b = exchange(env.relay.port, "GET", API + "/%s/logs%s" % (B, q),
                     cred_headers(env, "user_a", None))
        z = exchange(env.relay.port, "GET", API + "/%s/logs%s" % (NOWS, q),
                     cred_headers(env, "user_a", None))
        assert b.status == z.status == 404 and b.body == z.body, (q, b, z)


# ---------------------------------------------------------------------------------------
# the table covers every route of the relay


# Path literals of the route sources that are no route, and why.
NOT_ROUTES = {
    "/bin/sh": "the shell that runs --on-idle",
    "/w/%s/login": "the Location of redirects to the login form",
    "/w/%s": "the Location after a login",
}


def c_string_literals(src):
    """The string literals of C source, comments and character constants skipped."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif c in "\"'":
            j, buf = i + 1, []
            while j < n and src[j] != c:
                if src[j] == "\\" and j + 1 < n:
                    buf.append(src[j:j + 2])
                    j += 2
                else:
                    buf.append(src[j])
                    j += 1
            if c == '"':
                out.append("".join(buf))
            i = j + 1
        else:
            i += 1
    return out


def route_sources():
    tunnel = REPO_ROOT / "tunnel"
    files = [tunnel / "relay.c"] + sorted(tunnel.glob("route*.c"))
    return [f for f in files if f.is_file()]


def route_enum_kinds():
    """{(family, KIND)} of the relay's route enums, wherever they are declared."""
    kinds = set()
    tunnel = REPO_ROOT / "tunnel"
    for f in sorted(tunnel.glob("*.c")) + sorted(tunnel.glob("*.h")):
        text = f.read_text(errors="replace")
        for m in re.finditer(r"enum\s+(\w*(?:route|web)\w*kind)\s*\{([^}]*)\}", text):
            family = "web" if "web" in m.group(1) else "api"
            for member in re.findall(r"\b([A-Z][A-Z0-9_]*)\b", m.group(2)):
                kind = re.sub(r"^(ROUTE_WEB_|ROUTE_|WEB_)", "", member)
                if kind != "NONE":
                    kinds.add((family, kind))
    return kinds


def test_every_route_of_the_relay_is_in_the_table():
    kinds = route_enum_kinds()
    assert {f for f, _ in kinds} == {"api", "web"}, (
        "the relay's route enums (enum route_kind, enum route_web_kind) were not found in "
        "tunnel/: update route_enum_kinds() in this test; found %r" % kinds)
    covered = {(r.family, r.kind) for r in ENDPOINTS} | {("web", "ASSET")}
    missing = kinds - covered
    assert not missing, ("the relay has route kinds the authorization table does not cover: "
                         "add rows to ENDPOINTS for %r" % sorted(missing))

    literals = {}
    for f in route_sources():
        for lit in c_string_literals(f.read_text(errors="replace")):
            if lit.startswith("/"):
                literals.setdefault(lit, f.name)
    assert "/api/v1/agent" in literals and "/metrics" in literals, (
        "no route literals found in %s: update route_sources() in this test" % (
            [str(f) for f in route_sources()],))
    known = {lit for r in ENDPOINTS for lit in r.literals} | set(ASSET_LITERALS) | set(NOT_ROUTES)
    unknown = {lit: f for lit, f in literals.items() if lit not in known}
    assert not unknown, ("path literals in the relay's source that the authorization table "
                         "does not cover (add an ENDPOINTS row, or NOT_ROUTES with a "
                         "reason): %r" % unknown)

    # The relay serves only its callback: no lws mounts that would serve files.
    for f in sorted((REPO_ROOT / "tunnel").glob("*.c")) + sorted((REPO_ROOT / "agent").glob("*.c")):
        assert "lws_http_mount" not in f.read_text(errors="replace"), f


def test_the_asset_list_matches_what_is_embedded():
    text = (REPO_ROOT / "tunnel" / "web" / "embed.py").read_text()
    embedded = set(re.findall(r'\("/web/([^"]+)"', text))
    assert embedded == set(OWN_ASSETS) | set(NPM_ASSETS), (
        "tunnel/web/embed.py serves %r under /web/: update OWN_ASSETS/NPM_ASSETS" % embedded)
