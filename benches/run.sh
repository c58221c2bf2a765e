#!/usr/bin/env bash
# Reproduces every figure of the README's "Performance" section, each side
# by side with its baseline in the same run, on this machine.
#
#   bash benches/run.sh            # all of it (about 5 minutes on 2 cores)
#   SEED=path/to/seed_pattern.py bash benches/run.sh   # also the Python seed
#
# Needs: a release build (made here) and xargs; python3 and pgrep (procps)
# for the rescue figure and GNU parallel for the spawn comparison (Debian:
# apt-get install parallel; the moreutils `parallel` is a different
# program), each skipped with a note where missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# EPOCHREALTIME's decimal separator follows the locale.
export LC_ALL=C

# Where a step fails, say which one before `set -e` ends the script.
trap 'echo "benches/run.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

# The path of a bench binary of this package, built if needed.
bench_bin() {
    local out
    out=$(cargo bench --locked --no-run --bench "$1" 2>&1) || {
        printf '%s\n' "$out" >&2
        return 1
    }
    local path
    path=$(printf '%s\n' "$out" | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
    if [[ -z "$path" ]]; then
        echo "benches/run.sh: no executable for bench $1 in cargo's output:" >&2
        printf '%s\n' "$out" >&2
        return 1
    fi
    printf '%s\n' "$path"
}

cargo build --release --locked --quiet
lw=${CARGO_TARGET_DIR:-target}/release/litework
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

section() { printf '\n== %s\n' "$1"; }

section "no-op items: raw SQLite, the plain pattern, litework (4 workers x 4), pickup; three runs"
"$lw" bench --items 200000 -w 4 -c 4 --compare-seed --pickup 500 --runs 3

if [[ -n "${SEED:-}" ]]; then
    section "the plain pattern in Python (${SEED}), same machine"
    python3 "$SEED" --items 100000 --workers 4
fi

section "the record half alone: outcomes recorded by 4 processes, claims not timed"
# Built here and run directly, as the spawn loop below.
floor_bin=$(bench_bin record_floor)
"$floor_bin" 400000 4 3

section "16 worker processes on $(nproc) cores"
"$lw" bench --items 200000 -w 16 -c 4

section "one process spawned per item: 5000 x true"
seq 1 5000 > "$work/items"
timed() {
    local name=$1; shift
    local start end us
    start=${EPOCHREALTIME/./}
    "$@" > /dev/null 2> "$work/timed.err" || {
        cat "$work/timed.err" >&2
        return 1
    }
    end=${EPOCHREALTIME/./}
    us=$((end - start))
    printf '  %-34s %d.%02d s\n' "$name" $((us / 1000000)) $((us % 1000000 / 10000))
}
timed "litework run -w 4 -c 1 -- true" \
    "$lw" --db "$work/spawn.db" -q run -w 4 -c 1 --progress none --input "$work/items" -- true
timed "xargs -P 4 -n 1 true" sh -c "xargs -P 4 -n 1 true < '$work/items'"
# Run directly: under `cargo bench`, cargo's LD_LIBRARY_PATH makes every
# spawned `true` search more directories for its libraries.
loop_bin=$(bench_bin spawn_loop)
timed "bare Rust spawn loop, 4 threads" "$loop_bin" 5000 4 true
if parallel --version 2>/dev/null | grep -q 'GNU parallel'; then
    timed "GNU parallel -j 4 true" sh -c "parallel -j 4 true < '$work/items'"
else
    echo "  GNU parallel: not installed, skipped"
fi

section "a killed worker's item taken back (ms from kill -9)"
if command -v python3 > /dev/null && command -v pgrep > /dev/null; then
    python3 benches/rescue.py "$lw" 10
else
    echo "  python3 or pgrep: not installed, skipped"
fi

section "add 1,000,000 items, then run them (worker memory over the run)"
"$lw" bench --items 1000000 -w 4 -c 4

section "status and a metrics scrape at 10,000,000 items"
"$lw" bench --items 10000 --status-at 10000000
