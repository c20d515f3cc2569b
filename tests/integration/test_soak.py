"""The soak test, short: tests/soak/run --duration 60 against the suite's binary. Mixed load
(OpenSSH sessions through ssh-proxy, scp and sftp, forwards, reconnecting terminals, relay
kills) on a relay and an agent; it exits 0 only if every operation succeeded and neither
process grew by 1 MiB of RSS or by a descriptor between quiescent points. About 65 s.
tests/soak/README.md has the 10-minute version."""
import os
import signal
import subprocess

import pytest

from conftest import REPO_ROOT

SOAK = REPO_ROOT / "tests" / "soak" / "run"


@pytest.mark.plain_build
def test_soak_60s(tether_bin, tmp_path):
    env = dict(os.environ, TETHER_BIN=str(tether_bin), TMPDIR=str(tmp_path))
    p = subprocess.Popen(["/usr/bin/python3", str(SOAK), "--duration", "60"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        out, _ = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        # SIGTERM lets it stop what it started; its children die with it in any case
        # (parent-death signal), and the group is killed last.
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate(timeout=10)
        out += b"\n(test_soak: killed after 150 s)\n"
    text = out.decode("utf-8", "replace")
    print(text)   # the whole report: pytest shows it with the failure (or with -rA)
    tail = "\n".join(text.splitlines()[-80:])
    assert p.returncode == 0, "tests/soak/run --duration 60 exited %r; its last lines:\n%s" % (
        p.returncode, tail)
