"""The command-line contract: exit statuses, --help, one-line errors, token file modes."""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import ADMIN, WORKSPACES, Harness, Procs, Tokens, wait_until, write_private

SUBCOMMANDS = ["agent", "relay", "forward", "status", "demo", "version", "ssh-proxy",
               "config-ssh", "sftp-server"]


def run(tether_bin, *args, timeout=20, env=None):
    return subprocess.run([str(tether_bin)] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_error_line(r, code):
    assert r.returncode == code, "exit %d, wanted %d; stderr=%r" % (r.returncode, code, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, "wanted exactly one line on stderr, got %r" % r.stderr
    assert lines[0].startswith("tether: "), lines[0]
    return lines[0]


def assert_usage_error(r):
    """Exit 2, and the first thing on stderr is the error, starting with 'tether: '."""
    assert r.returncode == 2, "exit %d, wanted 2; stderr=%r" % (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines, "no error message on stderr"
    assert lines[0].startswith("tether: "), "error line must start with 'tether: ': %r" % lines[0]
    assert r.stdout == "", "usage errors print nothing on stdout: %r" % r.stdout


def test_version(tether_bin):
    r = run(tether_bin, "version")
    assert r.returncode == 0, r.stderr
    assert re.match(r"tether \d+\.\d+\.\d+", r.stdout), r.stdout


def test_top_level_help(tether_bin):
    r = run(tether_bin, "--help")
    assert r.returncode == 0
    assert "usage" in r.stdout.lower()
    for cmd in SUBCOMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(tether_bin, cmd):
    r = run(tether_bin, cmd, "--help")
    assert r.returncode == 0, "tether %s --help: exit %d, stderr %r" % (cmd, r.returncode, r.stderr)
    assert r.stdout.strip(), "tether %s --help printed nothing on stdout" % cmd
    if cmd != "version":
        assert "usage" in r.stdout.lower() and cmd in r.stdout


@pytest.mark.parametrize("cmd", [c for c in SUBCOMMANDS if c != "version"])
def test_unknown_option_is_usage_error(tether_bin, cmd):
    r = run(tether_bin, cmd, "--no-such-option")
    assert_usage_error(r)


def test_unknown_command(tether_bin):
    assert_usage_error(run(tether_bin, "frobnicate"))


def test_no_command(tether_bin):
    r = run(tether_bin)
    assert r.returncode == 2


@pytest.mark.parametrize("args", [
    ["relay"],                                                  # no --listen / --tokens
    ["relay", "--listen", "127.0.0.1:0"],                       # no --tokens
    ["relay", "--listen", "nonsense", "--tokens", "/dev/null"],
    ["relay", "--listen", "127.0.0.1:0", "--tokens", "x", "--keepalive-idle", "soon"],
    ["forward", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "ws"],  # no spec
    ["forward", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "ws", "80"],
    ["forward", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "ws", "0:99999"],
    ["status", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "a", "b"],
    ["agent", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "extra"],
    ["agent", "--url", "ws://127.0.0.1:1", "--token-file", "/dev/null", "--keepalive-timeout", "x"],
])
def test_bad_usage_exit_2(tether_bin, args):
    assert_usage_error(run(tether_bin, *args))


@pytest.mark.parametrize("cmd", ["agent", "status", "forward"])
def test_missing_token_file(tether_bin, tmp_path, cmd):
    missing = tmp_path / "no-such.token"
    args = [cmd, "--url", "ws://127.0.0.1:9", "--token-file", missing]
    if cmd == "forward":
        args += ["alpha", "0:80"]
    line = assert_one_error_line(run(tether_bin, *args), 1)
    assert str(missing) in line


@pytest.mark.parametrize("cmd", ["agent", "status", "forward"])
def test_token_file_readable_by_others_refused(tether_bin, tmp_path, cmd):
    tok = write_private(tmp_path / "open.token", "sometoken\n", mode=0o644)
    args = [cmd, "--url", "ws://127.0.0.1:9", "--token-file", tok]
    if cmd == "forward":
        args += ["alpha", "0:80"]
    line = assert_one_error_line(run(tether_bin, *args), 1)
    assert str(tok) in line
    assert "sometoken" not in line  # never print the secret


def test_token_via_env_file(tether_bin, tmp_path):
    # TETHER_TOKEN_FILE is read the same way: a 0644 file is refused
    tok = write_private(tmp_path / "env.token", "sometoken\n", mode=0o640)
    env = dict(os.environ, TETHER_TOKEN_FILE=str(tok), TETHER_URL="ws://127.0.0.1:9")
    env.pop("TETHER_TOKEN", None)
    assert_one_error_line(run(tether_bin, "status", env=env), 1)


def test_relay_refuses_tokens_file_readable_by_others(tether_bin, tmp_path):
    t = Tokens(tmp_path / "tok")
    os.chmod(str(t.path), 0o644)
    r = run(tether_bin, "relay", "--listen", "127.0.0.1:0", "--tokens", t.path, timeout=20)
    line = assert_one_error_line(r, 1)
    assert str(t.path) in line


def test_relay_refuses_group_readable_tokens_file(tether_bin, tmp_path):
    t = Tokens(tmp_path / "tok")
    os.chmod(str(t.path), 0o640)
    assert_one_error_line(run(tether_bin, "relay", "--listen", "127.0.0.1:0", "--tokens", t.path), 1)


def test_relay_missing_tokens_file(tether_bin, tmp_path):
    assert_one_error_line(run(tether_bin, "relay", "--listen", "127.0.0.1:0",
                              "--tokens", tmp_path / "absent.json"), 1)


def test_relay_invalid_tokens_json(tether_bin, tmp_path):
    p = write_private(tmp_path / "bad.json", '{"agents": [1, 2]}')
    assert_one_error_line(run(tether_bin, "relay", "--listen", "127.0.0.1:0", "--tokens", p), 1)


def test_status_ok_and_json(harness, relay, agent):
    r = harness.run("status", "--url", relay.url, "--token-file", harness.tokens.user_file())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [w["name"] for w in doc] == list(WORKSPACES)
    assert doc[0]["connected"] is True
    r = harness.run("status", "--url", relay.url, "--token-file", harness.tokens.user_file(),
                    WORKSPACES[0])
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["name"] == WORKSPACES[0] and one["connected"] is True


def test_status_bad_token_exit_1(harness, relay):
    r = harness.run("status", "--url", relay.url, "--token-file", harness.tokens.bogus_file())
    line = assert_one_error_line(r, 1)
    assert "401" in line
    assert r.stdout == ""


def test_status_unknown_workspace_exit_1(harness, relay):
    r = harness.run("status", "--url", relay.url, "--token-file", harness.tokens.user_file(),
                    "nosuchws")
    line = assert_one_error_line(r, 1)
    assert "404" in line


def test_status_relay_down_exit_1(harness, tmp_path):
    from conftest import free_port
    port = free_port()
    r = harness.run("status", "--url", "ws://127.0.0.1:%d" % port, "--token-file",
                    harness.tokens.user_file(), timeout=30)
    assert_one_error_line(r, 1)


def test_agent_bad_token_keeps_retrying_without_leaking_token(harness, relay):
    """An agent whose token the relay refuses says so (401) and retries; it never logs the
    token."""
    p = harness.agent(relay, "alpha", token_file=harness.tokens.bogus_file(), wait=False)
    wait_until(lambda: "401" in p.stderr(), timeout=15, what="agent to report HTTP 401")
    assert p.alive()
    secret = harness.tokens.bogus_file().read_text().strip()
    assert secret not in p.stderr() and secret not in p.stdout()
    assert relay.workspace("alpha")["connected"] is False


def test_demo(tether_bin, tmp_path):
    """tether demo runs a relay and an agent; its instructions name a usable token file."""
    from conftest import free_port
    procs = Procs(tmp_path / "logs")
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    try:
        port = free_port()
        p = procs.start("demo", [tether_bin, "demo", "--listen", "127.0.0.1:%d" % port], env=env)

        def instructions():
            assert p.alive(), p.describe()
            m = re.search(r"--url (\S+) --token-file (\S+)", p.stdout())
            return m
        m = wait_until(instructions, timeout=15, what="demo instructions on stdout")
        url, token_file = m.group(1), m.group(2)
        assert url == "ws://127.0.0.1:%d" % port
        st = os.stat(token_file)
        assert st.st_mode & 0o077 == 0, "demo token file mode %o" % (st.st_mode & 0o777)

        def connected():
            r = run(tether_bin, "status", "--url", url, "--token-file", token_file)
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            return doc and all(w["connected"] for w in doc)
        wait_until(connected, timeout=15, what="demo workspace to be connected")
        assert p.terminate() == 0
    finally:
        procs.cleanup()


def test_relay_sigterm_exits_0(harness):
    relay = harness.relay()
    rc = relay.proc.terminate(timeout=10)
    assert rc == 0, relay.proc.describe()


def test_agent_sigterm_exits_0_and_disconnects(harness, relay, agent):
    rc = agent.terminate(timeout=10)
    assert rc == 0, agent.describe()
    wait_until(lambda: not relay.connected("alpha"), timeout=10, what="alpha to be offline")


def test_empty_environment_variables_count_as_unset(harness, relay):
    """TETHER_TOKEN_FILE= (cleared in a later layer of an image, say) does not hide
    TETHER_TOKEN, and an empty TETHER_URL or TETHER_TOKEN is reported as missing."""
    env = dict(os.environ, TETHER_URL=relay.url, TETHER_TOKEN_FILE="",
               TETHER_TOKEN=harness.tokens.user_token())
    r = harness.run("status", env=env)
    assert r.returncode == 0 and "alpha" in r.stdout, r
    env = dict(os.environ, TETHER_URL="", TETHER_TOKEN=harness.tokens.user_token())
    env.pop("TETHER_TOKEN_FILE", None)
    r = harness.run("status", env=env)
    assert r.returncode == 2 and "no relay URL: give --url URL or set TETHER_URL" in r.stderr, r
    env = dict(os.environ, TETHER_URL=relay.url, TETHER_TOKEN="")
    env.pop("TETHER_TOKEN_FILE", None)
    r = harness.run("status", env=env)
    assert r.returncode == 2 and "no token: give --token-file FILE" in r.stderr, r


def test_agent_env_url_and_token_file(harness, relay):
    """The agent takes TETHER_URL and TETHER_TOKEN_FILE from the environment."""
    env = dict(os.environ, TETHER_URL=relay.url,
               TETHER_TOKEN_FILE=str(harness.tokens.agent_file("beta")))
    env.pop("TETHER_TOKEN", None)
    p = harness.procs.start("agent-env", [harness.bin, "agent"], env=env)
    wait_until(lambda: relay.connected("beta"), timeout=15, what="beta to connect")
    assert p.alive()
