#!/bin/bash
# packaging/static/build.sh: a fully static x86_64 tether, linked against musl, from pinned
# sources. No runtime dependency at all: the binary runs in any Linux image (Debian, Alpine,
# distroless, an empty chroot).
#
#   packaging/static/build.sh            build (or rebuild what changed); last line: the path
#   TETHER_STATIC_DIR=DIR build.sh       where sources, libraries and the build go
#                                        (default: build-static/ in the repository)
#   TETHER_DEBIAN_MIRROR=URL build.sh    Debian archive to fetch sources from
#
# Sources are Debian 12's source packages (the versions the dynamic build links), fetched from
# the Debian archive and checked against the sha256 sums pinned below; Debian's patches (its
# security fixes among them) are applied. Nothing fetched is committed to the repository.
# When Debian replaces a revision the archive drops the old files: update the pins from
# http://deb.debian.org/debian/dists/bookworm/main/source/Sources.xz.
#
# The TLS library is mbedTLS: the agent needs TLS only for wss:// and libssh's ciphers, and
# mbedTLS links in a fraction of OpenSSL 3's size (the binary must stay under 4 MiB).
#
# Caching: each library is built once into $dir/deps and rebuilt only when its recipe (source
# sums, patches, flags, compiler) or a library it depends on changes; tether itself is an
# incremental meson build in $dir/build, so a rebuild after a code change takes seconds.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${TETHER_STATIC_DIR:-$root/build-static}
mirror=${TETHER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
jobs=$(nproc 2>/dev/null || echo 2)

# name  pool-path  upstream-tarball  sha256  debian-tarball  sha256
sources=(
    "zlib pool/main/z/zlib
        zlib_1.2.13.dfsg.orig.tar.bz2 71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1
        zlib_1.2.13.dfsg-1.debian.tar.xz f66cf3d4f2d7defcd4d1fd1fb0a11ee39f1e01b42ec7d059c9dc5c1695133c44"
    "mbedtls pool/main/m/mbedtls
        mbedtls_2.28.3.orig.tar.gz 3b4953aa55a681e084d31892d9904cc5328d6b4958ea57b90ae4b4f94ae69a8d
        mbedtls_2.28.3-1.debian.tar.xz 3e03c61f63c7bbcd0bf695b53e6663ab448cc2e15429cd67d0e4f32e699645a9"
    "libuv pool/main/libu/libuv1
        libuv1_1.44.2.orig.tar.gz d79b4b06ef04be85fb890bf39d55942cc64c2e15fd14eaa32dae5dce94485484
        libuv1_1.44.2-1+deb12u1.debian.tar.xz 14fc605e7d1520137416fd8c097b58a191be9b07bdbb406f7b39c7894b7d66a5"
    "jansson pool/main/j/jansson
        jansson_2.14.orig.tar.gz c739578bf6b764aa0752db9a2fdadcfe921c78f1228c7ec0bb47fa804c55d17b
        jansson_2.14-2.debian.tar.xz e89fe4fd8221f6934ddb50f2e7f8404311928d0e23e49a5599f3d3d14ee8cb88"
    "libssh pool/main/libs/libssh
        libssh_0.10.6.orig.tar.xz 1861d498f5b6f1741b6abc73e608478491edcf9c9d4b6630eef6e74596de9dc1
        libssh_0.10.6-0+deb12u2.debian.tar.xz 42fab6ba35f5338a63f5c593966f4669c41f6192a1262c5575f719ab33cdc1d5"
    "libwebsockets pool/main/libw/libwebsockets
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
    for p in musl-tools cmake make meson ninja-build pkg-config curl patch xz-utils bzip2 file; do
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
# fetch POOL FILE SHA256: $dir/src/FILE, downloaded once and checked every time.
fetch() {
    local pool=$1 file=$2 sum=$3 path=$dir/src/$2
    mkdir -p "$dir/src"
    if [ ! -f "$path" ]; then
        say "fetching $file"
        curl -fsS --retry 3 -o "$path.part" "$mirror/$pool/$file" ||
            { rm -f "$path.part"; die "could not fetch $mirror/$pool/$file"; }
        mv "$path.part" "$path"
    fi
    if ! echo "$sum  $path" | sha256sum -c --quiet >/dev/null 2>&1; then
        rm -f "$path"
        die "$file does not match its pinned sha256 $sum (deleted; fetch again or update the pin)"
    fi
}

# unpack NAME: a fresh tree of NAME's upstream source with Debian's patches applied, in
# $dir/work/NAME; prints its path.
unpack() {
    local name=$1 entry pool up upsum deb debsum work
    for entry in "${sources[@]}"; do
        read -r n pool up upsum deb debsum <<<"$(echo $entry)"
        [ "$n" = "$name" ] && break
    done
    [ "$n" = "$name" ] || die "no source pinned for $name"
    fetch "$pool" "$up" "$upsum"
    fetch "$pool" "$deb" "$debsum"
    work=$dir/work/$name
    rm -rf "$work" && mkdir -p "$work/src"
    tar -xf "$dir/src/$up" -C "$work/src" --strip-components=1
    tar -xf "$dir/src/$deb" -C "$work/src"
    if [ -f "$work/src/debian/patches/series" ]; then
        local p
        while read -r p _; do
            case "$p" in '' | '#'*) continue ;; esac
            patch -d "$work/src" -p1 -s -N <"$work/src/debian/patches/$p" >&2 ||
                die "$name: Debian patch $p does not apply"
        done <"$work/src/debian/patches/series"
    fi
    echo "$work/src"
}

# --- toolchain ---------------------------------------------------------------------------
# musl-gcc sees only musl's headers; libuv, libwebsockets and tether need the kernel's
# (linux/, asm/), which Debian's linux-libc-dev provides and which are libc-neutral.
prefix=$dir/deps
musl_version=$(dpkg-query -W -f='${Version}' musl-dev 2>/dev/null | sed 's/-[^-]*$//')
cflags="-O2 -ffunction-sections -fdata-sections -isystem $prefix/kernel-include"

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
    local src
    src=$(unpack zlib)
    (cd "$src" && CC=musl-gcc CFLAGS="$cflags" ./configure --static --prefix="$prefix" &&
        make -j "$jobs" && make install) >"$dir/work/zlib.log" 2>&1 ||
        { tail -n 30 "$dir/work/zlib.log" >&2; die "zlib failed"; }
}

build_mbedtls() {
    local src
    src=$(unpack mbedtls)
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
    local src
    src=$(unpack libuv)
    cmake_build "$src" -DLIBUV_BUILD_TESTS=OFF -DLIBUV_BUILD_BENCH=OFF -DBUILD_TESTING=OFF
    # libuv's cmake names its static library libuv_a.a; -luv must find it.
    ln -sf libuv_a.a "$prefix/lib/libuv.a"
    rm -f "$prefix"/lib/libuv.so*
}

build_jansson() {
    local src
    src=$(unpack jansson)
    cmake_build "$src" -DJANSSON_BUILD_DOCS=OFF -DJANSSON_EXAMPLES=OFF -DJANSSON_WITHOUT_TESTS=ON \
        -DJANSSON_BUILD_SHARED_LIBS=OFF
}

build_libssh() {
    local src
    src=$(unpack libssh)
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
    local src
    src=$(unpack libwebsockets)
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
        declare -f "build_$name" cmake_build toolchain
        echo "$cflags"
        musl-gcc --version | head -n 1
        echo "musl $musl_version"
        cmake --version | head -n 1
    } | sha256sum | cut -d' ' -f1
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
            # meson does not track libraries found through pkg-config: relink from scratch.
            rm -rf "$dir/build"
        fi
        prev=$want
    done
}

# --- tether ------------------------------------------------------------------------------
# Only the libraries in $prefix are visible to pkg-config: a host library cannot slip in.
build_tether() {
    local b=$dir/build
    export PKG_CONFIG_LIBDIR=$prefix/lib/pkgconfig PKG_CONFIG_PATH=
    if [ ! -f "$b/build.ninja" ]; then
        say "configuring tether"
        CC=musl-gcc meson setup "$b" "$root" -Dbuildtype=release -Db_pie=false \
            -Dprefer_static=true -Ddefault_library=static \
            -Dc_args="-isystem $prefix/kernel-include -ffunction-sections -fdata-sections '-DTETHER_LIBC_VERSION=\"musl $musl_version\"'" \
            -Dc_link_args="-static -Wl,--gc-sections" >"$dir/meson.log" 2>&1 ||
            { tail -n 30 "$dir/meson.log" >&2; die "meson setup failed"; }
    fi
    say "building tether"
    ninja -C "$b" agent/tether >"$dir/ninja.log" 2>&1 ||
        { grep -E -A6 'error|FAILED' "$dir/ninja.log" | head -n 60 >&2; die "tether failed to build"; }
    strip -o "$dir/tether.tmp" "$b/agent/tether"
    mv "$dir/tether.tmp" "$dir/tether"
    file -b "$dir/tether" | grep -q 'statically linked' ||
        die "$dir/tether is not statically linked: $(file -b "$dir/tether")"
}

need_tools
mkdir -p "$dir"
build_deps
build_tether
say "$(stat -c %s "$dir/tether") bytes; $("$dir/tether" version | sed -n 2p)"
echo "$dir/tether"
