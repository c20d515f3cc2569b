"""Scenarios of the valgrind pass that no integration test covers at a size valgrind can
afford (test_forward.py's concurrency test moves 200 MiB), and a regression test of a leak
it found. They use the integration suite's fixtures; tests/valgrind/run passes this file to
pytest by name (its name keeps it out of ordinary collection)."""
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from conftest import (agent, echo_roundtrip, harness, procs, relay,  # noqa: E402,F401
                      servers, start_forward, tether_bin, tokens, wait_until)


def test_concurrent_streams_echo_intact(servers, agent, start_forward):
    """Eight connections through one forward at once (eight tunnel streams interleaved on
    the agent's websocket), 256 KiB each way, each echoed intact after a half close."""
    echo = servers.echo()
    port = start_forward(echo.port)
    errors = []

    def one(i):
        try:
            echo_roundtrip(port, nbytes=256 * 1024 + i, seed=100 + i, timeout=120)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a connection did not finish"
    assert not errors, errors
    assert echo.accepted == 8


def test_agent_whose_connects_fail_exits_clean(harness):
    """Connection attempts that fail at once (connect() to the broadcast address is EACCES),
    then SIGTERM: the agent exits 0, and its loop is closed and freed although
    libwebsockets 4.1 abandons a poll handle per failed attempt (tether.supp)."""
    proc = harness.agent(None, url="ws://255.255.255.255:9", wait=False)
    wait_until(lambda: proc.stderr().count("retrying") >= 2, timeout=90,
               what="two failed connection attempts")
    assert proc.terminate(timeout=90) == 0, proc.describe()
