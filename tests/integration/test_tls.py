"""wss:// end to end with a test CA: the relay serves TLS (--tls-cert/--tls-key); clients and
the agent verify the relay's certificate against --ca-file (or the system CAs), refuse a
certificate they cannot trust or whose name does not match the URL, and --insecure skips the
check only with a warning."""
import json
import re
import subprocess

import pytest

from conftest import echo_roundtrip, wait_until

TLS_LISTEN_RE = re.compile(r"relay listening on wss://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and a server certificate for DNS:localhost only (no IP address)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True,
                       timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tether test CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    # another CA, which signed nothing the relay presents
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other")
    return d


@pytest.fixture
def tls_relay(harness, pki):
    proc = harness.relay(extra=["--tls-cert", pki / "srv.pem", "--tls-key", pki / "srv.key"],
                         wait=False)

    def listening():
        m = TLS_LISTEN_RE.search(proc.stderr())
        assert proc.alive(), "relay exited early:\n" + proc.describe()
        return int(m.group(1)) if m else None

    return proc, wait_until(listening, timeout=15, what="the TLS relay to listen")


def status(harness, url, *extra):
    return harness.run("status", "--url", url, "--token-file", harness.tokens.user_file(),
                       *extra, timeout=30)


def test_wss_agent_status_and_forward_with_ca_file(harness, tls_relay, pki, servers):
    _, port = tls_relay
    url = "wss://localhost:%d" % port
    ca = str(pki / "ca.pem")
    agent = harness.agent(None, "alpha", url=url, extra=["--ca-file", ca], wait=False)

    def connected():
        assert agent.alive(), agent.describe()
        r = status(harness, url, "--ca-file", ca, "alpha")
        return r.returncode == 0 and json.loads(r.stdout)["connected"] is True

    wait_until(connected, timeout=20, what="the agent to connect over wss")
    echo = servers.echo()
    fwd = harness.forward(None, "alpha", echo.port, url=url, extra=["--ca-file", ca])
    echo_roundtrip(fwd.port, nbytes=2 * 1024 * 1024)


def test_wss_untrusted_certificate_refused(harness, tls_relay, pki):
    _, port = tls_relay
    url = "wss://localhost:%d" % port
    r = status(harness, url, "--ca-file", str(pki / "other.pem"))
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.startswith("tether: ")]
    assert len(lines) == 1 and "TLS" in lines[0] and "certificate" in lines[0], r.stderr
    # and the agent does not connect: it keeps retrying, saying why
    agent = harness.agent(None, "alpha", url=url, extra=["--ca-file", str(pki / "other.pem")],
                          wait=False)
    wait_until(lambda: "retrying in" in agent.stderr(), timeout=15, what="the agent to retry")
    assert "TLS handshake with the relay failed" in agent.stderr()
    assert agent.alive()


def test_wss_name_mismatch_refused(harness, tls_relay, pki):
    """The certificate names localhost only: the same relay reached as 127.0.0.1 is refused."""
    _, port = tls_relay
    r = status(harness, "wss://127.0.0.1:%d" % port, "--ca-file", str(pki / "ca.pem"))
    assert r.returncode == 1
    assert "TLS handshake with the relay failed" in r.stderr, r.stderr
    ok = status(harness, "wss://localhost:%d" % port, "--ca-file", str(pki / "ca.pem"))
    assert ok.returncode == 0, ok.stderr


def test_insecure_skips_the_check_and_warns(harness, tls_relay):
    _, port = tls_relay
    r = status(harness, "wss://127.0.0.1:%d" % port, "--insecure")
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "--insecure" in r.stderr
    agent = harness.agent(None, "alpha", url="wss://127.0.0.1:%d" % port, extra=["--insecure"],
                          wait=False)
    wait_until(lambda: "connected to the relay" in agent.stderr(), timeout=15,
               what="the insecure agent to connect")
    assert "WARNING" in agent.stderr()
