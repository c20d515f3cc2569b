"""tether sftp-server: the built-in SFTP v3 server, driven by real clients with no ssh.

OpenSSH's sftp and scp run it through -D (a local server program on a pipe); paramiko's
SFTPClient speaks to it over a socketpair. Where OpenSSH's own sftp-server is installed, the
same batch runs against both and the outputs and resulting trees must match. Raw-socket
tests break the protocol on purpose and check that memory stays bounded when the client
stops reading. Everything runs in tmp directories.
"""
import contextlib
import hashlib
import os
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import paramiko
import pytest

from conftest import proc_rss_kib

OPENSSH_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
NOBODY = 65534


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_batch(server_cmd, batch, cwd, timeout=120, client="sftp"):
    """Runs `sftp -D server_cmd -b batchfile` in cwd; returns the CompletedProcess."""
    batchfile = Path(cwd) / ".batch"
    batchfile.write_text("".join(line + "\n" for line in batch))
    return subprocess.run([client, "-D", server_cmd, "-b", str(batchfile)], cwd=str(cwd),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def tether_cmd(tether_bin, home):
    return "%s sftp-server --home %s" % (tether_bin, home)


class NamedSocket(socket.socket):
    """A socket paramiko's SFTPClient accepts as its channel (it logs the name)."""

    def get_name(self):
        return "sftp"

    def recv_ready(self):
        return bool(select.select([self], [], [], 0)[0])


class Server:
    """`tether sftp-server` on one end of a socketpair; the test holds the other end."""

    def __init__(self, argv, cwd=None, env=None):
        mine, child = socket.socketpair()
        self.sock = NamedSocket(mine.family, mine.type, fileno=mine.detach())
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=self.stderr,
                                     cwd=cwd, env=env, start_new_session=True)
        child.close()

    def sftp(self):
        return paramiko.SFTPClient(self.sock)

    def wait(self, timeout=20):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("sftp-server did not exit within %ds" % timeout)

    def errors(self):
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


@pytest.fixture
def servers():
    """Starts servers; kills whatever is left at the end of the test."""
    started = []

    def start(argv, **kw):
        s = Server([str(a) for a in argv], **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        try:
            s.sock.close()
        except OSError:
            pass
        s.kill()


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


@contextlib.contextmanager
def paramiko_session(servers, tether_bin, home, extra=()):
    """A paramiko SFTPClient on a fresh server; on exit, the server must exit 0."""
    srv = servers([tether_bin, "sftp-server", "--home", home, *extra])
    client = srv.sftp()
    try:
        yield client
    finally:
        client.close()
    assert srv.wait() == 0, srv.errors()
    assert srv.errors() == ""


# ---------------------------------------------------------------------------------------
# raw protocol helpers (for what clients never send)


def pkt(ptype, rid, body=b""):
    payload = struct.pack(">BI", ptype, rid) + body
    return struct.pack(">I", len(payload)) + payload


def sstr(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def recv_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def recv_packet(sock):
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    body = recv_exact(sock, length)
    return body[0], body[1:]


INIT = struct.pack(">IBI", 5, 1, 3)


def raw_init(sock):
    sock.sendall(INIT)
    ptype, body = recv_packet(sock)
    assert ptype == 2 and struct.unpack(">I", body[:4])[0] == 3
    return body


# ---------------------------------------------------------------------------------------
# the command itself


def test_help_and_usage_errors(tether_bin):
    r = subprocess.run([str(tether_bin), "sftp-server", "--help"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: tether sftp-server")
    r = subprocess.run([str(tether_bin), "--help"], capture_output=True, text=True, timeout=10)
    assert "sftp-server" in r.stdout
    for args in (["--bogus"], ["extra"], ["--home", "relative/dir"]):
        r = subprocess.run([str(tether_bin), "sftp-server", *args], capture_output=True,
                           text=True, timeout=10, stdin=subprocess.DEVNULL)
        assert r.returncode == 2, args
        assert r.stderr.startswith("tether: ") and r.stderr.count("\n") == 1, r.stderr


def test_home_comes_from_environment(servers, tether_bin, tmp_path):
    home = tmp_path / "envhome"
    home.mkdir()
    srv = servers([tether_bin, "sftp-server"], env=dict(os.environ, HOME=str(home)))
    client = srv.sftp()
    assert client.normalize(".") == str(home.resolve())
    client.close()
    assert srv.wait() == 0


# ---------------------------------------------------------------------------------------
# OpenSSH's clients


def test_sftp_put_get_64mib(tether_bin, home, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    data = os.urandom(64 << 20)
    (local / "big").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    del data
    t0 = time.monotonic()
    r = run_batch(tether_cmd(tether_bin, home), ["put big remote.bin"], local)
    t1 = time.monotonic()
    assert r.returncode == 0, r.stderr
    r = run_batch(tether_cmd(tether_bin, home), ["get remote.bin back.bin"], local)
    t2 = time.monotonic()
    assert r.returncode == 0, r.stderr
    assert sha256_file(home / "remote.bin") == want
    assert sha256_file(local / "back.bin") == want
    print("\nsftp -D: put %.0f MiB/s, get %.0f MiB/s" % (64 / (t1 - t0), 64 / (t2 - t1)))


def test_scp_direct(tether_bin, home, tmp_path):
    """scp -D takes a program without arguments and passes it "-- HOST sftp"."""
    wrapper = tmp_path / "sftp-server"
    wrapper.write_text('#!/bin/sh\nexec %s sftp-server --home %s "$@"\n' % (tether_bin, home))
    wrapper.chmod(0o755)
    local = tmp_path / "local"
    (local / "tree" / "sub").mkdir(parents=True)
    (local / "tree" / "a.bin").write_bytes(os.urandom(3 << 20))
    (local / "tree" / "sub" / "b.txt").write_text("hello\n")
    (local / "tree" / "a.bin").chmod(0o640)

    def scp(*args):
        r = subprocess.run(["scp", "-D", str(wrapper), *args], cwd=str(local),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    scp("-p", "-r", "tree", "ws:up")
    scp("-r", "ws:up", "down")
    for rel in ("a.bin", "sub/b.txt"):
        assert sha256_file(local / "tree" / rel) == sha256_file(home / "up" / rel)
        assert sha256_file(local / "tree" / rel) == sha256_file(local / "down" / rel)
    assert stat.S_IMODE((home / "up" / "a.bin").stat().st_mode) == 0o640  # -p: modes
    assert int((home / "up" / "a.bin").stat().st_mtime) == int(
        (local / "tree" / "a.bin").stat().st_mtime)


def test_sftp_listing_of_many_entries(tether_bin, home, tmp_path):
    big = home / "many"
    big.mkdir()
    names = {"file-%04d%s" % (i, " with space" if i % 50 == 0 else "") for i in range(250)}
    for n in names:
        (big / n).write_bytes(b"x" * (len(n) % 7))
    (big / "subdir").mkdir()
    names.add("subdir")
    r = run_batch(tether_cmd(tether_bin, home), ["ls -1a many", "ls -l many"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i_long = lines.index("sftp> ls -l many")
    short = {os.path.basename(x.strip()) for x in lines[1:i_long]}
    assert short == names | {".", ".."}
    long_lines = lines[i_long + 1:]
    assert len(long_lines) == len(names)
    # `ls -l` prints the server's longnames: ls -l style, names last
    pat = re.compile(r"^[-d]rw[-x]r[-w][-x]r[-w][-x] +\d+ +\S+ +\S+ +\d+ \w{3} [ \d]\d +[\d:]{4,5} (.+)$")
    for line in long_lines:
        m = pat.match(line)
        assert m, line
        assert os.path.basename(m.group(1)) in names


def test_sftp_batch_operations(tether_bin, home, tmp_path):
    (home / "a.txt").write_text("alpha\n")
    (home / "d").mkdir()
    local = tmp_path / "local"
    local.mkdir()
    (local / "up.txt").write_text("uploaded\n")
    batch = [
        "mkdir newdir", "rmdir newdir", "mkdir keep",
        "rename a.txt b.txt",            # posix-rename@openssh.com
        "ln -s b.txt sym",               # SYMLINK, OpenSSH's argument order
        "ln b.txt hard",                 # hardlink@openssh.com
        "chmod 600 b.txt",
        "put -f up.txt d/up.txt",        # fsync@openssh.com
        "rm hard",
        "df", "df -i",                   # statvfs@openssh.com
        "pwd",
    ]
    r = run_batch(tether_cmd(tether_bin, home), batch, local)
    assert r.returncode == 0, r.stderr
    assert not (home / "newdir").exists() and (home / "keep").is_dir()
    assert not (home / "a.txt").exists() and (home / "b.txt").read_text() == "alpha\n"
    assert os.readlink(home / "sym") == "b.txt"  # relative target kept as given
    assert not (home / "hard").exists()
    assert stat.S_IMODE((home / "b.txt").stat().st_mode) == 0o600
    assert (home / "d" / "up.txt").read_text() == "uploaded\n"
    assert "Remote working directory: %s" % home.resolve() in r.stdout
    # df reports the filesystem holding home, in KiB
    out = r.stdout.splitlines()
    row = out[out.index("sftp> df") + 2].split()
    st = os.statvfs(home)
    assert int(row[0]) == st.f_frsize * st.f_blocks // 1024
    assert abs(int(row[2]) - st.f_frsize * st.f_bavail // 1024) < 1 << 20  # others write too
    row = out[out.index("sftp> df -i") + 2].split()
    assert int(row[0]) == st.f_files


@pytest.mark.skipif(not os.access(OPENSSH_SFTP_SERVER, os.X_OK), reason="no OpenSSH sftp-server")
def test_same_results_as_openssh_sftp_server(tether_bin, tmp_path):
    """One batch, errors included ('-' lets the batch go on), against both servers."""
    batch = [
        "pwd", "ls -1a", "cd d", "ls -1", "cd ..",
        "-get nothere", "-cd nodir", "-ls nodir", "-rm nothere", "-rmdir d",
        "-mkdir d", "-rename d/f1 d/f2", "-rename nothere x", "-chmod 644 nothere",
        "-ln -s f1 d/f2", "-ln d/f1 d/f2", "-get d", "-put nolocal x",
        "rename d/f1 d/f3", "ln -s ../d/f3 d/link", "ln d/f3 d/hard", "chmod 751 d/f3",
        "mkdir e", "rename e d/e2", "rmdir d/e2", "put local.txt d/put.txt",
        "get d/f3 got.txt", "-get d/link got-link.txt", "ls -1a d", "rm d/hard",
    ]
    outputs, trees = [], []
    for name, cmd in (("tether", None), ("openssh", None)):
        root = tmp_path / name
        (root / "home" / "d").mkdir(parents=True)
        (root / "home" / "d" / "f1").write_text("one\n")
        (root / "home" / "d" / "f2").write_text("two\n")
        (root / "local").mkdir()
        (root / "local" / "local.txt").write_text("local\n")
        home = root / "home"
        cmd = (tether_cmd(tether_bin, home) if name == "tether"
               else "%s -d %s" % (OPENSSH_SFTP_SERVER, home))
        r = run_batch(cmd, batch, root / "local")
        norm = lambda s: s.replace(str(root), "ROOT")  # noqa: E731
        outputs.append((r.returncode, norm(r.stdout), norm(r.stderr)))
        tree = []
        for base in (home, root / "local"):
            for p in sorted(base.rglob("*")):
                st = p.lstat()
                tree.append((str(p.relative_to(root)), stat.S_IFMT(st.st_mode),
                             stat.S_IMODE(st.st_mode), st.st_nlink,
                             os.readlink(p) if p.is_symlink() else
                             p.read_bytes() if p.is_file() else None))
        trees.append(tree)
    assert outputs[0] == outputs[1]
    assert trees[0] == trees[1]


# ---------------------------------------------------------------------------------------
# paramiko


def test_paramiko_file_operations(servers, tether_bin, home):
    with paramiko_session(servers, tether_bin, home) as c:
        real_home = str(home.resolve())
        # REALPATH: "." is home; a missing last component is fine; a missing parent is not
        assert c.normalize(".") == real_home
        assert c.normalize("") == real_home
        assert c.normalize("not-yet") == real_home + "/not-yet"
        assert c.normalize("./not-yet/") == real_home + "/not-yet"
        assert c.normalize("/") == "/"
        assert c.normalize(real_home + "/./.") == real_home
        with pytest.raises(FileNotFoundError):
            c.normalize("no-dir/file")

        with c.open("f.txt", "w") as f:
            f.write(b"0123456789")
        assert (home / "f.txt").read_bytes() == b"0123456789"
        # writes and reads at explicit offsets; EOF past the end
        with c.open("f.txt", "r+") as f:
            f.seek(20)
            f.write(b"XY")
            f.seek(2)
            assert f.read(3) == b"234"
            f.seek(22)
            assert f.read(10) == b""
            assert f.stat().st_size == 22  # FSTAT
            f.chmod(0o640)  # FSETSTAT
            f.truncate(5)
        assert (home / "f.txt").read_bytes() == b"01234"
        assert stat.S_IMODE((home / "f.txt").stat().st_mode) == 0o640
        # APPEND writes go to the end; EXCL refuses an existing file
        with c.open("f.txt", "a") as f:
            f.write(b"+more")
        assert (home / "f.txt").read_bytes() == b"01234+more"
        with pytest.raises(IOError):
            c.open("f.txt", "x")

        # SETSTAT: permissions, times, size, owner
        c.chmod("f.txt", 0o604)
        assert stat.S_IMODE((home / "f.txt").stat().st_mode) == 0o604
        c.truncate("f.txt", 3)
        assert (home / "f.txt").read_bytes() == b"012"
        c.utime("f.txt", (1000000000, 1200000000))
        st = (home / "f.txt").stat()
        assert (st.st_atime, st.st_mtime) == (1000000000, 1200000000)
        if os.geteuid() == 0:
            c.chown("f.txt", NOBODY, NOBODY)
            assert (home / "f.txt").stat().st_uid == NOBODY
        a = c.stat("f.txt")
        assert (a.st_size, a.st_mtime, stat.S_IMODE(a.st_mode)) == (3, 1200000000, 0o604)

        # directories
        c.mkdir("dir", 0o750)
        assert stat.S_IMODE((home / "dir").stat().st_mode) == 0o750 & ~current_umask()
        c.mkdir("dir/sub")
        with pytest.raises(IOError):
            c.rmdir("dir")  # not empty
        with pytest.raises(IOError):
            c.mkdir("dir")  # exists
        c.rmdir("dir/sub")

        # symlinks: paramiko sends OpenSSH's order (target, then link)
        c.symlink("f.txt", "link")
        assert os.readlink(home / "link") == "f.txt"
        assert c.readlink("link") == "f.txt"
        assert stat.S_ISLNK(c.lstat("link").st_mode)
        assert stat.S_ISREG(c.stat("link").st_mode)

        # RENAME fails onto an existing name (version 3); posix-rename replaces it
        (home / "other").write_text("other")
        with pytest.raises(IOError):
            c.rename("f.txt", "other")
        assert (home / "other").read_text() == "other" and (home / "f.txt").exists()
        with pytest.raises(IOError):
            c.rename("dir", "other")  # not a regular file: the lstat-then-rename path
        c.rename("f.txt", "g.txt")
        assert (home / "g.txt").read_bytes() == b"012" and not (home / "f.txt").exists()
        c.rename("dir", "dir2")
        assert (home / "dir2").is_dir()
        c.posix_rename("g.txt", "other")
        assert (home / "other").read_bytes() == b"012" and not (home / "g.txt").exists()

        c.remove("other")
        assert not (home / "other").exists()
        with pytest.raises(FileNotFoundError):
            c.remove("other")
        with pytest.raises(FileNotFoundError):
            c.stat("nothing")
        with pytest.raises(FileNotFoundError):
            c.open("nothing")
        with pytest.raises(IOError):
            c.open("dir2", "r").read(10)  # a directory opened as a file
        with pytest.raises(IOError):
            c.listdir("link")  # not a directory

        # absolute paths work too
        assert c.stat(str(home / "dir2")).st_mode & stat.S_IFDIR


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_paramiko_readdir_attrs_and_longnames(servers, tether_bin, home):
    for i in range(230):
        (home / ("n%03d" % i)).write_bytes(b"z" * i)
    with paramiko_session(servers, tether_bin, home) as c:
        entries = c.listdir_attr(".")
        assert sorted(e.filename for e in entries) == ["n%03d" % i for i in range(230)]
        for e in entries:
            i = int(e.filename[1:])
            assert e.st_size == i
            assert e.longname.startswith("-rw-")
            assert e.longname.endswith(" " + e.filename)
            assert re.search(r" %d \w{3} " % i, e.longname), e.longname


def test_paramiko_pipelined_transfers(servers, tether_bin, home, tmp_path):
    """paramiko keeps many WRITEs (pipelined) and READs (prefetch) in flight."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(24 << 20))
    with paramiko_session(servers, tether_bin, home) as c:
        c.put(str(src), "up.bin")  # pipelined writes, then CLOSE while acks are pending
        assert sha256_file(home / "up.bin") == sha256_file(src)
        c.get("up.bin", str(tmp_path / "down.bin"))  # prefetch: every READ sent at once
        assert sha256_file(tmp_path / "down.bin") == sha256_file(src)
        # out-of-order writes at explicit offsets, then a read of the whole
        with c.open("sparse", "w") as f:
            f.set_pipelined(True)
            for off in (65536 * 3, 0, 65536 * 7, 65536):
                f.seek(off)
                f.write(bytes([off // 65536 + 1]) * 65536)
        data = (home / "sparse").read_bytes()
        assert len(data) == 8 * 65536
        for k in range(8):
            chunk = data[k * 65536:(k + 1) * 65536]
            assert chunk == (bytes([k + 1]) * 65536 if k in (0, 1, 3, 7) else bytes(65536))


@pytest.fixture
def nobody_tree():
    """A world-readable directory with the binary and a home owned by nobody (root only)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    base = Path(tempfile.mkdtemp(prefix="tether-sftp-nobody-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(str(base), ignore_errors=True)


def test_permission_denied(servers, tether_bin, nobody_tree, tmp_path):
    binary = nobody_tree / "tbin"
    shutil.copy2(str(tether_bin), str(binary))
    binary.chmod(0o755)
    home = nobody_tree / "home"
    home.mkdir()
    os.chown(str(home), NOBODY, NOBODY)
    (home / "secret").write_text("root only\n")
    (home / "secret").chmod(0o600)
    (home / "locked").mkdir()
    (home / "locked").chmod(0o755)
    (home / "locked" / "file").write_text("root's\n")
    cmd = "setpriv --reuid=%d --regid=%d --clear-groups %s sftp-server --home %s" % (
        NOBODY, NOBODY, binary, home)

    r = run_batch(cmd, ["-get secret", "-put up.txt locked/up.txt", "-mkdir locked/x",
                        "-chmod 777 secret", "-rm locked/file", "put up.txt mine.txt"],
                  _local_with(tmp_path, "up.txt"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Permission denied") == 5, r.stderr
    assert (home / "mine.txt").stat().st_uid == NOBODY

    srv = servers(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
                   binary, "sftp-server", "--home", home])
    c = srv.sftp()
    with pytest.raises(PermissionError):
        c.open("secret")
    with pytest.raises(PermissionError):
        c.open("locked/new", "w")
    with pytest.raises(PermissionError):
        c.rename("secret", "locked/secret")
    c.close()
    assert srv.wait() == 0


def _local_with(tmp_path, name):
    local = tmp_path / "local"
    local.mkdir(exist_ok=True)
    (local / name).write_text("data\n")
    local.chmod(0o755)
    return local


# ---------------------------------------------------------------------------------------
# hostile and stalled clients


@pytest.mark.parametrize("bad", [
    pytest.param(struct.pack(">IB", 256 * 1024 + 1025, 6), id="oversized"),
    pytest.param(struct.pack(">I", 3) + b"\x11\x00\x00", id="shorter-than-a-header"),
    pytest.param(pkt(17, 1, struct.pack(">I", 100) + b"abc"), id="string-overruns"),
    pytest.param(pkt(3, 1, sstr("f") + struct.pack(">I", 1)), id="attrs-missing"),
    pytest.param(pkt(9, 1, sstr("f") + struct.pack(">II", 0x80000000, 5)), id="ext-count-lie"),
    pytest.param(INIT, id="second-init"),
])
def test_malformed_packet_ends_session(servers, tether_bin, home, bad):
    srv = servers([tether_bin, "sftp-server", "--home", home])
    raw_init(srv.sock)
    srv.sock.sendall(pkt(16, 7, sstr(".")))  # a good request first: answered
    ptype, body = recv_packet(srv.sock)
    assert ptype == 104 and struct.unpack(">I", body[:4])[0] == 7
    srv.sock.sendall(bad)
    assert srv.wait() == 1
    assert "protocol" in srv.errors()
    srv.sock.settimeout(5)
    assert srv.sock.recv(100) == b""  # closed, nothing half-sent


def test_request_before_init_ends_session(servers, tether_bin, home):
    srv = servers([tether_bin, "sftp-server", "--home", home])
    srv.sock.sendall(pkt(17, 1, sstr(".")))
    assert srv.wait() == 1


def test_bad_requests_get_status_replies(servers, tether_bin, home):
    """Unknown types, unknown extensions, bad handles and long paths are answered."""
    srv = servers([tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    version = raw_init(s)
    for ext in (b"posix-rename@openssh.com", b"statvfs@openssh.com", b"limits@openssh.com",
                b"fsync@openssh.com", b"hardlink@openssh.com"):
        assert ext in version
    cases = [
        (pkt(150, 1, b"junk"), 8),                                     # unknown type
        (pkt(200, 2, sstr("nobody@example.com") + b"x"), 8),           # unknown extension
        (pkt(5, 3, sstr(b"\0" * 8) + struct.pack(">QI", 0, 10)), 4),   # bad handle
        (pkt(4, 4, sstr(b"short")), 4),                                 # bad handle length
        (pkt(17, 5, sstr("a" * 5000)), 5),                             # path too long
        (pkt(17, 6, sstr(b"a\0b")), 5),                                # NUL in a path
        (pkt(17, 7, sstr("missing")), 2),                              # no such file
    ]
    for packet, code in cases:
        s.sendall(packet)
        rid = struct.unpack(">I", packet[5:9])[0]
        ptype, body = recv_packet(s)
        assert ptype == 101, (packet, ptype)
        got_id, got_code = struct.unpack(">II", body[:8])
        assert (got_id, got_code) == (rid, code), packet
    # limits@openssh.com: packet, read and write lengths, handles
    s.sendall(pkt(200, 9, sstr("limits@openssh.com")))
    ptype, body = recv_packet(s)
    assert ptype == 201
    rid, maxpkt, maxread, maxwrite, handles = struct.unpack(">IQQQQ", body)
    assert (rid, maxread, maxwrite) == (9, 65536, 65536) and maxpkt >= maxwrite and handles > 0
    # READ lengths are clamped: a short reply, not an error
    (home / "big").write_bytes(b"b" * 300000)
    s.sendall(pkt(3, 10, sstr("big") + struct.pack(">II", 1, 0)))
    ptype, body = recv_packet(s)
    assert ptype == 102
    handle = body[8:8 + struct.unpack(">I", body[4:8])[0]]
    s.sendall(pkt(5, 11, sstr(handle) + struct.pack(">QI", 0, 200000)))
    ptype, body = recv_packet(s)
    assert ptype == 103 and struct.unpack(">I", body[4:8])[0] == 65536
    s.close()
    assert srv.wait() == 0


def test_handle_limit(servers, tether_bin, home):
    (home / "f").write_text("x")
    srv = servers([tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    raw_init(s)
    codes = []
    for i in range(70):
        s.sendall(pkt(3, i, sstr("f") + struct.pack(">II", 1, 0)))
        codes.append(recv_packet(s)[0])
    assert codes.count(102) == 64 and codes[64:] == [101] * 6
    s.close()
    assert srv.wait() == 0


@pytest.mark.plain_build
def test_stalled_reader_keeps_memory_bounded(servers, tether_bin, home):
    """3000 READs of 64 KiB (192 MiB of replies) from a client that does not read yet."""
    (home / "f").write_bytes(os.urandom(1 << 20))
    srv = servers([tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    raw_init(s)
    s.sendall(pkt(3, 1, sstr("f") + struct.pack(">II", 1, 0)))
    ptype, body = recv_packet(s)
    handle = body[8:8 + struct.unpack(">I", body[4:8])[0]]
    base = proc_rss_kib(srv.proc.pid)
    n = 3000
    reads = b"".join(pkt(5, 100 + i, sstr(handle) + struct.pack(">QI", (i % 16) * 65536, 65536))
                     for i in range(n))
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(reads) and time.monotonic() < deadline:
        try:
            sent += s.send(reads[sent:])
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(1.0)
    grown = proc_rss_kib(srv.proc.pid) - base
    assert grown < 24 * 1024, "RSS grew by %d KiB" % grown
    s.setblocking(True)
    s.settimeout(30)
    if sent < len(reads):
        import threading
        t = threading.Thread(target=s.sendall, args=(reads[sent:],), daemon=True)
        t.start()
    seen = []
    for _ in range(n):
        ptype, body = recv_packet(s)
        assert ptype == 103, ptype
        rid, dlen = struct.unpack(">II", body[:8])
        assert dlen == 65536
        seen.append(rid)
    assert seen == list(range(100, 100 + n))  # in request order, though run concurrently
    s.close()
    assert srv.wait() == 0


def test_client_vanishing_mid_download(servers, tether_bin, home):
    """The client disappears with requests in flight: the server exits promptly."""
    (home / "f").write_bytes(os.urandom(4 << 20))
    srv = servers([tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    raw_init(s)
    s.sendall(pkt(3, 1, sstr("f") + struct.pack(">II", 1, 0)))
    ptype, body = recv_packet(s)
    handle = body[8:8 + struct.unpack(">I", body[4:8])[0]]
    s.sendall(b"".join(pkt(5, 10 + i, sstr(handle) + struct.pack(">QI", i * 65536, 65536))
                       for i in range(64)))
    s.close()
    assert srv.wait() in (0, 1)
    assert "busy" not in srv.errors()


@pytest.mark.plain_build
@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind not installed")
def test_valgrind_clean(servers, tether_bin, home, tmp_path):
    """A whole session, and one cut short, under valgrind: no errors, no leaks."""
    vg = ["valgrind", "--leak-check=full", "--error-exitcode=3", "--quiet"]
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 << 20))
    (home / "d").mkdir()
    for i in range(150):
        (home / "d" / ("e%d" % i)).write_text("x")
    srv = servers(vg + [tether_bin, "sftp-server", "--home", home])
    c = srv.sftp()
    c.put(str(src), "up.bin")
    c.get("up.bin", str(tmp_path / "down.bin"))
    assert len(c.listdir("d")) == 150
    c.symlink("up.bin", "l")
    c.rename("up.bin", "up2.bin")
    c.chmod("up2.bin", 0o600)
    c.truncate("up2.bin", 10)
    c.normalize("missing")
    with pytest.raises(IOError):
        c.stat("missing")
    c.close()
    assert srv.wait(timeout=120) == 0, srv.errors()
    assert srv.errors() == ""

    # handles left open when the client leaves are closed by the server
    srv = servers(vg + [tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    raw_init(s)
    s.sendall(pkt(3, 1, sstr("up2.bin") + struct.pack(">II", 1, 0)) + pkt(11, 2, sstr("d")))
    recv_packet(s)
    recv_packet(s)
    s.close()
    assert srv.wait(timeout=120) == 0, srv.errors()
    assert srv.errors() == ""

    srv = servers(vg + [tether_bin, "sftp-server", "--home", home])
    s = srv.sock
    raw_init(s)
    s.sendall(pkt(3, 1, sstr("up2.bin") + struct.pack(">II", 1, 0)) + pkt(11, 2, sstr("d")))
    recv_packet(s)
    recv_packet(s)
    s.sendall(pkt(17, 3, sstr("d")) + pkt(9, 4, struct.pack(">I", 1)))  # then malformed
    assert srv.wait(timeout=120) == 1, srv.errors()
    assert "protocol" in srv.errors() and "==" not in srv.errors()
