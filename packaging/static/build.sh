#!/bin/bash
# packaging/static/build.sh: a fully static x86_64 tether, linked against musl, from pinned
# sources. No runtime dependency at all: the binary runs in any Linux image (Debian, Alpine,
# distroless, an empty chroot).
#
#   packaging/static/build.sh            build (or rebuild what changed); last line: the path
#   TETHER_STATIC_DIR=DIR build.sh       where sources, libraries and the build go
#                                        (default: build-static/ in the repository)
#   TETHER_DEBIAN_MIRROR=URL build.sh    Debian mirror to fetch sources from (default
#                                        https://deb.debian.org; it must carry /debian and
#                                        /debian-security)
#
# Sources are Debian 12's source packages at the newest revisions this script could fetch
# (see `lagging` below for where that is behind bookworm-security, which the dynamic build
# links), fetched from the Debian archive and checked
# against the sha256 sums pinned below before anything reads them; Debian's patches (its
# security fixes among them) are applied. Nothing fetched is committed to the repository.
# When Debian publishes a new revision, the archive drops the old files and this script says
# which file it could not fetch. Take new pins only from the Sources index of Debian's signed
# release files (dists/bookworm/main/source/Sources.xz on /debian and
# dists/bookworm-security/main/source/Sources.xz on /debian-security, checked against
# InRelease with gpgv and debian-archive-keyring); never to silence a mismatch.
#
# The TLS library is mbedTLS: the agent needs TLS only for wss:// and libssh's ciphers, and
# mbedTLS links in a fraction of OpenSSL 3's size (the binary must stay under 4 MiB).
#
# Caching: each library is built once into $dir/deps and rebuilt only when its recipe (source
# sums, patches, flags, compiler, musl, kernel headers) or a library it depends on changes;
# tether itself is an incremental meson build in $dir/build, reconfigured from scratch when
# its own recipe or a library changes, so a rebuild after a code change takes seconds.
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${TETHER_STATIC_DIR:-$root/build-static}
mirror=${TETHER_DEBIAN_MIRROR:-https://deb.debian.org}
jobs=$(nproc 2>/dev/null || echo 2)
# Flags from the caller's environment would reach zlib's configure and meson, unrecorded.
unset CFLAGS CPPFLAGS LDFLAGS CC

# Where a pin lags behind bookworm-security: the security archive's source files answer 404
# from the mirror this was made on (its binary packages install fine), so these revisions
# are the newest whose sources could be fetched and checked. Printed at every build: do not
# ship the static binary to untrusted networks before the pins catch up (a pin may name
# debian-security/pool/updates/... once a mirror serves it).
lagging=(
    "libssh 0.10.6-0+deb12u2: bookworm-security has 0.10.6-0+deb12u3 (CVE-2026-0964 to -0968, -3731, -59843 to -59850; server side: a peer's maximum packet size of 0, DATA on closed channels)"
    "zlib 1:1.2.13.dfsg-1: bookworm-security has 1:1.2.13.dfsg-1+deb12u1"
)

# name  archive/pool-path  upstream-tarball  sha256  debian-tarball  sha256
sources=(
    "zlib debian/pool/main/z/zlib
        zlib_1.2.13.dfsg.orig.tar.bz2 71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1
        zlib_1.2.13.dfsg-1.debian.tar.xz f66cf3d4f2d7defcd4d1fd1fb0a11ee39f1e01b42ec7d059c9dc5c1695133c44"
    "mbedtls debian/pool/main/m/mbedtls
        mbedtls_2.28.3.orig.tar.gz 3b4953aa55a681e084d31892d9904cc5328d6b4958ea57b90ae4b4f94ae69a8d
        mbedtls_2.28.3-1.debian.tar.xz 3e03c61f63c7bbcd0bf695b53e6663ab448cc2e15429cd67d0e4f32e699645a9"
    "libuv debian/pool/main/libu/libuv1
        libuv1_1.44.2.orig.tar.gz d79b4b06ef04be85fb890bf39d55942cc64c2e15fd14eaa32dae5dce94485484
        libuv1_1.44.2-1+deb12u1.debian.tar.xz 14fc605e7d1520137416fd8c097b58a191be9b07bdbb406f7b39c7894b7d66a5"
    "jansson debian/pool/main/j/jansson
        jansson_2.14.orig.tar.gz c739578bf6b764aa0752db9a2fdadcfe921c78f1228c7ec0bb47fa804c55d17b
        jansson_2.14-2.debian.tar.xz e89fe4fd8221f6934ddb50f2e7f8404311928d0e23e49a5599f3d3d14ee8cb88"
    "libssh debian/pool/main/libs/libssh
        libssh_0.10.6.orig.tar.xz 1861d498f5b6f1741b6abc73e608478491edcf9c9d4b6630eef6e74596de9dc1
        libssh_0.10.6-0+deb12u2.debian.tar.xz 42fab6ba35f5338a63f5c593966f4669c41f6192a1262c5575f719ab33cdc1d5"
    "libwebsockets debian/pool/main/libw/libwebsockets
        libwebsockets_4.1.6.orig.tar.gz 402e9a8df553c9cd2aff5d7a9758e9e5285bf3070c82539082864633db3deb83
        libwebsockets_4.1.6-3.debian.tar.xz 8f141b844dcabdcae8ca7bc62b772ad071e73e3c77533cfc62519a8841cf1f5e"
)

say() { echo "== $*" >&2; }
die() {
    echo "build.sh: $*" >&2
    exit 1
}

# --- tools -------------------------------------------------------------------------------
need_tools() {
    local missing=() p
    for p in musl-tools musl-dev cmake make meson ninja-build pkg-config curl patch xz-utils bzip2 \
        file linux-libc-dev; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (install them as root)"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# --- sources -----------------------------------------------------------------------------
# fetch PATH FILE SHA256: $dir/src/FILE, downloaded once and checked every time before use.
fetch() {
    local pool=$1 file=$2 sum=$3 path=$dir/src/$2 url=$mirror/$1/$2
    mkdir -p "$dir/src"
    if [ ! -f "$path" ]; then
        say "fetching $file"
        # Redirects are followed to https only; a stalled mirror fails instead of hanging.
        curl -fsS -L --proto-redir =https --connect-timeout 20 --max-time 600 --retry 3 \
            -o "$path.part" "$url" || { rm -f "$path.part"; die "could not fetch $url"; }
        mv "$path.part" "$path"
    fi
    if ! echo "$sum  $path" | sha256sum -c --quiet >/dev/null 2>&1; then
        rm -f "$path"
        die "$file (from $url) does not match its pinned sha256 $sum; deleted. A changed or" \
            "truncated download: fetch again; do not change the pin unless Debian's signed" \
            "Sources index lists the new sum"
    fi
}

# unpack NAME: sets src to a fresh tree of NAME's upstream source with Debian's patches
# applied, in $dir/work/NAME. (A global, not output: in $(...) a failure could go unnoticed.)
unpack() {
    local name=$1 entry n="" pool up upsum deb debsum work fields
    for entry in "${sources[@]}"; do
        read -r -a fields <<<"${entry//$'\n'/ }"
        n=${fields[0]}
        [ "$n" = "$name" ] && break
    done
    [ "$n" = "$name" ] || die "no source pinned for $name"
    pool=${fields[1]} up=${fields[2]} upsum=${fields[3]} deb=${fields[4]} debsum=${fields[5]}
    fetch "$pool" "$up" "$upsum"
    fetch "$pool" "$deb" "$debsum"
    work=$dir/work/$name
    rm -rf "$work"
    mkdir -p "$work/src"
    tar -xf "$dir/src/$up" -C "$work/src" --strip-components=1 || die "$name: cannot unpack $up"
    tar -xf "$dir/src/$deb" -C "$work/src" || die "$name: cannot unpack $deb"
    [ -f "$work/src/debian/changelog" ] || die "$name: $deb holds no debian/changelog"
    if [ -f "$work/src/debian/patches/series" ]; then
        local p
        while read -r p _; do
            case "$p" in '' | '#'*) continue ;; esac
            patch -d "$work/src" -p1 -s -N <"$work/src/debian/patches/$p" >&2 ||
                die "$name: Debian patch $p does not apply"
        done <"$work/src/debian/patches/series"
    fi
    src=$work/src
}

# --- toolchain ---------------------------------------------------------------------------
# musl-gcc sees only musl's headers; libuv, libwebsockets and tether need the kernel's
# (linux/, asm/), which Debian's linux-libc-dev provides and which are libc-neutral.
prefix=$dir/deps
# Sections per function and object, so that the final link (--gc-sections) drops what
# tether does not call; the kernel's headers beside musl's.
common_cflags="-ffunction-sections -fdata-sections -isystem $prefix/kernel-include"
cflags="-O2 $common_cflags"

toolchain() {
    mkdir -p "$prefix/kernel-include" "$prefix/lib" "$prefix/include"
    local d
    for d in linux asm-generic mtd; do
        [ -e "$prefix/kernel-include/$d" ] || ln -s "/usr/include/$d" "$prefix/kernel-include/$d"
    done
    [ -e "$prefix/kernel-include/asm" ] ||
        ln -s /usr/include/x86_64-linux-gnu/asm "$prefix/kernel-include/asm"
    # cmake looks for libraries and headers only in $prefix: nothing of glibc's may leak in.
    cat >"$dir/musl.cmake" <<TOOLCHAIN
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR x86_64)
set(CMAKE_C_COMPILER musl-gcc)
set(CMAKE_FIND_ROOT_PATH $prefix)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
TOOLCHAIN
}

cmake_build() { # cmake_build SRC [cmake args...]
    local src=$1
    shift
    cmake -S "$src" -B "$src/_build" -G Ninja -Wno-dev \
        -DCMAKE_TOOLCHAIN_FILE="$dir/musl.cmake" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$cflags" -DCMAKE_INSTALL_PREFIX="$prefix" \
        -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_PREFIX_PATH="$prefix" \
        -DBUILD_SHARED_LIBS=OFF "$@" >"$src/_cmake.log" 2>&1 ||
        { tail -n 40 "$src/_cmake.log" >&2; die "cmake configure of $src failed"; }
    ninja -C "$src/_build" -j "$jobs" install >"$src/_build.log" 2>&1 ||
        { grep -E -B2 -A8 'error|Error' "$src/_build.log" | head -n 60 >&2; die "build of $src failed"; }
}

# --- the libraries, in dependency order --------------------------------------------------
build_zlib() {
    unpack zlib
    (cd "$src" && CC=musl-gcc CFLAGS="$cflags" ./configure --static --prefix="$prefix" &&
        make -j "$jobs" && make install) >"$dir/work/zlib.log" 2>&1 ||
        { tail -n 30 "$dir/work/zlib.log" >&2; die "zlib failed"; }
}

build_mbedtls() {
    unpack mbedtls
    # As Debian configures it (debian/rules): thread-safe, which libssh's mbedTLS backend
    # requires (its auto_init fails otherwise).
    (cd "$src" && python3 scripts/config.py set MBEDTLS_THREADING_C &&
        python3 scripts/config.py set MBEDTLS_THREADING_PTHREAD) || die "mbedtls: config.py failed"
    # Its entropy comes from getrandom(2) only under glibc; under musl it would fopen
    # /dev/urandom at every reseed, which fails at the fd limit (SSH key exchanges fail) and
    # in an image without /dev/urandom. musl has SYS_getrandom too (mbedTLS 3 dropped the test).
    sed -i 's/#if ((defined(__linux__) \&\& defined(__GLIBC__)) || defined(__midipix__))/#if (defined(__linux__) || defined(__midipix__))/' \
        "$src/library/entropy_poll.c"
    grep -q '^#if (defined(__linux__) || defined(__midipix__))' "$src/library/entropy_poll.c" ||
        die "mbedtls: library/entropy_poll.c no longer has the getrandom test this script edits"
    cmake_build "$src" -DENABLE_TESTING=OFF -DENABLE_PROGRAMS=OFF \
        -DUSE_SHARED_MBEDTLS_LIBRARY=OFF -DUSE_STATIC_MBEDTLS_LIBRARY=ON -DMBEDTLS_FATAL_WARNINGS=OFF
    # mbedTLS 2.28 installs no pkg-config file; meson finds it through this one.
    cat >"$prefix/lib/pkgconfig/mbedtls.pc" <<PC
prefix=$prefix
Name: mbedtls
Description: mbedTLS (TLS, X.509, crypto)
Version: 2.28.3
Cflags: -I\${prefix}/include
Libs: -L\${prefix}/lib -lmbedtls -lmbedx509 -lmbedcrypto
PC
}

build_libuv() {
    unpack libuv
    cmake_build "$src" -DLIBUV_BUILD_TESTS=OFF -DLIBUV_BUILD_BENCH=OFF -DBUILD_TESTING=OFF
    # libuv's cmake names its static library libuv_a.a; -luv must find it.
    ln -sf libuv_a.a "$prefix/lib/libuv.a"
    rm -f "$prefix"/lib/libuv.so*
}

build_jansson() {
    unpack jansson
    cmake_build "$src" -DJANSSON_BUILD_DOCS=OFF -DJANSSON_EXAMPLES=OFF -DJANSSON_WITHOUT_TESTS=ON \
        -DJANSSON_BUILD_SHARED_LIBS=OFF
}

build_libssh() {
    unpack libssh
    # No GSSAPI (Kerberos has no static library and workspaces don't use it); mbedTLS as the
    # crypto backend; zlib for compression.
    cmake_build "$src" -DWITH_GSSAPI=OFF -DWITH_MBEDTLS=ON -DWITH_GCRYPT=OFF -DWITH_ZLIB=ON \
        -DWITH_SERVER=ON -DWITH_EXAMPLES=OFF -DUNIT_TESTING=OFF -DCLIENT_TESTING=OFF \
        -DSERVER_TESTING=OFF -DWITH_PCAP=OFF -DWITH_NACL=OFF -DWITH_SYMBOL_VERSIONING=OFF \
        -DMBEDTLS_ROOT_DIR="$prefix"
    # libssh.pc names only -lssh; a static link needs what libssh itself links.
    sed -i 's|^Libs: .*|& -lmbedtls -lmbedx509 -lmbedcrypto -lz -lpthread|' "$prefix/lib/pkgconfig/libssh.pc"
}

build_libwebsockets() {
    unpack libwebsockets
    # libuv built in (no event-lib plugins: a static binary cannot dlopen), mbedTLS for TLS,
    # nothing tether does not use. Extensions are compiled in as in Debian's build, although
    # tether offers none: without them lws does not reject frames with reserved bits set
    # (RFC 6455 5.2 says fail the connection). No git: its version would name the enclosing repository's
    # commit.
    cmake_build "$src" -DLWS_WITH_STATIC=ON -DLWS_WITH_SHARED=OFF \
        -DLWS_WITH_LIBUV=ON -DLWS_WITH_EVLIB_PLUGINS=OFF \
        -DLWS_LIBUV_INCLUDE_DIRS="$prefix/include" -DLWS_LIBUV_LIBRARIES="$prefix/lib/libuv.a" \
        -DLWS_WITH_MBEDTLS=ON -DLWS_MBEDTLS_INCLUDE_DIRS="$prefix/include" \
        -DLWS_MBEDTLS_LIBRARIES="$prefix/lib/libmbedtls.a;$prefix/lib/libmbedx509.a;$prefix/lib/libmbedcrypto.a" \
        -DLWS_WITH_ZLIB=ON -DLWS_WITHOUT_EXTENSIONS=OFF -DLWS_WITH_ZIP_FOPS=OFF -DLWS_WITH_HTTP2=OFF \
        -DLWS_ZLIB_INCLUDE_DIRS="$prefix/include" -DLWS_ZLIB_LIBRARIES="$prefix/lib/libz.a" \
        -DLWS_WITHOUT_TESTAPPS=ON -DLWS_WITHOUT_TEST_SERVER=ON -DLWS_WITHOUT_TEST_CLIENT=ON \
        -DLWS_WITH_MINIMAL_EXAMPLES=OFF -DLWS_WITH_SYS_ASYNC_DNS=OFF -DLWS_IPV6=ON \
        -DLWS_WITH_EXTERNAL_POLL=OFF -DLWS_WITH_SOCKS5=OFF -DLWS_WITH_SYS_SMD=OFF \
        -DDISABLE_WERROR=ON -DLWS_REPRODUCIBLE=ON -DCMAKE_DISABLE_FIND_PACKAGE_Git=TRUE
    sed -i 's|^Libs: .*|& -luv -lmbedtls -lmbedx509 -lmbedcrypto -lz -lpthread|' \
        "$prefix/lib/pkgconfig/libwebsockets.pc"
}

libraries=(zlib mbedtls libuv jansson libssh libwebsockets)

# A library's stamp: what its build depends on. A change anywhere rebuilds it and every
# library after it (they may embed its headers).
stamp_of() {
    local name=$1 prev=$2
    {
        echo "$prev"
        printf '%s\n' "${sources[@]}" | grep -A2 "^$name " || true
        declare -f "build_$name" cmake_build toolchain unpack fetch
        echo "$cflags"
        toolchain_versions
    } | sha256sum | cut -d' ' -f1
}

# What every build here depends on besides its own recipe: compiler, C library (its Debian
# revision: a security update must relink), kernel headers, cmake.
toolchain_versions() {
    musl-gcc --version | head -n 1
    dpkg-query -W -f='musl-dev ${Version}\nlinux-libc-dev ${Version}\n' musl-dev linux-libc-dev
    sha256sum "$(musl-gcc -print-file-name=libc.a)" | cut -d' ' -f1
    cmake --version | head -n 1
}

build_deps() {
    toolchain
    local name prev="" want
    for name in "${libraries[@]}"; do
        want=$(stamp_of "$name" "$prev")
        if [ "$(cat "$prefix/.stamp-$name" 2>/dev/null)" != "$want" ]; then
            say "building $name"
            rm -f "$prefix/.stamp-$name"
            "build_$name"
            echo "$want" >"$prefix/.stamp-$name"
            rm -rf "$dir/work/$name"
        fi
        prev=$want
    done
    deps_stamp=$prev
}

# --- tether ------------------------------------------------------------------------------
# Only the libraries in $prefix are visible to pkg-config: a host library cannot slip in.
build_tether() {
    local b=$dir/build want
    export PKG_CONFIG_LIBDIR=$prefix/lib/pkgconfig PKG_CONFIG_PATH=
    # meson tracks neither libraries found through pkg-config nor its own setup options:
    # when either changes, configure from scratch.
    want=$({
        echo "$deps_stamp"
        declare -f build_tether
    } | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$b/.stamp-tether" 2>/dev/null)" != "$want" ]; then
        rm -rf "$b"
    fi
    if [ ! -f "$b/build.ninja" ]; then
        say "configuring tether"
        CC=musl-gcc meson setup "$b" "$root" -Dbuildtype=release -Db_pie=false \
            -Dprefer_static=true -Ddefault_library=static \
            -Dc_args="$common_cflags '-DTETHER_LIBC_VERSION=\"musl $musl_version\"'" \
            -Dc_link_args="-static -Wl,--gc-sections" >"$dir/meson.log" 2>&1 ||
            { tail -n 30 "$dir/meson.log" >&2; die "meson setup failed"; }
        echo "$want" >"$b/.stamp-tether"
    fi
    say "building tether"
    ninja -C "$b" agent/tether >"$dir/ninja.log" 2>&1 ||
        { grep -E -A6 'error|FAILED' "$dir/ninja.log" | head -n 60 >&2; die "tether failed to build"; }
    strip -o "$dir/tether.tmp" "$b/agent/tether"
    local what
    what=$(file -b "$dir/tether.tmp")
    case "$what" in
    *x86-64*'statically linked'*) ;;
    *) die "the build made no static x86-64 binary: $what" ;;
    esac
    "$dir/tether.tmp" version >/dev/null || die "the binary it made does not run"
    mv "$dir/tether.tmp" "$dir/tether"
}

need_tools
musl_version=$(dpkg-query -W -f='${Version}' musl-dev | sed 's/-[^-]*$//')
[ -n "$musl_version" ] || die "cannot tell musl-dev's version (dpkg-query)"
mkdir -p "$dir"
# One build at a time per directory: parallel jobs would race on downloads and installs.
exec 9>"$dir/.lock"
flock 9 || die "cannot lock $dir/.lock"
# The binary people copy is never an old one: gone until this build has made and checked
# its replacement.
rm -f "$dir/tether" "$dir/tether.tmp"
build_deps
build_tether
say "$(stat -c %s "$dir/tether") bytes; $("$dir/tether" version | sed -n 2p)"
for l in "${lagging[@]}"; do
    say "warning: $l"
done
echo "$dir/tether"
