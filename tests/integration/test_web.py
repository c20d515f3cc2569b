"""The web terminal (PROTOCOL.md 14.8): the page at /w/NAME, its login form and cookie, its
assets, and the cookie on the pty websocket with the Origin check. The browser test proper
is tests/browser (test_browser at the end of this file)."""
import asyncio
import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
import uuid

import pytest
import websockets

from conftest import ONLY_A, REPO_ROOT
from test_tls import pki, tls_relay  # noqa: F401  (fixtures)


def request(relay, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        h = dict(headers or {})
        if body is not None:
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.getheaders(), r.read()
    finally:
        conn.close()


def login(relay, token, name="alpha"):
    return request(relay, "POST", "/w/%s/login" % name,
                   body=urllib.parse.urlencode({"token": token}))


def cookie_of(headers):
    value = headers["set-cookie"].split(";")[0]
    assert value.startswith("tether_token=")
    return value


def test_page_without_cookie_redirects_to_the_login_form(relay):
    status, h, _, _ = request(relay, "GET", "/w/alpha")
    assert status == 303
    assert h["location"] == "/w/alpha/login"
    status, h, _, body = request(relay, "GET", "/w/alpha/login")
    assert status == 200
    assert h["content-type"].startswith("text/html")
    assert b'<form id="login" method="post" action="/w/alpha/login">' in body
    assert b"<script>" not in body  # no inline scripts: the CSP forbids them
    assert "script-src 'self'" in h["content-security-policy"]
    assert h["cache-control"] == "no-store"


def test_login_sets_a_strict_httponly_cookie(relay):
    token = relay.tokens.user_token()
    status, h, raw, body = login(relay, token)
    assert status == 303 and h["location"] == "/w/alpha"
    cookie = h["set-cookie"]
    attrs = [a.strip().lower() for a in cookie.split(";")[1:]]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain ws:// relay
    assert token.encode() not in body
    # the cookie opens the page
    status, h, _, body = request(relay, "GET", "/w/alpha", headers={"Cookie": cookie_of(h)})
    assert status == 200
    assert h["content-type"].startswith("text/html")
    assert h["cache-control"] == "no-store"
    assert b'src="/web/term.js"' in body and token.encode() not in body
    assert b"<script>" not in body


def test_bad_token_gets_401_and_the_form_again(relay):
    status, h, _, body = login(relay, "not-a-token")
    assert status == 401
    assert "set-cookie" not in h
    assert b"refused" in body and b'name="token"' in body
    # a real token that may not reach the workspace is refused too
    status, _, _, _ = login(relay, relay.tokens.user_token(ONLY_A), name="beta")
    assert status == 401
    # a bad cookie gets the login form, not the page
    status, h, _, _ = request(relay, "GET", "/w/alpha", headers={"Cookie": "tether_token=nope"})
    assert status == 303 and h["location"] == "/w/alpha/login"


def test_logout_clears_the_cookie(relay):
    status, h, _, _ = request(relay, "GET", "/w/alpha/logout")
    assert status == 303 and h["location"] == "/w/alpha/login"
    cookie = h["set-cookie"].lower()
    assert cookie.startswith("tether_token=;") and "max-age=0" in cookie


def test_assets_are_served_with_their_types(relay):
    for path, ctype in [("/web/term.js", "text/javascript"), ("/web/xterm.js", "text/javascript"),
                        ("/web/addon-fit.js", "text/javascript"), ("/web/xterm.css", "text/css"),
                        ("/web/term.css", "text/css"), ("/web/login.js", "text/javascript")]:
        status, h, _, body = request(relay, "GET", path)
        assert status == 200, path
        assert h["content-type"].startswith(ctype), (path, h["content-type"])
        assert int(h["content-length"]) == len(body) > 0
        assert h["x-content-type-options"] == "nosniff"
        assert h["cache-control"] == "no-cache"
        # revalidation with the ETag
        status, _, _, body = request(relay, "GET", path, headers={"If-None-Match": h["etag"]})
        assert status == 304 and body == b""
    assert request(relay, "GET", "/web/nope.js")[0] == 404
    # the page's xterm.js is the npm package's, byte for byte
    with open(REPO_ROOT / "tunnel/web/node_modules/@xterm/xterm/lib/xterm.js", "rb") as f:
        assert request(relay, "GET", "/web/xterm.js")[3] == f.read()


async def pty_session(relay, headers):
    url = "%s/api/v1/workspaces/alpha/pty?id=%s&rows=24&cols=80" % (relay.url, uuid.uuid4())
    async with websockets.connect(url, extra_headers=headers, open_timeout=15,
                                  ping_interval=None) as ws:
        await ws.send(json.dumps({"data": "echo web-$((6*7))\r"}))
        got = b""
        while b"web-42" not in got:
            msg = await asyncio.wait_for(ws.recv(), 15)
            if isinstance(msg, bytes):
                got += msg
        await ws.send(json.dumps({"data": "exit 3\r"}))
        while True:
            msg = await asyncio.wait_for(ws.recv(), 15)
            if isinstance(msg, str):
                assert json.loads(msg) == {"exit": 3}
                break


def test_cookie_authenticates_the_pty_websocket(harness, relay, agent):
    _, h, _, _ = login(relay, relay.tokens.user_token())
    headers = {"Cookie": cookie_of(h), "Origin": "http://127.0.0.1:%d" % relay.port}
    asyncio.run(asyncio.wait_for(pty_session(relay, headers), 60))


def upgrade_status(relay, headers):
    async def go():
        url = "%s/api/v1/workspaces/alpha/pty?id=%s&rows=24&cols=80" % (relay.url, uuid.uuid4())
        try:
            async with websockets.connect(url, extra_headers=headers, open_timeout=15):
                return 101
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
    return asyncio.run(go())


def test_cookie_with_a_foreign_origin_is_refused(relay, agent):
    _, h, _, _ = login(relay, relay.tokens.user_token())
    cookie = cookie_of(h)
    assert upgrade_status(relay, {"Cookie": cookie, "Origin": "http://evil.example"}) == 403
    assert upgrade_status(relay, {"Cookie": cookie,
                                  "Origin": "https://127.0.0.1:%d" % relay.port}) == 403
    assert upgrade_status(relay, {"Cookie": cookie}) == 403  # no Origin at all
    assert upgrade_status(relay, {"Cookie": "tether_token=nope",
                                  "Origin": "http://127.0.0.1:%d" % relay.port}) == 401
    # the cookie is for pty websockets only
    async def tcp():
        url = "%s/api/v1/workspaces/alpha/tcp/22" % relay.url
        try:
            async with websockets.connect(url, extra_headers={
                    "Cookie": cookie, "Origin": "http://127.0.0.1:%d" % relay.port}):
                return 101
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
    assert asyncio.run(tcp()) == 401
    # bearer clients are unchanged: any Origin or none
    bearer = {"Authorization": "Bearer " + relay.tokens.user_token(), "Origin": "http://x.example"}
    assert upgrade_status(relay, bearer) == 101


def test_token_never_in_responses_or_the_log(relay, agent):
    token = relay.tokens.user_token()
    bodies = []
    for path in ["/w/alpha", "/w/alpha/login", "/web/term.js", "/w/alpha/logout"]:
        bodies.append(request(relay, "GET", path))
    st, h, raw, body = login(relay, token)
    cookie = cookie_of(h)
    bodies.append((st, h, [], body))
    bodies.append(request(relay, "GET", "/w/alpha", headers={"Cookie": cookie}))
    bodies.append(login(relay, token + "x"))
    headers = {"Cookie": cookie, "Origin": "http://127.0.0.1:%d" % relay.port}
    asyncio.run(asyncio.wait_for(pty_session(relay, headers), 60))
    for st, h, raw, body in bodies:
        assert token.encode() not in body
        assert token not in "".join(v for k, v in h.items() if k != "set-cookie")
    assert token not in relay.proc.stderr()
    assert token not in relay.proc.stdout()


def test_unknown_workspace_and_methods(relay):
    _, h, _, _ = login(relay, relay.tokens.user_token(ONLY_A))
    cookie = cookie_of(h)
    assert request(relay, "GET", "/w/beta", headers={"Cookie": cookie})[0] == 404
    assert request(relay, "GET", "/w/alpha", headers={"Cookie": cookie})[0] == 200
    assert request(relay, "POST", "/w/alpha", body="x=1")[0] == 405
    assert request(relay, "POST", "/w/alpha/login", body="token=" + "a" * 5000)[0] == 413
    # the JSON API does not take the cookie
    assert request(relay, "GET", "/api/v1/workspaces", headers={"Cookie": cookie})[0] == 401


def test_browser(tether_bin, tmp_path):
    """tests/browser/terminal.mjs: chromium through the real page (skips without them)."""
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not node or not os.path.exists(chromium):
        pytest.skip("needs node and %s (tests/run installs them)" % chromium)
    script = REPO_ROOT / "tests/browser/terminal.mjs"
    assert (REPO_ROOT / "tests/browser/node_modules/playwright-core").is_dir(), \
        "run npm ci in tests/browser"
    r = subprocess.run([node, str(script), str(tether_bin), str(tmp_path), chromium],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, "stdout:\n%s\nstderr:\n%s" % (r.stdout[-3000:], r.stderr[-3000:])


def test_tls_cookie_is_secure_and_origin_is_https(harness, tls_relay):
    import ssl
    _, port = tls_relay
    ctx = ssl._create_unverified_context()
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("POST", "/w/alpha/login",
                     body=urllib.parse.urlencode({"token": harness.tokens.user_token()}),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        assert r.status == 303
        set_cookie = r.getheader("Set-Cookie")
    finally:
        conn.close()
    attrs = [a.strip().lower() for a in set_cookie.split(";")[1:]]
    assert "secure" in attrs and "httponly" in attrs and "samesite=strict" in attrs
    cookie = set_cookie.split(";")[0]

    async def upgrade(origin):
        url = "wss://127.0.0.1:%d/api/v1/workspaces/alpha/pty?id=%s&rows=24&cols=80" % (
            port, uuid.uuid4())
        try:
            async with websockets.connect(url, ssl=ctx, open_timeout=15, extra_headers={
                    "Cookie": cookie, "Origin": origin}):
                return 101
        except websockets.exceptions.InvalidStatusCode as e:
            return e.status_code
    assert asyncio.run(upgrade("http://127.0.0.1:%d" % port)) == 403
    # the right origin passes the check: the workspace has no agent, hence 503
    assert asyncio.run(upgrade("https://127.0.0.1:%d" % port)) == 503


def test_embed_without_npm_files(tmp_path):
    """Without node_modules the generator still makes a complete C file, flagged incomplete."""
    web = REPO_ROOT / "tunnel/web"
    for f in ["index.html", "term.js", "login.js", "term.css"]:
        shutil.copy(web / f, tmp_path / f)
    out = tmp_path / "web_assets.c"
    subprocess.run(["/usr/bin/python3", str(web / "embed.py"), str(tmp_path), str(out)],
                   check=True, timeout=60)
    text = out.read_text()
    assert "const int web_assets_complete = 0;" in text
    assert '"/web/term.js"' in text and '"/web/xterm.js"' not in text
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        subprocess.run([cc, "-c", "-Wall", "-Wextra", "-Werror", "-I", str(REPO_ROOT / "tunnel"),
                        "-o", str(tmp_path / "web_assets.o"), str(out)], check=True, timeout=60)
