"""The static binary needs nothing: it runs as the agent in an empty root (issue 8).

packaging/static/build.sh makes it; tests/run passes its path in TETHER_STATIC_BIN. The
chroot tests put only that binary and busybox-static into an empty directory, with a minimal
/etc/passwd and /etc/group, device nodes and its own /proc and /dev/pts, and start the agent
there as an image would (the Dockerfile fragment's layout, the .deb installed by dpkg, or the
devcontainer Feature's install.sh and entrypoint), against a relay outside (the build under
test). No libc, no NSS modules, no CA bundle, no OpenSSH: users are looked up in the chroot's
/etc/passwd by musl itself, SFTP is the built-in server. The build and packaging scripts'
failure paths are tested here too.

The users in the chroot's /etc/passwd do not exist on the host, so the session's name, home
and shell can only have come from the chroot.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess

import pexpect
import pytest

from conftest import (REPO_ROOT, SshEnv, WORKSPACES, can_unshare_pid, echo_roundtrip,
                      mount_namespace_available, wait_until)
from test_tls import pki, tls_relay  # noqa: F401  (fixtures: a test CA, a TLS relay)

pytestmark = pytest.mark.static_build
REPO = str(REPO_ROOT)

MAX_SIZE = 4 * 1024 * 1024  # the bound on the stripped static binary
USER, UID, HOME = "devuser", 4321, "/home/devuser"
TOKEN_IN_ROOT = HOME + "/.tether-token"
BUSYBOX = "/bin/busybox"


@pytest.fixture(scope="module")
def static_bin():
    path = os.environ.get("TETHER_STATIC_BIN")
    if not path:
        pytest.skip("TETHER_STATIC_BIN is not set: packaging/static/build.sh prints the path "
                    "of the binary it made (tests/run sets it)")
    if not os.access(path, os.X_OK):
        pytest.fail("TETHER_STATIC_BIN=%s is not an executable file" % path)
    return path


def needs_root_and_namespaces():
    """tests/run (which sets TETHER_STATIC_BIN) runs as root where namespaces work: there a
    missing capability fails the test instead of skipping it unnoticed."""
    if os.geteuid() != 0 or not mount_namespace_available() or not can_unshare_pid():
        pytest.fail("needs root, mount and PID namespaces (chroot, mknod, mounting /proc)")
    if not os.path.isfile(BUSYBOX) or "statically linked" not in subprocess.run(
            ["file", "-b", BUSYBOX], capture_output=True, text=True).stdout:
        pytest.fail("%s is not busybox-static (apt-get install busybox-static)" % BUSYBOX)


def make_root(root, random_devices=True):
    """An empty root with only busybox and what a container runtime gives any image:
    /etc/passwd, /etc/group, /dev nodes, /tmp. /proc and /dev/pts are mounted by the agent's
    wrapper in its own mount namespace. random_devices=False leaves out /dev/random and
    /dev/urandom."""
    for d in ("bin", "etc", "dev/pts", "proc", "tmp", "home"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin/busybox"))
    subprocess.run(["chroot", root, "/bin/busybox", "--install", "-s", "/bin"], check=True)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n"
                "%s:x:%d:%d:Dev User:%s:/bin/sh\n" % (USER, UID, UID, HOME))
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\n%s:x:%d:\n" % (USER, UID))
    home = root + HOME
    os.makedirs(home)
    os.chown(home, UID, UID)
    os.chmod(home, 0o755)
    devices = [("null", 1, 3), ("zero", 1, 5), ("tty", 5, 0)]
    if random_devices:
        devices += [("random", 1, 8), ("urandom", 1, 9)]
    for name, major, minor in devices:
        path = os.path.join(root, "dev", name)
        os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(path, 0o666)
    os.symlink("pts/ptmx", os.path.join(root, "dev/ptmx"))


def in_root_argv(root, argv, env, as_root=False):
    """The command that runs argv in root as a container runtime would: in a PID namespace of
    its own (everything in it ends with it), with its own /proc and /dev/pts, an environment
    of PATH and env alone, as USER unless as_root."""
    user = "" if as_root else "--userspec=%d:%d --groups=%d" % (UID, UID, UID)
    script = ('r=$1 && shift && mount -t proc proc "$r/proc" && '
              'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts" && '
              'exec env -i PATH=/usr/local/bin:/bin %s /usr/sbin/chroot %s "$r" "$@"'
              % (" ".join("%s=%s" % kv for kv in sorted(env.items())), user))
    return (["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child", "--", "/bin/sh", "-c", script, "sh", root] + list(argv))


def put_token(root, tokens, workspace=WORKSPACES[0]):
    token = root + TOKEN_IN_ROOT
    shutil.copy2(str(tokens.agent_file(workspace)), token)
    os.chown(token, UID, UID)
    os.chmod(token, 0o600)


def copy_in(static_bin):
    """An installer for ChrootSshEnv: what packaging/docker/Dockerfile.fragment does, the
    binary copied to /usr/local/bin and ENTRYPOINT ["/usr/local/bin/tether", "agent"]."""
    def install(root, relay_url):
        os.makedirs(os.path.join(root, "usr/local/bin"))
        shutil.copy2(static_bin, os.path.join(root, "usr/local/bin/tether"))
        return ["/usr/local/bin/tether", "agent"]
    return install


class ChrootSshEnv(SshEnv):
    """SshEnv whose agent is tether in an empty root (make_root). install(root) puts tether
    into the root and returns the command that starts the agent there, as a container
    runtime would: an exec-form entrypoint, configured by TETHER_URL and TETHER_TOKEN_FILE
    and nothing else in the environment (no HOME, USER or SHELL: the agent finds them in
    /etc/passwd). It runs as USER unless as_root (then the entrypoint switches users).
    The whole process tree lives in its own PID namespace: it ends with the test."""

    def __init__(self, harness, tmp, install, as_root=False, configure_by_env=True,
                 random_devices=True):
        self.root = str(tmp / "root")
        make_root(self.root, random_devices)
        self.install = install
        self.entrypoint = None
        self.as_root = as_root
        self.configure_by_env = configure_by_env
        super().__init__(harness, tmp, isolate=False)

    def agent_args(self, state_dir=None, extra=()):
        if not os.path.exists(self.root + TOKEN_IN_ROOT):
            put_token(self.root, self.tokens, self.workspace)
        if self.entrypoint is None:  # the relay exists now: installers may need its URL
            self.entrypoint = self.install(self.root, self.relay.url)
        config = {"TETHER_URL": self.relay.url, "TETHER_TOKEN_FILE": TOKEN_IN_ROOT}
        return in_root_argv(self.root, self.entrypoint + [str(a) for a in extra],
                            config if self.configure_by_env else {}, self.as_root)


@pytest.fixture
def chroot_env(static_bin, harness, tmp_path):
    needs_root_and_namespaces()
    return ChrootSshEnv(harness, tmp_path / "static", copy_in(static_bin))


def test_binary_is_static_stripped_small_and_names_its_libraries(static_bin):
    desc = subprocess.run(["file", "-b", static_bin], capture_output=True, text=True).stdout
    assert "statically linked" in desc and "stripped" in desc and "not stripped" not in desc, desc
    size = os.path.getsize(static_bin)
    assert size <= MAX_SIZE, "%d bytes, more than %d" % (size, MAX_SIZE)
    r = subprocess.run([static_bin, "version"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stderr == "", r
    for lib in (r"libuv 1\.\d+", r"libwebsockets 4\.\d+", r"libssh 0\.\d+\.\d+/mbedtls/zlib",
                r"mbed TLS 2\.\d+", r"jansson 2\.\d+", r"zlib 1\.\d+",
                r"musl 1\.\d+\.\d+, statically linked"):
        assert re.search(lib, r.stdout), "%r not in: %s" % (lib, r.stdout)


def test_ssh_session_and_sftp_in_an_empty_root(chroot_env):
    env = chroot_env
    r = env.ssh("id -un; id -u; echo \"home=$HOME shell=$SHELL user=$USER\"; pwd; "
                "ls /; exit 3")
    out = r.stdout.decode()
    assert r.returncode == 3, (r, env.agent_log())
    lines = out.split("\n")
    assert lines[0] == USER and lines[1] == str(UID), out
    assert "home=%s shell=/bin/sh user=%s" % (HOME, USER) in out, out
    assert lines[3] == HOME, out
    assert set(lines[4:]) >= {"bin", "dev", "etc", "home", "proc", "tmp", "usr"}, out
    # The host key went to the default state directory, found from the passwd entry.
    key_dir = env.root + HOME + "/.local/state/tether"
    assert os.path.isdir(key_dir) and os.listdir(key_dir), env.agent_log()

    # A terminal over SSH: a PTY from the chroot's own devpts.
    r = env.ssh("tty; stty size", tty=True, opts=("RequestTTY=force",))
    assert r.returncode == 0 and re.match(rb"/dev/pts/\d+\r\n", r.stdout), r

    # Files both ways with scp (SFTP underneath, served by the agent itself: the image has
    # no sftp-server), byte for byte.
    data = os.urandom(1 << 20)
    src = env.tmp / "up.bin"
    src.write_bytes(data)
    scp = ["scp", "-q", "-F", str(env.config)]
    subprocess.run(scp + [str(src), "%s:up.bin" % env.host], check=True, timeout=60,
                   stdin=subprocess.DEVNULL)
    with open(env.root + HOME + "/up.bin", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert os.stat(env.root + HOME + "/up.bin").st_uid == UID
    back = env.tmp / "back.bin"
    subprocess.run(scp + ["%s:up.bin" % env.host, str(back)], check=True, timeout=60,
                   stdin=subprocess.DEVNULL)
    assert back.read_bytes() == data


def test_reconnecting_pty_in_an_empty_root(chroot_env, tether_bin, tokens):
    env = chroot_env
    child = pexpect.spawn(str(tether_bin), ["attach", "--url", env.relay.url, "--token-file",
                                            str(tokens.user_file()), WORKSPACES[0]],
                          dimensions=(30, 100), timeout=20,
                          env={"PATH": os.environ["PATH"], "TERM": "xterm"})
    try:
        child.expect(rb"attached to ([0-9a-f-]{36})")
        child.send(b"echo sum-$((40+2)) $(id -un) $HOME; tty; stty size; echo '<<'1'>>'\r")
        child.expect(b"<<1>>")
        out = child.before
        assert b"sum-42 %s %s" % (USER.encode(), HOME.encode()) in out, out
        assert re.search(rb"/dev/pts/\d+", out) and b"30 100" in out, out
        child.send(b"exit 5\r")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 5, child.before
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_deb_installs_into_a_root_and_runs(static_bin, harness, tmp_path):
    """packaging/deb/build.sh's package, installed by dpkg into an empty root, serves SSH."""
    needs_root_and_namespaces()
    r = subprocess.run([os.path.join(REPO, "packaging/deb/build.sh"), static_bin,
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r
    deb = r.stdout.strip().split("\n")[-1]
    version = subprocess.run([static_bin, "version"], capture_output=True,
                             text=True).stdout.split("\n")[0].split()[1]
    assert os.path.basename(deb) == "tether_%s_amd64.deb" % version, deb
    info = subprocess.run(["dpkg-deb", "--field", deb, "Package", "Version", "Depends"],
                          capture_output=True, text=True, check=True).stdout
    assert "Package: tether" in info and "Version: %s" % version in info, info
    assert "Depends" not in info, "a static binary depends on nothing: " + info

    def install(root, relay_url):
        admin = os.path.join(root, "var/lib/dpkg")
        for d in ("info", "updates"):
            os.makedirs(os.path.join(admin, d))
        open(os.path.join(admin, "status"), "w").close()
        r = subprocess.run(["dpkg", "--root", root, "-i", deb], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r
        with open(os.path.join(admin, "status")) as f:
            assert "Package: tether\nStatus: install ok installed" in f.read()
        unit = os.path.join(root, "lib/systemd/system/tether-agent.service")
        with open(unit) as f:
            assert "ExecStart=/usr/bin/tether agent" in f.read()
        return ["/usr/bin/tether", "agent"]

    env = ChrootSshEnv(harness, tmp_path / "deb", install)
    r = env.ssh("echo from-$(id -un)")
    assert r.returncode == 0 and r.stdout == b"from-%s\n" % USER.encode(), (r, env.agent_log())


def test_release_ships_binary_deb_and_sums_of_one_version(static_bin, tmp_path):
    """packaging/release.sh: the version comes from meson.build alone, and SHA256SUMS
    checks every file it ships."""
    with open(os.path.join(REPO, "meson.build")) as f:
        version = re.search(r"^  version : '([^']+)',$", f.read(), re.M).group(1)
    out = tmp_path / "dist"
    # The binary under test, not a build of it: the static build's cache is not touched.
    env = dict(os.environ, TETHER_RELEASE_BINARY=static_bin)
    r = subprocess.run([os.path.join(REPO, "packaging/release.sh"), str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r
    assert r.stdout.strip().split("\n")[-1] == str(out)
    shipped = sorted(os.listdir(out))
    assert shipped == sorted(["SHA256SUMS", "tether-%s-linux-x86_64" % version,
                              "tether_%s_amd64.deb" % version]), shipped
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=str(out),
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 2, check
    binary = out / ("tether-%s-linux-x86_64" % version)
    first = subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout
    assert first.split("\n")[0] == "tether " + version



def test_static_build_refuses_a_source_that_does_not_match_its_pin(tmp_path):
    """A tampered (or truncated) download stops the build, names the file and is deleted."""
    src = tmp_path / "src"
    src.mkdir()
    bad = src / "zlib_1.2.13.dfsg.orig.tar.bz2"
    bad.write_bytes(b"not zlib")
    r = subprocess.run([os.path.join(REPO, "packaging/static/build.sh")], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, TETHER_STATIC_DIR=str(tmp_path)))
    assert r.returncode == 1, r
    assert "zlib_1.2.13.dfsg.orig.tar.bz2 (from " in r.stderr, r.stderr
    assert "does not match its pinned sha256" in r.stderr, r.stderr
    assert not bad.exists() and r.stdout == "", r


def test_static_build_says_which_source_it_could_not_fetch(tmp_path):
    r = subprocess.run([os.path.join(REPO, "packaging/static/build.sh")], capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, TETHER_STATIC_DIR=str(tmp_path),
                                TETHER_DEBIAN_MIRROR="http://127.0.0.1:9"))
    assert r.returncode == 1, r
    assert ("could not fetch http://127.0.0.1:9/debian/pool/main/z/zlib/"
            "zlib_1.2.13.dfsg.orig.tar.bz2") in r.stderr, r.stderr
    assert not any(p.name.endswith(".part") or p.is_file() for p in (tmp_path / "src").iterdir())


def test_deb_refuses_a_dynamically_linked_binary(tether_bin, tmp_path):
    r = subprocess.run([os.path.join(REPO, "packaging/deb/build.sh"), str(tether_bin),
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a statically linked x86-64 binary" in r.stderr, r
    assert os.listdir(str(tmp_path)) == []


def test_devcontainer_feature_installs_and_starts_the_agent_in_an_empty_root(
        static_bin, harness, tmp_path):
    """packaging/devcontainer-feature: install.sh run in the image as root (busybox sh), the
    Feature's entrypoint at container start as root, which starts the agent as the remote
    user (busybox su) and execs the container's command."""
    needs_root_and_namespaces()
    feature = os.path.join(REPO, "packaging/devcontainer-feature/tether")

    def install(root, relay_url):
        work = os.path.join(root, "tmp/feature")
        shutil.copytree(feature, work)
        shutil.copy2(static_bin, os.path.join(work, "tether"))
        r = subprocess.run(
            ["env", "-i", "PATH=/usr/local/bin:/bin", "URL=" + relay_url,
             "TOKENFILE=" + TOKEN_IN_ROOT, "_REMOTE_USER=" + USER,
             "/usr/sbin/chroot", root, "/bin/sh", "-c", "cd /tmp/feature && ./install.sh"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r
        assert os.stat(os.path.join(root, "usr/local/bin/tether")).st_mode & 0o777 == 0o755
        return ["/usr/local/share/tether/entrypoint.sh", "sleep", "600"]

    # The URL and the token file come from the Feature's options alone.
    env = ChrootSshEnv(harness, tmp_path / "feature", install, as_root=True,
                       configure_by_env=False)
    r = env.ssh("id -un; echo $HOME")
    assert r.returncode == 0 and r.stdout == ("%s\n%s\n" % (USER, HOME)).encode(), (
        r, env.agent_log())


def test_wss_to_an_openssl_relay_trusting_the_images_ca_bundle(static_bin, harness, tmp_path,
                                                                 servers, tls_relay, pki):
    """The static agent (mbedTLS) dials a relay that serves TLS with OpenSSL, and verifies its
    certificate against the image's /etc/ssl/certs/ca-certificates.crt, the default where no
    --ca-file is given; a forward then carries bytes through it intact."""
    needs_root_and_namespaces()
    _, port = tls_relay
    url = "wss://localhost:%d" % port

    def agent_trusting(ca, name):
        root = str(tmp_path / name)
        make_root(root)
        copy_in(static_bin)(root, url)
        os.makedirs(os.path.join(root, "etc/ssl/certs"))
        shutil.copy2(str(pki / ca), os.path.join(root, "etc/ssl/certs/ca-certificates.crt"))
        with open(os.path.join(root, "etc/hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n")
        put_token(root, harness.tokens)
        return harness.procs.start("agent-" + name, in_root_argv(
            root, ["/usr/local/bin/tether", "agent"],
            {"TETHER_URL": url, "TETHER_TOKEN_FILE": TOKEN_IN_ROOT}))

    # A bundle without the relay's CA: the bundle is really what decides.
    wrong = agent_trusting("other.pem", "root-other-ca")
    wait_until(lambda: "TLS handshake with the relay failed" in wrong.stderr(),
               what="the agent trusting another CA to refuse the relay")
    wrong.kill()
    agent = agent_trusting("ca.pem", "root")

    def connected():
        assert agent.alive(), agent.describe()
        r = harness.run("status", "--url", url, "--ca-file", pki / "ca.pem", "--token-file",
                        harness.tokens.user_file(), WORKSPACES[0])
        return r.returncode == 0 and json.loads(r.stdout)["connected"] is True
    wait_until(connected, timeout=20, what="the static agent to connect over wss")
    echo = servers.echo()
    fwd = harness.forward(None, WORKSPACES[0], echo.port, url=url,
                          extra=["--ca-file", pki / "ca.pem"])
    echo_roundtrip(fwd.port, nbytes=2 * 1024 * 1024)


def test_a_root_without_dev_urandom_is_refused_with_the_reason(static_bin, tmp_path, relay):
    """libwebsockets needs /dev/urandom (and crashes in its cleanup without it): the agent
    checks first and says what is missing."""
    needs_root_and_namespaces()
    root = str(tmp_path / "root")
    make_root(root, random_devices=False)
    copy_in(static_bin)(root, relay.url)
    put_token(root, relay.tokens)
    r = subprocess.run(in_root_argv(root, ["/usr/local/bin/tether", "agent", "--url", relay.url,
                                           "--token-file", TOKEN_IN_ROOT], {}),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r
    assert "cannot read /dev/urandom (No such file or directory)" in r.stderr, r.stderr


def test_release_refuses_a_binary_of_another_version(tmp_path):
    """The version has one source: a binary that says otherwise is not shipped."""
    fake = tmp_path / "tether"
    fake.write_text("#!/bin/sh\necho 'tether 9.9.9'\n")
    fake.chmod(0o755)
    out = tmp_path / "dist"
    r = subprocess.run([os.path.join(REPO, "packaging/release.sh"), str(out)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TETHER_RELEASE_BINARY=str(fake)))
    assert r.returncode == 1 and "says version '9.9.9', meson.build says" in r.stderr, r
    assert not out.exists() or os.listdir(str(out)) == []
