"""A pytest plugin for the valgrind pass (tests/valgrind/run loads it with -p vgplugin).

tests/integration/conftest.py ends every process of a test with SIGKILL to its process
group (Procs.cleanup). A process killed that way writes no valgrind summary, so nothing
could be judged. This plugin wraps Procs.cleanup: first SIGTERM to every process still
running (all but the relays, then the relays, so that agents and clients leave a live
relay), a bounded wait for each to exit on its own (the agent and the relay shut down in
order on SIGTERM and valgrind writes its summary), then conftest's own cleanup, which kills
whatever is left and the rest of each process group.

Processes that had to be killed after the grace period are appended to the file named by
TETHER_VG_UNCLEAN (one line: pid, name, command line); tests/valgrind/run reports them.

Environment:
  TETHER_VG_GRACE      seconds to wait for processes to exit after SIGTERM (default 60)
  TETHER_VG_UNCLEAN    file that lists processes that did not exit on SIGTERM
"""
import os
import signal
import subprocess
import sys
import time

GRACE = float(os.environ.get("TETHER_VG_GRACE", "60"))


def _is_relay(proc):
    args = proc.args
    return len(args) > 1 and args[1] == "relay"


def _record_unclean(proc):
    path = os.environ.get("TETHER_VG_UNCLEAN")
    if not path:
        return
    with open(path, "a") as f:
        f.write("%d %s %s\n" % (proc.pid, proc.name, " ".join(proc.args)))


def _terminate_all(procs):
    """SIGTERM to each running leader, then a wait bounded by GRACE for all of them."""
    running = [p for p in procs if p.popen.poll() is None]
    for p in running:
        try:
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE
    for p in running:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _record_unclean(p)


def _patch(conftest):
    procs_cls = conftest.Procs
    if getattr(procs_cls, "_vg_patched", False):
        return
    original = procs_cls.cleanup

    def cleanup(self):
        live = list(reversed(self.procs))
        _terminate_all([p for p in live if not _is_relay(p)])
        _terminate_all([p for p in live if _is_relay(p)])
        original(self)

    procs_cls.cleanup = cleanup
    procs_cls._vg_patched = True


def _is_integration_conftest(module):
    path = getattr(module, "__file__", "") or ""
    return path.replace(os.sep, "/").endswith("tests/integration/conftest.py")


def pytest_plugin_registered(plugin, manager):
    """conftest.py of the integration tests, loaded as their conftest."""
    if _is_integration_conftest(plugin):
        _patch(plugin)


def pytest_collection_finish(session):
    """The same module imported by tests/valgrind/scenarios.py when no integration test
    was collected (it is then not registered as a conftest)."""
    module = sys.modules.get("conftest")
    if module is not None and _is_integration_conftest(module):
        _patch(module)
