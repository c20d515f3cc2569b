#!/bin/bash
# Builds the libFuzzer targets with clang into build-fuzz/ and runs each for SECONDS
# (default 30) on a temporary copy of its seed corpus (tests/fuzz/corpus/NAME, where NAME is
# the target without its fuzz_ prefix); the committed corpus is never written to.
# Prints one line per target and exits non-zero if any target failed to build or crashed.
#
#   tests/fuzz/run.sh [SECONDS]
set -u

seconds=${1:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/build-fuzz
cd "$root" || exit 1

# Targets: "name: source files". Adding a fuzz target is adding a line here.
targets=(
    "fuzz_frame: tests/fuzz/fuzz_frame.c proto/proto.c"
    "fuzz_control: tests/fuzz/fuzz_control.c proto/proto.c"
    "fuzz_logbatch: tests/fuzz/fuzz_logbatch.c proto/logbatch.c proto/proto.c"
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
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=0
for entry in "${targets[@]}"; do
    name=${entry%%:*}
    read -r -a sources <<<"${entry#*:}"
    log=$out/$name.log

    if ! clang "${cflags[@]}" "${sources[@]}" -ljansson -lz -o "$out/$name" >"$log" 2>&1; then
        echo "$name: build failed (see $log)"
        status=1
        continue
    fi

    corpus=$work/$name
    mkdir -p "$corpus"
    seeds=tests/fuzz/corpus/${name#fuzz_}
    if [ -d "$seeds" ]; then
        cp "$seeds"/* "$corpus"/ 2>/dev/null
    fi

    mkdir -p "$out/artifacts"
    "$out/$name" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$out/artifacts/$name-" "$corpus" >>"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "$name: ok (${execs:-?} execs)"
    else
        echo "$name: FAILED, exit $rc (see $log; inputs in $out/artifacts/)"
        status=1
    fi
done
exit $status
