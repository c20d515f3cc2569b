#!/bin/bash
# Builds the libFuzzer targets with clang into build-fuzz/, replays every saved crash
# (tests/fuzz/regressions/NAME/*, NAME being the target without its fuzz_ prefix) through
# its target once, then runs each target for SECONDS (default 60) on a temporary copy of its
# seed corpus (tests/fuzz/corpus/NAME); the committed files are never written to. Targets
# build and run FUZZ_JOBS at a time (default 2, one per core of a CI runner), so 7 targets
# of 60 s take about 3.5 minutes. Each target's build, replay and fuzzing output goes to
# build-fuzz/fuzz_NAME.log.
#
# Prints, in target order, one line per target with saved crashes, then one per target:
#   fuzz_NAME regressions: ok (N files)        fuzz_NAME regressions: FAILED, ...
#   fuzz_NAME: ok (N execs)                    fuzz_NAME: FAILED, exit N (...)
#   fuzz_NAME: build failed (see LOG)
# (tests/run counts lines with ": ok" as passes and ": FAIL..." as failures, so each line is
# one test.) Exits non-zero if any target failed to build, crashed on a saved crash, or
# crashed while fuzzing.
#
#   tests/fuzz/run.sh [SECONDS]          FUZZ_JOBS=4 tests/fuzz/run.sh 300
set -u

seconds=${1:-60}
njobs=${FUZZ_JOBS:-2}
case $njobs in '' | *[!0-9]* | 0) njobs=2 ;; esac
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/build-fuzz
cd "$root" || exit 1

# Targets: "name: source files". Adding a fuzz target is adding a line here.
targets=(
    "fuzz_frame: tests/fuzz/fuzz_frame.c proto/proto.c"
    "fuzz_control: tests/fuzz/fuzz_control.c proto/proto.c"
    "fuzz_logbatch: tests/fuzz/fuzz_logbatch.c proto/logbatch.c proto/proto.c"
    "fuzz_route: tests/fuzz/fuzz_route.c tunnel/route.c tunnel/tokens.c"
    "fuzz_devcontainer: tests/fuzz/fuzz_devcontainer.c agent/devcontainer.c tunnel/readfile.c"
)
if [ -f tests/fuzz/fuzz_mux.c ]; then
    targets+=("fuzz_mux: tests/fuzz/fuzz_mux.c tunnel/mux.c proto/proto.c")
fi
if [ -f tests/fuzz/fuzz_sftp.c ]; then
    targets+=("fuzz_sftp: tests/fuzz/fuzz_sftp.c agent/sftp_wire.c")
fi

if ! command -v clang >/dev/null 2>&1; then
    echo "clang not found: fuzzing skipped"
    exit 0
fi

cflags=(-std=gnu11 -D_GNU_SOURCE -g -O1 -I. -Wall -Wextra -Werror
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
mkdir -p "$out/artifacts"
work=$(mktemp -d)
# If this script is stopped, so are the fuzzers it started (their pids in $work/*.pid) and
# its background jobs.
stop() {
    local f
    for f in "$work"/*.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    kill $(jobs -p) 2>/dev/null
    exit 130
}
trap stop INT TERM
trap 'rm -rf "$work"' EXIT

# Runs "$@" in the background once fewer than $njobs jobs are running.
spawn() {
    while [ "$(jobs -rp | wc -l)" -ge "$njobs" ]; do
        wait -n
    done
    "$@" &
}

build() {
    local name=$1
    shift
    if ! clang "${cflags[@]}" "$@" -ljansson -lz -o "$out/$name" >"$out/$name.log" 2>&1; then
        echo "$name: build failed (see $out/$name.log)" >"$work/$name.built"
    fi
}

# Each saved crash once: given files, libFuzzer runs each and stops at the first crash. A
# saved hang fails after 60 s instead of libFuzzer's default 20 minutes.
regress() {
    local name=$1 dir=tests/fuzz/regressions/${1#fuzz_} log=$out/$1.log
    local files=()
    [ -d "$dir" ] && mapfile -t files < <(find "$dir" -type f | sort)
    [ "${#files[@]}" -gt 0 ] || return 0
    echo "== replaying ${#files[@]} saved crashes from $dir" >>"$log"
    if "$out/$name" -timeout=60 "${files[@]}" >>"$log" 2>&1; then
        echo "$name regressions: ok (${#files[@]} files)"
    else
        local last
        last=$(sed -n 's/^Running: //p' "$log" | tail -n 1)
        echo "$name regressions: FAILED on ${last:-?} (see $log)"
    fi
}

fuzz() {
    local name=$1 log=$out/$1.log corpus=$work/$1 seeds=tests/fuzz/corpus/${1#fuzz_}
    mkdir -p "$corpus"
    if [ -d "$seeds" ]; then
        cp "$seeds"/* "$corpus"/ 2>/dev/null
    fi
    "$out/$name" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$out/artifacts/$name-" "$corpus" >>"$log" 2>&1 &
    echo $! >"$work/$name.pid"
    wait $!
    local rc=$? execs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "$name: ok (${execs:-?} execs)" >"$work/$name.fuzzed"
    else
        echo "$name: FAILED, exit $rc (see $log; inputs in $out/artifacts/)" >"$work/$name.fuzzed"
    fi
}

names=()
for entry in "${targets[@]}"; do
    name=${entry%%:*}
    read -r -a sources <<<"${entry#*:}"
    names+=("$name")
    spawn build "$name" "${sources[@]}"
done
wait

status=0
built=()
for name in "${names[@]}"; do
    if [ -f "$work/$name.built" ]; then
        cat "$work/$name.built"
        status=1
        continue
    fi
    built+=("$name")
    line=$(regress "$name")
    if [ -n "$line" ]; then
        echo "$line"
        case $line in *FAILED*) status=1 ;; esac
    fi
done

for name in "${built[@]}"; do
    spawn fuzz "$name"
done
wait

for name in "${built[@]}"; do
    line=$(cat "$work/$name.fuzzed" 2>/dev/null || echo "$name: FAILED, no result (see $out/$name.log)")
    echo "$line"
    case $line in *FAILED*) status=1 ;; esac
done
exit $status
