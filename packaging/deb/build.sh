#!/bin/bash
# packaging/deb/build.sh BINARY [OUTDIR]: a .deb of the static tether, for Debian and Ubuntu
# workspace images and VMs. It installs /usr/bin/tether and the systemd unit (not enabled:
# the admin writes /etc/tether/agent.env and enables it). The binary is static, so the
# package depends on nothing and has no maintainer scripts. Last line: the .deb's path.
#
# The version is the binary's own (`tether version`), which meson.build sets: one place.
set -euo pipefail

bin=${1:?usage: build.sh BINARY [OUTDIR]}
out=${2:-.}
here=$(cd "$(dirname "$0")" && pwd)
pkg_root=$(cd "$here/.." && pwd)

[ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
case "$(file -b "$bin")" in
*x86-64*'statically linked'*) ;;
*) echo "build.sh: $bin is not a statically linked x86-64 binary (packaging/static/build.sh makes one)" >&2; exit 1 ;;
esac
version=$("$bin" version | sed -n 's/^tether \([0-9][0-9A-Za-z.+~-]*\)$/\1/p') ||
    { echo "build.sh: $bin does not run" >&2; exit 1; }
[ -n "$version" ] || { echo "build.sh: '$bin version' names no version" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -m 0755 "$bin" "$stage/usr/bin/tether"
# The unit is written for a copied binary in /usr/local/bin; the package puts it in /usr/bin.
install -d "$stage/lib/systemd/system" "$stage/usr/share/doc/tether"
sed 's|/usr/local/bin/tether|/usr/bin/tether|g' "$pkg_root/systemd/tether-agent.service" \
    >"$stage/lib/systemd/system/tether-agent.service"
chmod 0644 "$stage/lib/systemd/system/tether-agent.service"
install -m 0644 "$pkg_root/systemd/agent.env.example" "$stage/usr/share/doc/tether/agent.env.example"
install -m 0644 "$pkg_root/../LICENSE" "$stage/usr/share/doc/tether/copyright"

install -d "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: tether
Version: $version
Architecture: amd64
Maintainer: tether developers <tether@localhost>
Section: net
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Description: workspace agent for cloud development environments
 One static binary that dials out to a relay over one websocket and serves SSH
 sessions (terminals, IDEs, scp/sftp/rsync, git), reconnecting terminals and TCP
 port forwards through it, and reports activity so idle workspaces can stop.
CONTROL

mkdir -p "$out"
deb=$out/tether_${version}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"
