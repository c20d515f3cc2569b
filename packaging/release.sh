#!/bin/bash
# packaging/release.sh [OUTDIR]: everything a release ships, in OUTDIR (default build-dist/):
#   tether-VERSION-linux-x86_64    the static binary (packaging/static/build.sh)
#   tether_VERSION_amd64.deb       the Debian package of it (packaging/deb/build.sh)
#   SHA256SUMS                     sha256sum -c checks both
# VERSION has one source, meson.build's project version, which `tether version` prints; the
# script refuses to ship a binary whose version differs. Also `ninja -C build release`.
# TETHER_RELEASE_BINARY=PATH ships that static binary instead of running the static build
# (for a pipeline that built it in an earlier step).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build-dist}
version=$(sed -n "s/^  version : '\([^']*\)',\$/\1/p" "$root/meson.build")
[ -n "$version" ] || { echo "release.sh: no project version in meson.build" >&2; exit 1; }

if [ -n "${TETHER_RELEASE_BINARY:-}" ]; then
    bin=$TETHER_RELEASE_BINARY
else
    bin=$("$root/packaging/static/build.sh" | tail -n 1)
fi
[ -x "$bin" ] || { echo "release.sh: no static binary at '$bin'" >&2; exit 1; }
got=$("$bin" version | sed -n 's/^tether //p') ||
    { echo "release.sh: $bin does not run" >&2; exit 1; }
[ "$got" = "$version" ] ||
    { echo "release.sh: $bin says version '$got', meson.build says '$version'" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
name=tether-$version-linux-x86_64
rm -f "$out/$name" "$out/tether_${version}_amd64.deb" "$out/SHA256SUMS"
install -m 0755 "$bin" "$out/$name"
deb=$("$root/packaging/deb/build.sh" "$out/$name" "$out" | tail -n 1)
(cd "$out" && sha256sum "$name" "$(basename "$deb")" >SHA256SUMS)
echo "release $version in $out:" >&2
sed 's/^/  /' "$out/SHA256SUMS" >&2
echo "$out"
