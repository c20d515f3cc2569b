"""The workspace lifecycle (issue 5, second half): startup scripts from the agent's flags and
from the relay's --manifest decide the state (ready, start_error, start_timeout), in order
and never backwards; a login-blocking script makes new SSH sessions and PTYs wait; a hung
script's whole process group is killed at its timeout.

The order of states is read from the relay's /logs: the agent logs one line "lifecycle:
STATE" (source agent) at each transition; the final state from the workspace JSON."""
import json
import subprocess
import threading
import time

import pytest

from conftest import can_unshare_pid, children_of, wait_until
from lifecyclelib import (WAIT_NOTICE, Workspace, assert_forward_only, now_ms, pid_gone, read_pid,
                          write_manifest)


def good_agent_args(ws, script, *more):
    return ["--startup-script", script, "--directory", str(ws.dir)] + list(more)


# ---------------------------------------------------------------------------------------
# flags: --startup-script and --startup-timeout


def test_before_any_agent_the_lifecycle_fields_are_empty(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    j = ws.json()
    assert j["lifecycle"] is None and j["lifecycle_changed_at"] is None, j
    assert j["metadata"] == {} and j["forward_ports"] == [], j
    code, body = ws.logs()
    assert code == 200, body
    assert json.loads(body)["lines"] == []


def test_good_script_goes_starting_then_ready(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    t0 = now_ms()
    ws.start_agent(good_agent_args(ws, "echo hello-from-startup; echo also-stderr >&2"))
    ws.wait_lifecycle("ready")
    ws.wait_states(["starting", "ready"])
    lines = ws.all_logs()
    (n_starting, _), (n_ready, _) = [x for x in ws.lifecycle_lines(lines) if x[1] != "created"]
    startup = [ln for ln in lines if ln["source"] == "startup"]
    # stdout and stderr are two pipes: their relative order is not defined.
    assert sorted(ln["text"] for ln in startup) == ["also-stderr", "hello-from-startup"], \
        startup
    for ln in startup:
        assert n_starting < ln["n"] < n_ready, "script output outside starting..ready: %r" % (
            [(x["n"], x["source"], x["text"]) for x in lines],)
        assert t0 - 5000 <= ln["time"] <= now_ms() + 5000, ln
    j = ws.json()
    assert j["lifecycle"] == "ready"
    assert isinstance(j["lifecycle_changed_at"], int)
    listed = {w["name"]: w for w in ws.relay.api_json("/api/v1/workspaces")}
    assert listed["alpha"]["lifecycle"] == "ready" and listed["beta"]["lifecycle"] is None
    assert t0 - 5000 <= j["lifecycle_changed_at"] <= now_ms() + 5000, j
    # /metrics: a gauge for the current state only.
    code, body = ws.relay.api("/metrics")
    assert code == 200
    text = body.decode()
    assert 'tether_workspace_lifecycle{workspace="alpha",state="ready"} 1' in text, text
    assert 'state="starting"} 1' not in text


def test_without_scripts_the_workspace_is_ready(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent()
    ws.wait_lifecycle("ready")
    # The JSON's state comes at once, the log lines within a batch interval (1 s).
    states = wait_until(lambda: ws.states()[-1:] == ["ready"] and ws.states(), timeout=10,
                        what="the lifecycle line ready")
    assert_forward_only(states)


def test_failing_script_is_start_error(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(good_agent_args(ws, "echo about-to-fail; echo the-reason >&2; exit 3"))
    ws.wait_lifecycle("start_error")
    ws.wait_states(["starting", "start_error"])
    ws.wait_text("startup", lambda t: "about-to-fail" in t and "the-reason" in t)
    assert ws.agent.alive(), "the agent must go on serving after a failed startup"
    r = ws.ssh("echo", "still-served", timeout=60)
    assert r.returncode == 0 and r.stdout == b"still-served\n", r


def test_slow_script_times_out_and_its_process_group_is_killed(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    child, me = tmp_path / "child.pid", tmp_path / "script.pid"
    script = ("sleep 300 & echo $! > %s; echo $$ > %s; echo slow-script-started; wait"
              % (child, me))
    t0 = time.monotonic()
    ws.start_agent(good_agent_args(ws, script, "--startup-timeout", "2s"))
    pids = wait_until(lambda: read_pid(child) and read_pid(me) and (read_pid(me), read_pid(child)),
                      timeout=20, what="the script to write its pids")
    ws.wait_lifecycle("start_timeout", timeout=30)
    took = time.monotonic() - t0
    assert took >= 1.5, "start_timeout after %.1fs, before the 2s timeout" % took
    ws.wait_states(["starting", "start_timeout"])
    for pid in pids:
        wait_until(lambda: pid_gone(pid), timeout=10,
                   what="pid %d of the timed-out script's group to be killed" % pid)
    assert "slow-script-started" in ws.texts("startup"), "the hung script's logs were lost"


def test_startup_timeout_flag_is_validated(harness, relay):
    for bad in ("abc", "-5s", "10 parsecs"):
        r = harness.run("agent", "--url", relay.url, "--token-file",
                        harness.tokens.agent_file("alpha"), "--startup-script", "true",
                        "--startup-timeout", bad, timeout=30)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert "startup-timeout" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_startup_runs_once_per_agent_process_not_per_connection(harness, tmp_path):
    runs = tmp_path / "runs"
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": [
        {"name": "m", "script": "echo manifest-run >> %s" % runs, "run_on": "start"}]}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent(good_agent_args(ws, "echo run >> %s" % runs))
    ws.wait_lifecycle("ready")
    port = ws.relay.port
    ws.relay.proc.kill()
    ws.relay = harness.relay(port=port, extra=["--manifest", manifest])
    # The agent reconnects by itself and reports its current state after hello.
    wait_until(lambda: ws.relay.connected("alpha"), timeout=45, what="the agent to reconnect")
    ws.wait_lifecycle("ready", timeout=15)
    time.sleep(1.5)
    assert sorted(runs.read_text().splitlines()) == ["manifest-run", "run"], \
        "start scripts ran again on reconnect: %r" % runs.read_text()


# ---------------------------------------------------------------------------------------
# login-blocking scripts


def gated_script(tmp_path, then="exit 0"):
    """A startup script that runs until the test creates GO; DONE appears just before it
    ends. Returns (script, started, go, done)."""
    started, go, done = tmp_path / "STARTED", tmp_path / "GO", tmp_path / "DONE"
    script = ("touch %s; echo blocking-script-running; while [ ! -e %s ]; do sleep 0.1; done; "
              "touch %s; %s" % (started, go, done, then))
    return script, started, go, done


def probe(done):
    """A command that says whether the startup script had finished when it ran."""
    return "if test -e %s; then echo after-script; else echo before-script; fi" % done


@pytest.mark.parametrize("via", ["flag", "manifest"])
def test_login_blocking_script_makes_ssh_exec_wait(harness, tmp_path, via):
    script, started, go, done = gated_script(tmp_path)
    if via == "flag":
        ws = Workspace(harness, tmp_path)
        ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login"))
    else:
        manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": [
            {"name": "gate", "script": script, "run_on": "start", "blocks_login": True}]}})
        ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
        ws.start_agent()
    wait_until(started.exists, timeout=20, what="the startup script to start")
    assert ws.wait_lifecycle("starting") == "starting"
    p = ws.ssh_popen(probe(done))
    try:
        time.sleep(4)
        assert p.poll() is None, "ssh finished while the login-blocking script ran: %r" % (
            p.communicate(timeout=10),)
        assert not done.exists()
        go.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    assert p.returncode == 0, err
    # Not interactive: no notice mixed into the command's output.
    assert out == b"after-script\n", (out, err)
    ws.wait_lifecycle("ready")


def test_login_blocking_script_makes_a_pty_wait_with_a_notice(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    script, started, go, done = gated_script(tmp_path)
    ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login"))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    result = {}

    def run():
        try:
            result["r"] = ws.pty_run(probe(done) + "; exit 7", timeout=90)
        except Exception as e:  # noqa: BLE001 - reported below
            result["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(4)
    assert t.is_alive(), "the PTY ended while the login-blocking script ran: %r" % (result,)
    assert not done.exists()
    go.touch()
    t.join(60)
    assert not t.is_alive(), "the PTY did not end after the script finished"
    assert "e" not in result, result["e"]
    out, texts, code = result["r"]
    text = out.decode("utf-8", "replace")
    assert text.count(WAIT_NOTICE) == 1, text
    assert "after-script" in text and "before-script" not in text, text
    assert text.index(WAIT_NOTICE) < text.index("after-script"), text
    assert texts == ['{"exit":7}'] and code == 1000, (texts, code)


def test_login_blocking_script_makes_interactive_ssh_wait_with_a_notice(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    script, started, go, done = gated_script(tmp_path)
    ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login"))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    p = ws.ssh_popen(probe(done), tty=True)
    try:
        time.sleep(4)
        assert p.poll() is None, "ssh -tt finished while the login-blocking script ran"
        go.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    text = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    assert p.returncode == 0, text
    assert text.count(WAIT_NOTICE) == 1, text
    assert "after-script" in text and "before-script" not in text, text


def test_login_blocking_script_makes_an_sftp_subsystem_wait(harness, tmp_path):
    """A subsystem waits too, and nothing is written into its byte stream (SFTP would break)."""
    ws = Workspace(harness, tmp_path)
    script, started, go, done = gated_script(tmp_path)
    ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login"))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    batch = tmp_path / "batch"
    batch.write_text("ls %s\n" % done)
    p = subprocess.Popen(["sftp", "-F", str(ws.config), "-b", str(batch), "ws"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(4)
        assert p.poll() is None, "sftp finished while the login-blocking script ran: %r" % (
            p.communicate(timeout=10),)
        go.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    assert p.returncode == 0, (out, err)
    assert str(done).encode() in out, out


def test_many_waiting_sessions_all_go_on_and_a_client_gone_meanwhile_is_harmless(harness,
                                                                                    tmp_path):
    ws = Workspace(harness, tmp_path)
    script, started, go, done = gated_script(tmp_path)
    ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login"))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    waiting = [ws.ssh_popen(probe(done)) for _ in range(8)]
    quitter = ws.ssh_popen("echo", "never")
    try:
        time.sleep(4)
        assert all(p.poll() is None for p in waiting + [quitter])
        quitter.kill()               # a client that gives up while it waits
        quitter.wait(timeout=10)
        time.sleep(1)
        assert ws.agent.alive()
        go.touch()
        results = [p.communicate(timeout=60) for p in waiting]
    finally:
        for p in waiting + [quitter]:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, (out, err) in zip(waiting, results):
        assert p.returncode == 0 and out == b"after-script\n", (out, err)
    ws.wait_lifecycle("ready")
    r = ws.ssh("echo", "later", timeout=60)
    assert r.returncode == 0 and r.stdout == b"later\n"


@pytest.mark.parametrize("end", ["fails", "times_out"])
def test_waiting_sessions_go_on_when_the_blocking_script_fails_or_times_out(harness, tmp_path,
                                                                            end):
    ws = Workspace(harness, tmp_path)
    if end == "fails":
        script, started, go, done = gated_script(tmp_path, then="exit 5")
        extra = []
    else:
        started, go = tmp_path / "STARTED", tmp_path / "GO"
        script = "touch %s; sleep 300" % started
        extra = ["--startup-timeout", "5s"]
    ws.start_agent(good_agent_args(ws, script, "--startup-blocks-login", *extra))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    p = ws.ssh_popen("echo", "let-in")
    try:
        time.sleep(2)
        assert p.poll() is None, "ssh finished while the login-blocking script ran"
        go.touch()
        out, err = p.communicate(timeout=40)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    assert p.returncode == 0 and out == b"let-in\n", (out, err)
    ws.wait_lifecycle("start_error" if end == "fails" else "start_timeout")


def test_a_non_blocking_script_does_not_make_sessions_wait(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    script, started, go, done = gated_script(tmp_path)
    ws.start_agent(good_agent_args(ws, script))
    wait_until(started.exists, timeout=20, what="the startup script to start")
    try:
        r = ws.ssh(probe(done), timeout=30)
        assert r.returncode == 0 and r.stdout == b"before-script\n", r
        assert ws.lifecycle() == "starting"
    finally:
        go.touch()
    ws.wait_lifecycle("ready")


# ---------------------------------------------------------------------------------------
# scripts from the relay's --manifest


def test_manifest_scripts_run_on_start_and_stop(harness, tmp_path):
    built, bye = tmp_path / "BUILT", tmp_path / "BYE"
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": [
        {"name": "build", "script": "echo build-out; echo built > %s" % built,
         "run_on": "start"},
        {"name": "second.one-2", "script": "echo second-out >&2", "run_on": "start",
         "blocks_login": True, "timeout": 60},
        {"name": "bye", "script": "echo bye-out; echo bye > %s" % bye, "run_on": "stop",
         "timeout": 20},
    ]}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    ws.wait_text("script:build", lambda t: t == ["build-out"])
    ws.wait_text("script:second.one-2", lambda t: t == ["second-out"])
    assert built.read_text() == "built\n"
    assert not bye.exists(), "a stop script ran at start"
    t0 = time.monotonic()
    rc = ws.agent.terminate(timeout=30)
    assert rc == 0, "agent exit status %r after SIGTERM\n%s" % (rc, ws.agent_stderr()[-3000:])
    assert time.monotonic() - t0 < 30
    assert bye.read_text() == "bye\n"
    ws.wait_text("script:bye", lambda t: t == ["bye-out"], timeout=10)
    ws.wait_states(["starting", "ready", "shutting_down", "off"], timeout=10)
    assert ws.lifecycle() == "off"


@pytest.mark.parametrize("scripts,state", [
    ([("ok", "true", None), ("bad", "exit 2", None)], "start_error"),
    ([("ok", "true", None), ("bad", "exit 2", None), ("hangs", "sleep 300", 1)],
     "start_timeout"),
    ([("ok", "true", None), ("ok2", "echo fine", 5)], "ready"),
])
def test_manifest_start_scripts_decide_the_state(harness, tmp_path, scripts, state):
    entries = []
    for name, text, timeout in scripts:
        e = {"name": name, "script": text, "run_on": "start"}
        if timeout is not None:
            e["timeout"] = timeout
        entries.append(e)
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": entries}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent()
    ws.wait_lifecycle(state, timeout=30)
    ws.wait_states(["starting", state])


def test_start_scripts_run_in_parallel(harness, tmp_path):
    """Each of two scripts (one from the flag, one from the manifest) waits for the other's
    file: only run side by side do both finish before their timeouts."""
    a, b = tmp_path / "A", tmp_path / "B"
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": [
        {"name": "a", "script": "touch %s; while [ ! -e %s ]; do sleep 0.1; done" % (a, b),
         "run_on": "start", "timeout": 30}]}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent(good_agent_args(
        ws, "touch %s; while [ ! -e %s ]; do sleep 0.1; done" % (b, a),
        "--startup-timeout", "30s"))
    ws.wait_lifecycle("ready", timeout=40)


def test_manifest_star_entry_and_a_workspace_entry_that_wins(harness, tmp_path):
    manifest = write_manifest(tmp_path / "manifest.json", {
        "*": {"scripts": [{"name": "common", "script": "echo from-star", "run_on": "start"}]},
        "beta": {"scripts": [{"name": "own", "script": "echo from-beta", "run_on": "start"}]},
    })
    alpha = Workspace(harness, tmp_path / "a", relay_extra=["--manifest", manifest])
    beta = Workspace(harness, tmp_path / "b", workspace="beta", relay=alpha.relay)
    alpha.start_agent()
    beta.start_agent()
    alpha.wait_lifecycle("ready")
    beta.wait_lifecycle("ready")
    alpha.wait_text("script:common", lambda t: t == ["from-star"])
    beta.wait_text("script:own", lambda t: t == ["from-beta"])
    time.sleep(1.5)  # a batch in flight would have arrived by now
    assert beta.texts("script:common") == [], "the workspace's own scripts must replace *'s"
    assert alpha.texts("script:own") == []


BAD_MANIFESTS = [
    ({"alpha": {"scripts": [{"name": "bad name", "script": "true", "run_on": "start"}]}},
     ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "true", "run_on": "sometimes"}]}},
     ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "run_on": "start"}]}}, ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "", "run_on": "start"}]}},
     ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "true", "run_on": "start",
                             "timeout": 0}]}}, ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "true", "run_on": "start",
                             "timeout": 86401}]}}, ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "true", "run_on": "start",
                             "blocks_login": "yes"}]}}, ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "n%d" % i, "script": "true", "run_on": "start"}
                            for i in range(33)]}}, ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x" * 65, "script": "true", "run_on": "start"}]}},
     ("alpha", "scripts")),
    ({"alpha": {"scripts": [{"name": "x", "script": "y" * 4097, "run_on": "start"}]}},
     ("alpha", "scripts")),
    ({"alpha": {"scripts": "true"}}, ("alpha", "scripts")),
    ({"*": {"directory": 42}}, ("*", "directory")),
    ({"beta": {"env": {"A": 1}}}, ("beta", "env")),
    ({"alpha": "not an object"}, ("alpha",)),
]


@pytest.mark.parametrize("doc,words", BAD_MANIFESTS,
                         ids=["name", "run_on", "no-script", "empty-script", "timeout-0",
                              "timeout-big", "blocks_login-type", "33-scripts", "long-name",
                              "long-script", "scripts-type", "star-directory", "env-value",
                              "entry-type"])
def test_bad_manifest_is_a_clear_usage_error(harness, tmp_path, doc, words):
    path = write_manifest(tmp_path / "manifest.json", doc)
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", path, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, "the error does not name %r: %r" % (w, r.stderr)
    assert "manifest" in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("content", [None, "{not json", "[]", '{"alpha": {}} trailing',
                                     '{"alpha": {}, "alpha": {}}'])
def test_unreadable_or_malformed_manifest_file_exits_2(harness, tmp_path, content):
    path = tmp_path / "manifest.json"
    if content is not None:
        path.write_text(content)
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--manifest", path, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "manifest" in r.stderr.lower() or str(path) in r.stderr, r.stderr


def test_manifest_members_reach_the_agent(harness, tmp_path):
    """directory, env and motd from --manifest: sessions start in the directory with env."""
    d = tmp_path / "project"
    d.mkdir()
    manifest = write_manifest(tmp_path / "manifest.json", {"*": {
        "directory": str(d), "env": {"TETHER_MANIFEST_VAR": "from-manifest"}}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent()
    r = ws.ssh('pwd; echo "$TETHER_MANIFEST_VAR"', timeout=60)
    assert r.returncode == 0, r
    assert r.stdout.decode().splitlines() == [str(d), "from-manifest"], r.stdout


# ---------------------------------------------------------------------------------------
# PID 1


@pytest.mark.skipif(not can_unshare_pid(), reason="needs root and unshare --pid")
@pytest.mark.parametrize("status,state", [(0, "ready"), (3, "start_error")])
def test_as_pid_1_the_script_status_still_decides(harness, tmp_path, status, state):
    """As PID 1 the agent's reaper takes every exit status, orphans' too: the startup
    script's own status must still reach the lifecycle, and its daemonised children are
    collected."""
    ws = Workspace(harness, tmp_path)
    script = ("for i in 1 2 3; do setsid sh -c 'sleep 1' </dev/null >/dev/null 2>&1 & done; "
              "exit %d" % status)
    ws.start_agent(good_agent_args(ws, script),
                   wrap=["unshare", "--pid", "--fork", "--mount-proc"])
    ws.wait_lifecycle(state, timeout=30)
    ws.wait_states(["starting", state])
    kids = wait_until(lambda: children_of(ws.agent.pid), timeout=10,
                      what="the agent under unshare")
    agent_pid = kids[0][0]
    time.sleep(2.5)  # the daemonised sleeps have ended by now
    left = children_of(agent_pid)
    assert not [p for p, st in left if st == "Z"], "zombies under the PID 1 agent: %r" % left
