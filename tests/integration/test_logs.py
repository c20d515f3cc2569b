"""Logs (issue 5, second half): script output and the agent's own lines reach the relay in
batches, complete and in order, with a time and a source each; the relay keeps the last
--log-lines N per workspace at GET /api/v1/workspaces/NAME/logs?after=N. Output over the
cap is cut with a marker (never silently mid-stream), a flood leaves the agent responsive,
a hung script's lines are kept."""
import json
import os
import re
import signal
import time

import pytest

from conftest import ONLY_A, proc_rss_kib, wait_until
from lifecyclelib import Workspace, now_ms, pid_gone, read_pid, script_file, write_manifest

MiB = 1024 * 1024


def numbered(prefix, count, width):
    """The lines `awk` prints in numbered_script (without LF)."""
    pad = "x" * (width - len(prefix) - 8)
    return ["%s%07d %s" % (prefix, i, pad) for i in range(1, count + 1)]


def numbered_script(prefix, count, width):
    """Shell text printing count lines of exactly width bytes (LF excluded)."""
    pad = "x" * (width - len(prefix) - 8)
    return "awk 'BEGIN { for (i = 1; i <= %d; i++) printf \"%s%%07d %s\\n\", i }'" % (
        count, prefix, pad)


def test_one_mib_of_script_output_arrives_complete_and_in_order(harness, tmp_path):
    count, width = 16384, 63           # 16384 lines of 64 bytes with their LF: 1 MiB
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "100000"])
    t0 = now_ms()
    ws.start_agent(["--startup-script", numbered_script("L", count, width)])
    ws.wait_lifecycle("ready", timeout=60)
    ws.wait_text("startup", lambda t: len(t) >= count, timeout=60,
                 what="%d lines of source startup" % count)
    lines = ws.all_logs()          # checks that n goes up by one from line to line
    assert lines[0]["n"] == 1, "lines were pushed out: %r" % lines[0]
    startup = [ln for ln in lines if ln["source"] == "startup"]
    texts = [ln["text"] for ln in startup]
    expected = numbered("L", count, width)
    assert len(texts) == count, "got %d lines, expected %d" % (len(texts), count)
    if texts != expected:
        bad = next(i for i, (a, b) in enumerate(zip(texts, expected)) if a != b)
        raise AssertionError("line %d is %r, expected %r" % (bad, texts[bad], expected[bad]))
    assert sum(len(t) + 1 for t in texts) == MiB
    times = [ln["time"] for ln in startup]
    assert times == sorted(times), "times go backwards"
    assert t0 - 5000 <= times[0] and times[-1] <= now_ms() + 5000


def test_paging_with_after(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "100000"])
    ws.start_agent(["--startup-script", numbered_script("P", 3000, 20)])
    ws.wait_text("startup", lambda t: len(t) >= 3000, timeout=60)
    code, body = ws.logs()
    doc = json.loads(body)
    assert doc["first"] == 1
    last = doc["lines"][-1]["n"]
    assert doc["next"] == last + 1
    # after=N gives the lines with n > N, starting right after N.
    code, body = ws.logs(after=10)
    assert code == 200
    page = json.loads(body)
    assert page["lines"][0]["n"] == 11, page["lines"][:2]
    # Polling at the end gives nothing new, and next stays.
    total = len(ws.all_logs())
    code, body = ws.logs(after=total)
    tail = json.loads(body)
    assert tail["lines"] == [] and tail["next"] == total + 1, tail
    # after beyond the end is not an error.
    code, body = ws.logs(after=10 ** 9)
    assert code == 200 and json.loads(body)["lines"] == []


@pytest.mark.parametrize("after", ["abc", "-1", "", "1e3", "99999999999999999999999"])
def test_bad_after_is_400(harness, tmp_path, after):
    ws = Workspace(harness, tmp_path)
    code, body = ws.relay.api("/api/v1/workspaces/alpha/logs?after=%s" % after)
    assert code == 400, (code, body)
    assert "after" in json.loads(body)["error"]


def test_stdout_and_stderr_are_both_logged(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script", "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2"])
    ws.wait_lifecycle("ready")
    texts = ws.wait_text("startup", lambda t: len(t) >= 4)
    assert sorted(texts) == ["err-1", "err-2", "out-1", "out-2"], texts
    # Each stream keeps its own order.
    assert texts.index("out-1") < texts.index("out-2")
    assert texts.index("err-1") < texts.index("err-2")


def test_unterminated_last_line_and_long_lines(harness, tmp_path):
    """A last line without LF is kept; a line over 4096 bytes comes in pieces, none lost."""
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script",
                    "head -c 10000 /dev/zero | tr '\\0' a; echo; printf no-newline-at-end"])
    ws.wait_lifecycle("ready")
    texts = ws.wait_text("startup", lambda t: "no-newline-at-end" in t)
    assert texts[-1] == "no-newline-at-end"
    long = texts[:-1]
    assert all(len(t.encode()) <= 4096 for t in long), [len(t) for t in long]
    assert "".join(long) == "a" * 10000, [len(t) for t in long]


def test_invalid_utf8_and_nul_do_not_break_the_batch(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script",
                    "printf 'before\\n\\377\\376 bad bytes\\nnul\\000inside\\nafter\\n'"])
    ws.wait_lifecycle("ready")
    texts = ws.wait_text("startup", lambda t: "after" in t)
    assert texts[0] == "before" and texts[-1] == "after", texts
    assert len(texts) == 4, texts
    assert "bad bytes" in texts[1] and "inside" in texts[2], texts
    assert not [ln for ln in ws.all_logs() if ln["source"] == "relay"], \
        "the relay dropped a batch: %r" % ws.texts("relay")


def test_a_script_that_hangs_times_out_and_its_logs_are_kept(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    pidfile = tmp_path / "hang.pid"
    ws.start_agent(["--startup-script",
                    "echo $$ > %s; echo before-hang; echo err-before-hang >&2; sleep 600"
                    % pidfile, "--startup-timeout", "2s"])
    ws.wait_lifecycle("start_timeout", timeout=30)
    texts = ws.wait_text("startup", lambda t: "before-hang" in t and "err-before-hang" in t,
                         timeout=10)
    assert texts.count("before-hang") == 1
    pid = read_pid(pidfile)
    wait_until(lambda: pid_gone(pid), timeout=10, what="the hung script to be killed")


def test_a_50mb_flood_is_capped_with_a_marker(harness, tmp_path):
    """50 MB of numbered lines: what arrives is an exact prefix of them, then a marker; the
    script still runs to its end (its output is read and dropped) and the state is ready."""
    count, width = 500000, 99          # 500000 lines of 100 bytes with their LF: 50 MB
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "1000000"])
    end = tmp_path / "END"
    ws.start_agent(["--startup-script",
                    numbered_script("F", count, width) + "; touch %s; echo after-flood" % end])
    ws.wait_lifecycle("ready", timeout=120)
    assert end.exists()
    content_re = re.compile(r"F\d{7} x+")

    def marked(texts):
        return any(not content_re.fullmatch(t) for t in texts)
    ws.wait_text("startup", marked, timeout=30, what="a marker line of source startup")
    time.sleep(2)  # the last batches
    lines = ws.all_logs()
    assert lines[0]["n"] == 1, "lines were pushed out: %r" % lines[0]
    texts = [ln["text"] for ln in lines if ln["source"] == "startup"]
    first_other = next(i for i, t in enumerate(texts) if not content_re.fullmatch(t))
    content, rest = texts[:first_other], texts[first_other:]
    assert len(content) < count, "nothing was cut: %d lines" % len(content)
    kept = sum(len(t) + 1 for t in content)
    assert kept <= 16 * MiB, "%d bytes passed, far over any cap" % kept
    # An exact prefix: nothing lost mid-stream before the cut.
    expected = numbered("F", count, width)
    assert content == expected[:len(content)], "the kept lines are not a prefix"
    # The cut may fall inside a line: that piece is the start of the next line.
    if rest and "tether" not in rest[0]:
        assert expected[len(content)].startswith(rest[0]), rest[:3]
        rest = rest[1:]
    # Then markers only: no content after the cut, and "after-flood" is past the cap too.
    assert rest, "no marker after the cut"
    assert all("tether" in t for t in rest), "not a marker: %r" % rest
    assert not [t for t in rest if content_re.fullmatch(t)], rest[:5]
    # Nothing is lost silently: the markers account for every byte the script wrote
    # (the bytes passed on, and the bytes discarded).
    total = count * (width + 1) + len("after-flood\n")
    nums = [int(x) for t in rest for x in re.findall(r"\d+", t)]
    assert any(a + b == total for a in nums for b in nums), \
        "the markers %r do not account for the %d bytes written" % (rest, total)


def test_the_agent_stays_responsive_during_a_flood(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--stats-interval", "1"])
    started = tmp_path / "FLOODING"
    flood = script_file(tmp_path / "flood.sh",
                        "touch %s\nexec yes 'a line of flood, over and over, to fill the "
                        "pipes and the cap of the agent'\n" % started)
    ws.start_agent(["--startup-script", flood, "--startup-timeout", "20s"])
    wait_until(started.exists, timeout=20, what="the flood to start")
    ws.wait_text("startup", lambda t: len(t) > 0, timeout=15, what="flood lines at the relay")
    assert ws.lifecycle() == "starting"
    for i in range(3):
        t0 = time.monotonic()
        r = ws.ssh("echo", "answer-%d" % i, timeout=30)
        took = time.monotonic() - t0
        assert r.returncode == 0 and r.stdout == b"answer-%d\n" % i, r
        assert took < 10, "an SSH exec took %.1fs during the flood" % took
        t0 = time.monotonic()
        j = ws.json()
        assert j["connected"] is True
        assert time.monotonic() - t0 < 5
    assert ws.lifecycle() == "starting", "the flood ended before the checks were done"
    assert proc_rss_kib(ws.agent.pid) < 256 * 1024, "agent RSS %d KiB during a flood" % (
        proc_rss_kib(ws.agent.pid))
    ws.wait_lifecycle("start_timeout", timeout=40)
    texts = ws.wait_text("startup", lambda t: any("tether" in x and "flood" not in x
                                                  for x in t),
                         timeout=20, what="a marker after the cap")
    assert sum(len(t) + 1 for t in texts) <= 16 * MiB


def test_log_lines_keeps_the_last_n(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "100"])
    ws.start_agent(["--startup-script", numbered_script("K", 1000, 20)])
    ws.wait_lifecycle("ready")
    last = numbered("K", 1000, 20)[-1]
    ws.wait_text("startup", lambda t: t and t[-1] == last, timeout=30)
    code, body = ws.logs()
    doc = json.loads(body)
    assert len(doc["lines"]) == 100, len(doc["lines"])
    assert doc["first"] == doc["lines"][0]["n"] > 1, doc["first"]
    lines = ws.all_logs()
    assert len(lines) == 100
    assert lines[-1]["n"] == doc["next"] - 1


@pytest.mark.parametrize("value", ["0", "1000001", "-1", "abc", ""])
def test_log_lines_is_validated(harness, value):
    r = harness.run("relay", "--listen", "127.0.0.1:0", "--tokens", harness.tokens.path,
                    "--log-lines", value, timeout=30)
    assert r.returncode == 2, (value, r.returncode, r.stderr)
    assert "log-lines" in r.stderr, r.stderr


def test_logs_api_auth_and_scoping(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script", "echo secret-line"])
    ws.wait_text("startup", lambda t: "secret-line" in t)
    relay = ws.relay
    code, body = relay.api("/api/v1/workspaces/alpha/logs", token=None, user=None)
    assert code == 401 and b"secret-line" not in body
    code, body = relay.api("/api/v1/workspaces/alpha/logs", token="wrong")
    assert code == 401 and b"secret-line" not in body
    # An agent token is not a user token.
    code, body = relay.api("/api/v1/workspaces/alpha/logs", token=harness.tokens.agent["alpha"])
    assert code == 401
    code, body = relay.api("/api/v1/workspaces/beta/logs", user=ONLY_A)
    assert code == 404
    code, body = relay.api("/api/v1/workspaces/nosuch/logs")
    assert code == 404
    code, body = relay.api("/api/v1/workspaces/alpha/logs", user=ONLY_A)
    assert code == 200 and b"secret-line" in body
    code, body = relay.api("/api/v1/workspaces/beta/logs")
    assert code == 200 and json.loads(body)["lines"] == []


def test_line_numbers_go_on_across_agent_processes(harness, tmp_path):
    """n numbers every line of the workspace across agent connections; a new agent's batch
    numbers start again at 1, which is not a gap."""
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script", "echo first-agent"])
    ws.wait_text("startup", lambda t: "first-agent" in t)
    assert ws.agent.terminate(timeout=30) == 0
    wait_until(lambda: not ws.relay.connected("alpha"), timeout=20, what="the agent to go")
    ws.start_agent(["--startup-script", "echo second-agent"])
    texts = ws.wait_text("startup", lambda t: "second-agent" in t)
    assert texts == ["first-agent", "second-agent"], texts
    lines = ws.all_logs()
    assert lines[0]["n"] == 1
    assert not [ln for ln in lines if ln["source"] == "relay"], \
        "the relay stored a marker for a new connection: %r" % ws.texts("relay")
    # The new connection reset the lifecycle: the second agent's own states follow.
    ws.wait_lifecycle("ready")


def test_agent_lines_have_source_agent(harness, tmp_path):
    """The agent's own info lines (here: lifecycle) reach the relay under source agent."""
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--startup-script", "true"])
    ws.wait_lifecycle("ready")
    ws.wait_states(["starting", "ready"])
    for ln in ws.all_logs():
        assert ln["source"] in ("agent", "startup"), ln


def restart_relay(harness, ws, extra=()):
    """Kills the relay and starts a new one on the same port; waits for the agent."""
    port = ws.relay.port
    ws.relay.proc.kill()
    ws.relay = harness.relay(port=port, extra=list(extra))
    wait_until(lambda: ws.relay.connected(ws.name), timeout=45, what="the agent to reconnect")


def test_lines_written_while_disconnected_arrive_after_reconnect(harness, tmp_path):
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "10000"])
    go, done = tmp_path / "GO", tmp_path / "DONE"
    ws.start_agent(["--startup-script",
                    "while [ ! -e %s ]; do sleep 0.1; done; %s; touch %s" % (
                        go, numbered_script("D", 500, 30), done)])
    # Scripts start when the manifest arrives, a moment after the relay lists the agent.
    ws.wait_lifecycle("starting")
    port = ws.relay.port
    ws.relay.proc.kill()
    go.touch()
    wait_until(done.exists, timeout=20, what="the script to write while the relay is down")
    time.sleep(1.5)  # the agent has tried to send its batch
    ws.relay = harness.relay(port=port, extra=["--log-lines", "10000"])
    wait_until(lambda: ws.relay.connected("alpha"), timeout=45, what="the agent to reconnect")
    texts = ws.wait_text("startup", lambda t: len(t) >= 500, timeout=20)
    assert texts == numbered("D", 500, 30), "lines lost or reordered across the reconnect"
    ws.wait_lifecycle("ready")


def test_backlog_over_4_mib_while_disconnected_drops_with_a_marker(harness, tmp_path):
    """6 MiB of lines while the relay is down: the agent keeps up to 4 MiB, drops the rest,
    and says so in a marker line once it sends again."""
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "1000000"])
    go, done = tmp_path / "GO", tmp_path / "DONE"
    count, width = 6 * 16384, 63   # 6 MiB of 64-byte lines
    ws.start_agent(["--startup-script",
                    "while [ ! -e %s ]; do sleep 0.1; done; %s; touch %s" % (
                        go, numbered_script("B", count, width), done)])
    # Scripts start when the manifest arrives, a moment after the relay lists the agent.
    ws.wait_lifecycle("starting")
    port = ws.relay.port
    ws.relay.proc.kill()
    go.touch()
    wait_until(done.exists, timeout=30, what="the script to write while the relay is down")
    time.sleep(1.5)
    ws.relay = harness.relay(port=port, extra=["--log-lines", "1000000"])
    wait_until(lambda: ws.relay.connected("alpha"), timeout=45, what="the agent to reconnect")
    ws.wait_lifecycle("ready", timeout=30)

    def marked(lines):
        return [ln for ln in lines if "dropped" in ln["text"] and "tether" in ln["text"]]
    wait_until(lambda: marked(ws.all_logs()), timeout=30, what="a dropped-lines marker")
    time.sleep(1.5)
    lines = ws.all_logs()
    content = [ln["text"] for ln in lines if ln["source"] == "startup"]
    got = [t for t in content if t.startswith("B")]
    assert 0 < len(got) < count, len(got)
    assert sum(len(t) + 1 for t in got) <= 4 * MiB + 64 * 1024, "more than the 4 MiB backlog"
    expected = numbered("B", count, width)
    assert got == expected[:len(got)], "the kept lines are not the first ones, in order"
    m = marked(lines)
    assert len(m) == 1, [x["text"] for x in m]
    # The count covers every source: the agent's own lines of the time were dropped too.
    nums = [int(x) for x in re.findall(r"\d+", m[0]["text"])]
    missing = count - len(got)
    assert any(missing <= x <= missing + 100 for x in nums), \
        "the marker %r does not count the %d dropped script lines" % (m[0]["text"], missing)


def test_a_relay_too_slow_for_the_logs_costs_lines_with_a_marker_not_silently(harness,
                                                                               tmp_path):
    """The relay stops reading (SIGSTOP) while the tunnel stays up and three start scripts
    write 8 MB each (a script's output is cut at 8 MiB): more than the agent's 4 MiB backlog,
    its queues and the sockets' buffers together can hold. The agent drops the rest with a
    marker of its own, and no batch is lost on the way (the relay sees no gap in their
    numbers)."""
    go = tmp_path / "GO"
    scripts = [{"name": "w%d" % i, "run_on": "start",
                "script": "while [ ! -e %s ]; do sleep 0.05; done; "
                          "head -c 6000000 /dev/urandom | base64 -w 76; touch %s" % (
                              go, tmp_path / ("DONE%d" % i))} for i in range(3)]
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"scripts": scripts}})
    ws = Workspace(harness, tmp_path, relay_extra=["--log-lines", "1000000",
                                                   "--manifest", manifest])
    ws.start_agent()
    ws.wait_lifecycle("starting")  # the scripts run (and wait for GO)
    os.kill(ws.relay.proc.pid, signal.SIGSTOP)
    try:
        go.touch()
        wait_until(lambda: all((tmp_path / ("DONE%d" % i)).exists() for i in range(3)),
                   timeout=60, what="the scripts' output")
        time.sleep(3)
    finally:
        os.kill(ws.relay.proc.pid, signal.SIGCONT)
    ws.wait_lifecycle("ready", timeout=60)

    def marker(lines):
        return [ln["text"] for ln in lines if ln["source"] == "agent" and "dropped" in ln["text"]]
    wait_until(lambda: marker(ws.all_logs()), timeout=60, what="the agent's dropped-lines marker")
    lines = ws.all_logs()
    assert not [ln for ln in lines if ln["source"] == "relay"], \
        [ln["text"] for ln in lines if ln["source"] == "relay"][:5]
    assert len(marker(lines)) == 1, marker(lines)
