"""Shutdown (issue 5, second half): SIGTERM (or SIGINT) moves the workspace to shutting_down,
runs the shutdown scripts (the --shutdown-script flag, manifest scripts with run_on stop)
with their timeouts, hangs up sessions, reports off, flushes the logs and exits 0, all in
bounded time. A hung shutdown script is shutdown_timeout, a failing one shutdown_error; the
agent still exits 0."""
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import can_unshare_pid, children_of, wait_until
from lifecyclelib import (Workspace, assert_forward_only, pid_gone, read_pid,
                          relay_stopped_during_script, write_manifest)

# The design's bound is the longest stop-script timeout + 3 s (hang-up grace) + 5 s (log
# flush); the tests allow generous room on a shared machine.
SLACK = 20


def stop_agent(ws, sig=signal.SIGTERM, bound=30):
    """Sends sig to the agent; returns its exit status (None if it did not exit in bound)."""
    t0 = time.monotonic()
    os.kill(ws.agent.pid, sig)
    try:
        rc = ws.agent.popen.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        raise AssertionError("the agent did not exit within %ds of %s\n%s" % (
            bound, sig.name, ws.agent_stderr()[-3000:])) from None
    return rc, time.monotonic() - t0


def wait_offline(ws):
    wait_until(lambda: not ws.relay.connected(ws.name), timeout=20,
               what="the relay to see the agent go")


def test_sigterm_runs_the_script_hangs_up_sessions_reports_off_exits_0(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    sess_pid, verdict = tmp_path / "session.pid", tmp_path / "verdict"
    stop = ("echo stopping-now; if kill -0 $(cat %s) 2>/dev/null; then echo session-alive; "
            "else echo session-gone; fi > %s" % (sess_pid, verdict))
    ws.start_agent(["--startup-script", "true", "--shutdown-script", stop])
    ws.wait_lifecycle("ready")
    p = ws.ssh_popen("echo $$ > %s; echo up; exec sleep 300" % sess_pid)
    try:
        assert p.stdout.readline() == b"up\n"
        pid = read_pid(sess_pid)
        assert pid and not pid_gone(pid)
        rc, took = stop_agent(ws)
        assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
        assert took < 3 + 5 + SLACK, "the agent took %.1fs to stop" % took
        # The stop script ran, before sessions were hung up.
        assert verdict.read_text() == "session-alive\n"
        # The session was hung up: its process is gone and the client sees the end.
        wait_until(lambda: pid_gone(pid), timeout=10, what="the session's process to end")
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    wait_offline(ws)
    # Its lines reached the relay before the agent went (logs flushed at exit).
    assert "stopping-now" in ws.texts("shutdown")
    ws.wait_states(["starting", "ready", "shutting_down", "off"], timeout=5)
    assert ws.lifecycle() == "off", "the last state the relay saw"
    j = ws.json()
    assert j["connected"] is False and isinstance(j["lifecycle_changed_at"], int)


def test_sigterm_ends_an_open_pty(harness, tmp_path):
    """SIGTERM with a terminal open through the relay: its client sees the end; the agent
    exits 0 in bounded time."""
    ws = Workspace(harness, tmp_path, relay_extra=["--stats-interval", "1"])
    ws.start_agent()
    ws.wait_lifecycle("ready")
    result = {}

    def pty():
        try:
            result["r"] = ws.pty_run("echo pty-up; sleep 300", timeout=90)
        except Exception as e:  # noqa: BLE001 - reported below
            result["e"] = e
    t = threading.Thread(target=pty, daemon=True)
    t.start()
    wait_until(lambda: ws.json()["sessions"].get("pty") == 1 or not t.is_alive(), timeout=45,
               what="the PTY session")
    rc, took = stop_agent(ws)
    assert rc == 0 and took < 3 + 5 + SLACK, (rc, took)
    t.join(30)
    assert not t.is_alive(), "the PTY client did not see the end"
    assert "e" not in result, result.get("e")
    out, texts, code = result["r"]
    assert b"pty-up" in out


def test_sigterm_while_a_session_waits_for_a_blocking_script(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    started = tmp_path / "STARTED"
    ws.start_agent(["--startup-script", "touch %s; sleep 600" % started,
                    "--startup-blocks-login"])
    wait_until(started.exists, timeout=20, what="the startup script to start")
    p = ws.ssh_popen("echo", "never-runs")
    try:
        time.sleep(3)
        assert p.poll() is None
        rc, took = stop_agent(ws)
        assert rc == 0 and took < 3 + 5 + SLACK, (rc, took)
        # The waiting client ends (whether its command got to run while the stop scripts
        # ran is not specified: the gate opens when the killed start script ends).
        p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_sigint_takes_the_same_path(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    marker = tmp_path / "stopped"
    ws.start_agent(["--shutdown-script", "echo sigint > %s" % marker])
    ws.wait_lifecycle("ready")
    rc, took = stop_agent(ws, signal.SIGINT)
    assert rc == 0 and marker.read_text() == "sigint\n"
    wait_offline(ws)
    assert ws.lifecycle() == "off"


def test_a_hung_shutdown_script_times_out_and_the_agent_exits_0(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    pidfile = tmp_path / "stop.pid"
    ws.start_agent(["--shutdown-script",
                    "echo $$ > %s; echo hanging-stop; sleep 600" % pidfile,
                    "--shutdown-timeout", "2s"])
    ws.wait_lifecycle("ready")
    rc, took = stop_agent(ws, bound=2 + 3 + 5 + SLACK)
    assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
    assert took >= 1.5, "it did not wait for the script's timeout (%.1fs)" % took
    pid = read_pid(pidfile)
    wait_until(lambda: pid_gone(pid), timeout=10, what="the hung stop script to be killed")
    wait_offline(ws)
    assert "hanging-stop" in ws.texts("shutdown")
    ws.wait_states(["starting", "ready", "shutting_down", "shutdown_timeout", "off"], timeout=5)
    assert ws.lifecycle() == "off"


def test_a_failing_shutdown_script_is_shutdown_error(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--shutdown-script", "echo cannot-stop >&2; exit 4"])
    ws.wait_lifecycle("ready")
    rc, _ = stop_agent(ws)
    assert rc == 0
    wait_offline(ws)
    assert "cannot-stop" in ws.texts("shutdown")
    ws.wait_states(["starting", "ready", "shutting_down", "shutdown_error", "off"], timeout=5)


def test_sigterm_without_scripts(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent()
    ws.wait_lifecycle("ready")
    rc, took = stop_agent(ws)
    assert rc == 0 and took < 3 + 5 + SLACK
    wait_offline(ws)
    states = ws.states()
    assert states[-2:] == ["shutting_down", "off"], states
    assert_forward_only(states)


def test_sigterm_during_startup(harness, tmp_path):
    """A start script still running at SIGTERM: the state goes forward to shutting_down and
    off, the script's group is killed, the agent exits 0 in bounded time."""
    ws = Workspace(harness, tmp_path)
    pidfile = tmp_path / "start.pid"
    stopped = tmp_path / "stopped"
    ws.start_agent(["--startup-script", "echo $$ > %s; sleep 600" % pidfile,
                    "--shutdown-script", "touch %s" % stopped])
    pid = wait_until(lambda: read_pid(pidfile), timeout=20, what="the start script to run")
    ws.wait_lifecycle("starting")
    rc, took = stop_agent(ws)
    assert rc == 0 and took < 3 + 5 + SLACK, (rc, took)
    wait_until(lambda: pid_gone(pid), timeout=10, what="the start script to be killed")
    assert stopped.exists(), "the shutdown script did not run"
    wait_offline(ws)
    states = ws.states()
    assert states[0] == "starting" and states[-2:] == ["shutting_down", "off"], states
    assert_forward_only(states)


def test_manifest_stop_scripts_with_a_timeout(harness, tmp_path):
    done = tmp_path / "quick-done"
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": [
        {"name": "quick", "script": "echo quick-stop > %s" % done, "run_on": "stop"},
        {"name": "hangs", "script": "echo hanging; sleep 600", "run_on": "stop", "timeout": 1},
    ]}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent()
    ws.wait_lifecycle("ready")
    rc, took = stop_agent(ws, bound=1 + 3 + 5 + SLACK)
    assert rc == 0
    assert done.read_text() == "quick-stop\n"
    wait_offline(ws)
    assert ws.texts("script:hangs") == ["hanging"]
    ws.wait_states(["starting", "ready", "shutting_down", "shutdown_timeout", "off"], timeout=5)


def test_shutdown_script_output_is_flushed_before_exit(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "20000"])
    ws.start_agent(["--shutdown-script",
                    "awk 'BEGIN { for (i = 1; i <= 5000; i++) printf \"S%05d\\n\", i }'"])
    ws.wait_lifecycle("ready")
    rc, _ = stop_agent(ws)
    assert rc == 0
    wait_offline(ws)
    texts = ws.texts("shutdown")
    assert texts == ["S%05d" % i for i in range(1, 5001)], (len(texts), texts[-3:])


@pytest.mark.parametrize("value", ["abc", "-1s", "5 minutes"])
def test_shutdown_timeout_is_validated(harness, relay, value):
    r = harness.run("agent", "--url", relay.url, "--token-file",
                    harness.tokens.agent_file("alpha"), "--shutdown-script", "true",
                    "--shutdown-timeout", value, timeout=30)
    assert r.returncode == 2, (value, r.returncode, r.stderr)
    assert "shutdown-timeout" in r.stderr, r.stderr


@pytest.mark.skipif(not can_unshare_pid(), reason="needs root and unshare --pid")
def test_sigterm_as_pid_1(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    marker = tmp_path / "stopped"
    ws.start_agent(["--shutdown-script", "echo pid1-stop > %s" % marker],
                   wrap=["unshare", "--pid", "--fork", "--mount-proc"])
    ws.wait_lifecycle("ready")
    unshare_pid = ws.agent.pid
    pid = wait_until(lambda: children_of(unshare_pid) and children_of(unshare_pid)[0][0],
                     timeout=10, what="the agent under unshare")
    os.kill(pid, signal.SIGTERM)
    rc = ws.agent.popen.wait(timeout=3 + 5 + SLACK)
    assert rc == 0, "unshare passed on exit status %r" % rc
    assert marker.read_text() == "pid1-stop\n"
    wait_offline(ws)
    assert ws.lifecycle() == "off"


def test_a_second_sigterm_during_shutdown_is_harmless(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    marker = tmp_path / "stopped"
    ws.start_agent(["--shutdown-script", "sleep 2; echo done > %s" % marker])
    ws.wait_lifecycle("ready")
    os.kill(ws.agent.pid, signal.SIGTERM)
    time.sleep(0.5)
    rc, took = stop_agent(ws, bound=60 + 3 + 5 + SLACK)
    assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
    assert marker.read_text() == "done\n", "the second signal cut the stop script short"
    wait_offline(ws)
    assert ws.lifecycle() == "off"


def test_sigterm_with_the_relay_unreachable_exits_0_in_bounded_time(harness, tmp_path):
    """No relay to report to or flush logs into: the agent must not wait for one."""
    ws = Workspace(harness, tmp_path)
    marker = tmp_path / "stopped"
    ws.start_agent(["--shutdown-script", "echo ran > %s" % marker])
    ws.wait_lifecycle("ready")
    ws.relay.proc.kill()
    time.sleep(1)
    rc, took = stop_agent(ws, bound=3 + 5 + SLACK)
    assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
    assert marker.read_text() == "ran\n"


def test_what_scripts_leave_running_is_hung_up_at_shutdown(harness, tmp_path):
    """A startup script that starts a server in the background and exits: the server is
    orphaned, the agent adopts it (a subreaper), and the shutdown hangs it up with the
    sessions; one that ignores SIGHUP gets SIGKILL after the grace period."""
    ws = Workspace(harness, tmp_path)
    polite, stubborn = tmp_path / "polite.pid", tmp_path / "stubborn.pid"
    ws.start_agent(["--startup-script",
                    "sleep 1000 > /dev/null 2>&1 & echo $! > %s; "
                    "(trap '' HUP; exec sleep 1001) > /dev/null 2>&1 & echo $! > %s" % (
                        polite, stubborn)])
    ws.wait_lifecycle("ready")
    pids = [read_pid(polite), read_pid(stubborn)]
    assert all(pids) and not any(pid_gone(p) for p in pids)
    rc, took = stop_agent(ws)
    assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
    assert took < 3 + 5 + SLACK
    wait_until(lambda: all(pid_gone(p) for p in pids), timeout=10,
               what="the script's background processes to end with the agent")
    assert "sending SIGKILL" in ws.agent_stderr()


def test_a_relay_that_stops_reading_cannot_hold_the_shutdown(harness, tmp_path):
    """The relay is stopped (SIGSTOP) while megabytes of logs wait for it: the agent's last
    flush gives up after its 5 s bound and the agent exits 0."""
    ws = Workspace(harness, tmp_path)
    with relay_stopped_during_script(ws, tmp_path, "head -c 6000000 /dev/urandom | base64",
                                     timeout=30):
        time.sleep(1.5)  # batches made and queued toward the stopped relay
        rc, took = stop_agent(ws, bound=3 + 5 + SLACK)
        assert rc == 0, "exit status %r\n%s" % (rc, ws.agent_stderr()[-3000:])
        # Whether the last output stuck in the agent (then its flush gave up: "did not take
        # the last output") or in the kernel's socket buffers (then the close handshake
        # timed out) depends on timing; either way the shutdown was bounded.
        assert "lifecycle: off" in ws.agent_stderr()
