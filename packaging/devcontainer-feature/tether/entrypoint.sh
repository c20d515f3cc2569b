#!/bin/sh
# The tether devcontainer Feature's entrypoint, installed by install.sh as
# /usr/local/share/tether/entrypoint.sh. The container runs it first, with its command as the
# arguments: it starts `tether agent` in the background when a relay URL is configured, then
# execs the command (the Feature spec chains entrypoints that way). With no command it waits
# for the agent instead, so `entrypoint.sh` alone runs a workspace.
#
# Settings: TETHER_URL, TETHER_TOKEN_FILE or TETHER_TOKEN from the container's environment,
# else the Feature's options as install.sh recorded them in feature.env.
# TETHER_FEATURE_ROOT (default empty) prefixes the installed paths, as for install.sh.
#
# POSIX sh (dash, busybox sh, bash): images without bash must run it too.
set -u

root=${TETHER_FEATURE_ROOT:-}
tether=$root/usr/local/bin/tether
feature_url=
feature_token_file=
feature_user=
if [ -r "$root/usr/local/share/tether/feature.env" ]; then
    # shellcheck source=/dev/null
    . "$root/usr/local/share/tether/feature.env"
fi

say() {
    echo "tether entrypoint: $*" >&2
}

agent_pid=
# start_agent: `tether agent` in the background as the Feature's user (_REMOTE_USER at build
# time), or as the current user when that is unset, already us, or we cannot switch.
# A failure is logged and the container's command runs anyway: a workspace without its agent
# is still better than a container that does not start.
start_agent() {
    url=${TETHER_URL:-$feature_url}
    [ -n "$url" ] || return 0
    export TETHER_URL="$url"
    if [ -z "${TETHER_TOKEN_FILE:-}" ] && [ -z "${TETHER_TOKEN:-}" ]; then
        export TETHER_TOKEN_FILE="$feature_token_file"
    fi
    if [ ! -x "$tether" ]; then
        say "$tether is missing: the agent does not start"
        return 0
    fi
    me=$(id -un 2>/dev/null || id -u)
    user=${feature_user:-$me}
    if [ "$user" != "$me" ] && [ "$(id -u)" != 0 ]; then
        say "running as $me, which cannot switch to $user: the agent runs as $me"
        user=$me
    fi
    if [ "$user" = "$me" ]; then
        "$tether" agent </dev/null &
    else
        # Root switching to the remote user. util-linux's setpriv (Debian, Ubuntu) keeps the
        # environment, so HOME is set here (the agent keeps its SSH host key under it);
        # busybox's setpriv cannot change users, hence the --help test. su (busybox on
        # Alpine, util-linux or shadow elsewhere) sets HOME itself and keeps TETHER_*.
        home=$(awk -F: -v u="$user" '$1 == u { print $6; exit }' /etc/passwd)
        if [ -z "$home" ]; then
            say "no user $user in /etc/passwd: the agent does not start"
            return 0
        fi
        if setpriv --help 2>&1 | grep -q -e --reuid; then
            HOME=$home USER=$user LOGNAME=$user setpriv --reuid="$user" \
                --regid="$(id -g "$user")" --init-groups "$tether" agent </dev/null &
        elif command -v su >/dev/null 2>&1; then
            # shellcheck disable=SC2016 # $0 is expanded by the user's sh, not here
            su -s /bin/sh "$user" -c 'exec "$0" agent' "$tether" </dev/null &
        else
            say "neither setpriv nor su to start the agent as $user: it does not start"
            return 0
        fi
    fi
    agent_pid=$!
    say "started tether agent (pid $agent_pid) as $user for $TETHER_URL"
}

start_agent
# The agent has read its token; the container's command has no use for it.
unset TETHER_TOKEN

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

# No command: stay with the agent, and pass SIGTERM on (the shell may be PID 1, which gets no
# default signal handling), so the agent runs its shutdown script and exits.
[ -n "$agent_pid" ] || exit 0
trap 'kill -TERM "$agent_pid" 2>/dev/null' TERM INT HUP
status=0
while kill -0 "$agent_pid" 2>/dev/null; do
    wait "$agent_pid"
    status=$?
done
exit "$status"
