#!/bin/sh
# install.sh of the tether devcontainer Feature (https://containers.dev/implementors/features/).
# The devcontainer tooling runs it as root while it builds the image, in this Feature's folder,
# with the options as upper-cased variables (URL, TOKENFILE, BINARY) and _REMOTE_USER set.
#
# It installs the static binary as /usr/local/bin/tether, checks that it runs, and installs
# /usr/local/share/tether/entrypoint.sh (the Feature's "entrypoint") with feature.env, the
# options it reads when the container starts. Nothing is written until every option checked out.
#
# TETHER_FEATURE_ROOT (default empty) prefixes every path written, so a test can install into
# a scratch directory without a chroot.
#
# POSIX sh: it must run under dash, busybox sh and bash alike (Debian, Alpine, Ubuntu images).
set -eu

root=${TETHER_FEATURE_ROOT:-}
url=${URL:-}
token_file=${TOKENFILE:-/run/secrets/tether-token}
binary=${BINARY:-tether}
remote_user=${_REMOTE_USER:-}

die() {
    echo "tether feature: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")" && pwd)

# ---- check everything first: a failed install leaves no half-written files ----
case $binary in
/*) ;;
*) binary=$here/$binary ;;
esac
[ -e "$binary" ] ||
    die "no tether binary at $binary (option 'binary': put the static build next to install.sh or give its absolute path)"
[ -f "$binary" ] || die "$binary is not a regular file (option 'binary')"
[ -r "$binary" ] || die "$binary is not readable (option 'binary')"
[ -f "$here/entrypoint.sh" ] || die "$here/entrypoint.sh is missing: the Feature's folder is incomplete"
if ! version=$("$binary" version 2>&1); then
    die "$binary does not run here ('tether version' failed: $version); the static build runs on any x86_64 Linux"
fi

# The URL and paths go into feature.env inside single quotes, so only a newline could break
# out of them; the agent rejects anything but these schemes anyway.
newline='
'
case $url in
*"$newline"*) die "option 'url' holds a newline" ;;
'' | ws://?* | wss://?* | http://?* | https://?*) ;;
*) die "option 'url' is '$url': it must be empty or ws://HOST:PORT, wss://HOST:PORT (http:// and https:// mean the same)" ;;
esac
case $token_file in
*"$newline"*) die "option 'tokenFile' holds a newline" ;;
/*) ;;
*) die "option 'tokenFile' is '$token_file': it must be an absolute path (where the token is mounted at run time)" ;;
esac
case $remote_user in
*[!A-Za-z0-9._-]*) die "_REMOTE_USER '$remote_user' is not a plain user name" ;;
esac
if [ -n "$remote_user" ] && [ -z "$root" ] && ! id "$remote_user" >/dev/null 2>&1; then
    echo "tether feature: warning: user $remote_user does not exist yet; the agent starts as that user once it does" >&2
fi

# ---- install ----
bin_dir=$root/usr/local/bin
share=$root/usr/local/share/tether
mkdir -p "$bin_dir" "$share"

# Copy, then rename: an interrupted build never leaves a truncated binary in place.
cp "$binary" "$bin_dir/.tether.new"
chmod 0755 "$bin_dir/.tether.new"
mv -f "$bin_dir/.tether.new" "$bin_dir/tether"
"$bin_dir/tether" version >/dev/null 2>&1 || die "$bin_dir/tether does not run after installing it"

# quote VALUE: VALUE as one single-quoted sh word.
quote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}
{
    echo "# Written by the tether devcontainer Feature's install.sh; read by entrypoint.sh."
    echo "# TETHER_URL, TETHER_TOKEN_FILE and TETHER_TOKEN set when the container runs win."
    echo "feature_url=$(quote "$url")"
    echo "feature_token_file=$(quote "$token_file")"
    echo "feature_user=$(quote "$remote_user")"
} >"$share/.feature.env.new"
chmod 0644 "$share/.feature.env.new"
mv -f "$share/.feature.env.new" "$share/feature.env"

cp "$here/entrypoint.sh" "$share/.entrypoint.sh.new"
chmod 0755 "$share/.entrypoint.sh.new"
mv -f "$share/.entrypoint.sh.new" "$share/entrypoint.sh"

when="when TETHER_URL is set at run time"
[ -z "$url" ] || when="for $url"
as="the container's user"
[ -z "$remote_user" ] || as=$remote_user
echo "tether feature: installed $(echo "$version" | head -n 1) as /usr/local/bin/tether;" \
    "the agent starts with the container $when, as $as"
