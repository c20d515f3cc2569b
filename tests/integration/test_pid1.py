"""The agent as PID 1 (as in a container, under `unshare --pid --fork`): processes orphaned
by sessions are re-parented to it and must be collected, or they stay zombies."""
import subprocess
import time

import pytest

from conftest import can_unshare_pid, children_of, wait_until

pytestmark = pytest.mark.skipif(not can_unshare_pid(),
                                reason="needs root and unshare --pid (a private PID namespace)")


def test_orphans_are_reaped_when_pid_1(harness, relay, tmp_path):
    args = ["unshare", "--pid", "--fork", "--mount-proc", harness.bin, "agent", "--url",
            relay.url, "--token-file", harness.tokens.agent_file("alpha"), "--state-dir",
            str(tmp_path / "state")]
    proc = harness.procs.start("agent-pid1", args)
    wait_until(lambda: relay.connected("alpha"), timeout=20, what="the PID 1 agent to connect")
    # unshare forks: its child is the agent, PID 1 inside.
    wait_until(lambda: children_of(proc.pid), timeout=10, what="the agent under unshare")
    agent_pid = children_of(proc.pid)[0][0]
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host ws\n  ProxyCommand %s ssh-proxy --url %s --token-file %s alpha\n"
                   "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                   "  LogLevel ERROR\n  BatchMode yes\n" % (
                       harness.bin, relay.url, harness.tokens.user_file()))
    # Daemonised grandchildren outlive their session and end later, as orphans.
    r = subprocess.run(["ssh", "-F", str(cfg), "ws",
                        "for i in 1 2 3; do setsid sh -c 'sleep 1' </dev/null >/dev/null 2>&1 & "
                        "done; echo $$"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: any(s for p, s in children_of(agent_pid)), timeout=10,
               what="the orphans to be re-parented to the agent")
    time.sleep(2.5)  # they have all exited by now
    left = children_of(agent_pid)
    assert not [p for p, s in left if s == "Z"], "zombies under the PID 1 agent: %r" % left
    assert proc.alive()
