"""devcontainer.json (issue 5, second half): in the workspace directory (--directory, or the
manifest's "directory"), .devcontainer/devcontainer.json is JSON with comments and trailing
commas; postStartCommand runs as a startup script, postAttachCommand on the first session
only, forwardPorts shows in the relay's forward_ports, remoteEnv is in every session's
environment. A malformed file is one clear log line, and the lifecycle goes on without it."""
import os
import time

import pytest

from conftest import env_lines, wait_until
from lifecyclelib import Workspace, write_manifest

# JSON with comments (line and block, one with a "//" inside a string that must stay) and
# trailing commas in objects and arrays. %(...)s are filled per test.
DEVCONTAINER = """// the workspace's dev container
{
  /* a block comment
     over lines */
  "name": "test // not a comment",
  "image": "ignored",
  "postStartCommand": "echo post-start-ran; echo started >> %(post_start_file)s",
  "postAttachCommand": "echo attach-ran; echo attached >> %(attach_file)s", // trailing
  "forwardPorts": [3000, "db:5432", 8080,],
  "remoteEnv": {
    "TETHER_DC_VAR": "remote-value",
    "TETHER_DC_URL": "http://example.invalid/a//b",
    "TETHER_DC_SUB": "${containerEnv:TETHER_DC_FROM_AGENT}-x",
    "TETHER_DC_DIR": "${containerWorkspaceFolderBasename}",
  },
}
"""


def write_devcontainer(directory, text, top_level=False):
    d = directory
    if top_level:
        path = d / ".devcontainer.json"
    else:
        (d / ".devcontainer").mkdir(exist_ok=True)
        path = d / ".devcontainer" / "devcontainer.json"
    path.write_text(text)
    return path


@pytest.fixture
def dc(harness, tmp_path):
    """A workspace whose directory holds the devcontainer.json above; the agent started with
    --directory and TETHER_DC_FROM_AGENT in its environment."""
    ws = Workspace(harness, tmp_path)
    ws.post_start_file = tmp_path / "post-start.txt"
    ws.attach_file = tmp_path / "attach.txt"
    write_devcontainer(ws.dir, DEVCONTAINER % {"post_start_file": ws.post_start_file,
                                               "attach_file": ws.attach_file})
    env = dict(os.environ, TETHER_DC_FROM_AGENT="from-agent")
    ws.start_agent(["--directory", ws.dir], env=env)
    return ws


def test_post_start_command_runs_as_a_startup_script(dc):
    dc.wait_lifecycle("ready")
    dc.wait_states(["starting", "ready"])
    texts = dc.wait_text("devcontainer:postStartCommand", lambda t: "post-start-ran" in t)
    assert texts == ["post-start-ran"], texts
    assert dc.post_start_file.read_text() == "started\n"
    # It ran inside starting..ready.
    lines = dc.all_logs()
    lc = [n for n, s in dc.lifecycle_lines(lines) if s in ("starting", "ready")]
    n = [ln["n"] for ln in lines if ln["source"] == "devcontainer:postStartCommand"][0]
    assert lc[0] < n < lc[1], lc


def test_forward_ports_show_in_the_workspace_json(dc):
    def fp():
        got = dc.json()["forward_ports"]
        return sorted((p["port"], p.get("host") or "") for p in got) or None
    got = wait_until(fp, timeout=15, what="forward_ports in the workspace JSON")
    assert got == [(3000, ""), (5432, "db"), (8080, "")], got
    for p in dc.json()["forward_ports"]:
        assert set(p) <= {"port", "host"}, p


def test_remote_env_is_in_ssh_env(dc):
    dc.wait_lifecycle("ready")
    r = dc.ssh("env", timeout=60)
    assert r.returncode == 0, r.stderr
    env = env_lines(r.stdout)
    assert env.get("TETHER_DC_VAR") == "remote-value", env
    assert env.get("TETHER_DC_URL") == "http://example.invalid/a//b", env
    assert env.get("TETHER_DC_SUB") == "from-agent-x", env
    assert env.get("TETHER_DC_DIR") == dc.dir.name, env
    # With a PTY too (ssh -tt), and in a PTY through the relay.
    r = dc.ssh("env", tty=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert env_lines(r.stdout).get("TETHER_DC_VAR") == "remote-value"
    out, texts, code = dc.pty_run("env; exit 0")
    assert env_lines(out).get("TETHER_DC_VAR") == "remote-value", out
    assert texts == ['{"exit":0}'], texts


def test_sessions_start_in_the_workspace_directory(dc):
    r = dc.ssh("pwd", timeout=60)
    assert r.returncode == 0 and r.stdout.decode().strip() == str(dc.dir), r


def test_post_attach_command_runs_once_on_the_first_session(dc):
    dc.wait_lifecycle("ready")
    time.sleep(2)
    assert not dc.attach_file.exists(), "postAttachCommand ran without a session"
    assert dc.texts("devcontainer:postAttachCommand") == []
    r = dc.ssh("true", timeout=60)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: dc.attach_file.exists() and dc.attach_file.read_text() == "attached\n",
               timeout=20, what="postAttachCommand to run")
    dc.wait_text("devcontainer:postAttachCommand", lambda t: t == ["attach-ran"])
    for _ in range(2):
        assert dc.ssh("true", timeout=60).returncode == 0
    dc.pty_run("exit 0")
    time.sleep(3)
    assert dc.attach_file.read_text() == "attached\n", "postAttachCommand ran more than once"
    assert dc.texts("devcontainer:postAttachCommand") == ["attach-ran"]


def test_post_attach_command_on_a_first_pty(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    attach = tmp_path / "attach.txt"
    write_devcontainer(ws.dir, '{"postAttachCommand": "echo pty >> %s",}' % attach)
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    ws.pty_run("exit 0")
    wait_until(lambda: attach.exists(), timeout=20, what="postAttachCommand after a PTY")
    ws.ssh("true", timeout=60)
    time.sleep(2)
    assert attach.read_text() == "pty\n"


def test_command_forms_array_and_object(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, """{
      "postStartCommand": {
        "one": "echo one-ran",
        "two": ["printf", "%s|%s\\\\n", "two ran", "$HOME"],  // no shell: $HOME stays
      },
    }""")
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    ws.wait_text("devcontainer:postStartCommand:one", lambda t: t == ["one-ran"])
    ws.wait_text("devcontainer:postStartCommand:two", lambda t: t == ["two ran|$HOME"])


def test_array_form_post_start(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, '{"postStartCommand": ["echo", "array;", "form"]}')
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    ws.wait_text("devcontainer:postStartCommand", lambda t: t == ["array; form"])


def test_failing_post_start_command_is_start_error(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, '{"postStartCommand": "echo failing; exit 4"}')
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("start_error")
    ws.wait_text("devcontainer:postStartCommand", lambda t: t == ["failing"])


def test_top_level_devcontainer_json(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, '{"postStartCommand": "echo top-level",}', top_level=True)
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    ws.wait_text("devcontainer:postStartCommand", lambda t: t == ["top-level"])


def test_directory_from_the_manifest(harness, tmp_path):
    d = tmp_path / "from-manifest"
    d.mkdir()
    write_devcontainer(d, '{"postStartCommand": "echo via-manifest-dir", '
                          '"forwardPorts": [4000]}')
    manifest = write_manifest(tmp_path / "manifest.json", {"alpha": {"directory": str(d)}})
    ws = Workspace(harness, tmp_path, relay_extra=["--manifest", manifest])
    ws.start_agent()
    ws.wait_lifecycle("ready")
    ws.wait_text("devcontainer:postStartCommand", lambda t: t == ["via-manifest-dir"])
    wait_until(lambda: [p["port"] for p in ws.json()["forward_ports"]] == [4000], timeout=15,
               what="forward_ports from the manifest's directory")


def test_with_a_startup_script_both_run(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, '{"postStartCommand": "echo from-dc"}')
    ws.start_agent(["--directory", ws.dir, "--startup-script", "echo from-flag"])
    ws.wait_lifecycle("ready")
    ws.wait_text("devcontainer:postStartCommand", lambda t: t == ["from-dc"])
    ws.wait_text("startup", lambda t: t == ["from-flag"])


@pytest.mark.parametrize("text", [
    '{"postStartCommand": "echo never" "missing comma"}',
    '{"postStartCommand": 42}',
    '{"forwardPorts": [70000]}',
    '[1, 2, 3]',
    '{"postStartCommand": "echo never", /* unterminated comment',
], ids=["syntax", "command-type", "port-range", "not-object", "open-comment"])
def test_malformed_devcontainer_json_is_one_log_line_and_ready(harness, tmp_path, text):
    ws = Workspace(harness, tmp_path)
    write_devcontainer(ws.dir, text)
    ws.start_agent(["--directory", ws.dir, "--startup-script", "echo flag-script-ran"])
    ws.wait_lifecycle("ready")
    ws.wait_states(["starting", "ready"])
    ws.wait_text("startup", lambda t: t == ["flag-script-ran"])
    time.sleep(1.5)
    lines = ws.all_logs()
    about = [ln["text"] for ln in lines if ln["source"] == "agent" and
             "devcontainer" in ln["text"]]
    assert len(about) == 1, "expected one log line about devcontainer.json: %r" % (
        [(ln["source"], ln["text"]) for ln in lines],)
    assert "devcontainer.json" in about[0], about
    assert not [ln for ln in lines if ln["source"].startswith("devcontainer:")]
    assert ws.json()["forward_ports"] == []
    r = ws.ssh("echo", "served", timeout=60)
    assert r.returncode == 0 and r.stdout == b"served\n"


def test_no_devcontainer_json_is_not_an_error(harness, tmp_path):
    ws = Workspace(harness, tmp_path)
    ws.start_agent(["--directory", ws.dir])
    ws.wait_lifecycle("ready")
    time.sleep(1.5)
    assert not [ln for ln in ws.all_logs() if "devcontainer" in ln["text"]
                and ln["source"] == "agent" and "warn" in ln["text"].lower()]
    assert ws.json()["forward_ports"] == []
