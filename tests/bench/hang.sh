#!/usr/bin/env bash
# Hang -> out of rotation, idle and under load, and false ejections under a load with no fault.
#
#   tests/bench/hang.sh [TRIALS] [LOAD_SECONDS] [CONNECTIONS] [BASELINE_SUPERVISOR]
#                                        (defaults: 50, 60, 32, none)
#
# Runs target/release/edge-supervisor, then BASELINE_SUPERVISOR if given (another build, e.g.
# the previous commit's), each in turn with 3 quote-service replicas at the edge defaults
# (probe period 250ms, timeout 200ms, failure threshold 2), on loopback:
# (a) hang (SIGSTOP) -> out of rotation with no traffic: the probes alone, TRIALS trials;
# (b) the same under wrk -cCONNECTIONS on GET /quotes/random: the router sees the silence;
# (c) LOAD_SECONDS of that load with no fault: replicas taken out of rotation by the router
#     (`silent_ejections`), readiness probe failures, and client errors; any is a false positive.
# Each hang is measured as a first failure (reset_after 10ms: the restart backoff starts over).
# Needs: wrk, curl, python3. Numbers only, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-50}
load=${2:-60}
conns=${3:-32}
baseline=${4:-}
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
require_tools wrk curl python3

cargo build --release --locked --bin edge-supervisor --bin quote-service >&2
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

public=127.0.0.1:18220
admin=127.0.0.1:18221

# metric NAME [ABSENT]: a counter on the admin endpoint (NAME with its labels, as printed), or
# ABSENT when it is not there (default "n/a": a build without it).
metric() {
    curl -sf "http://$admin/metrics" | awk -v n="$1" -v absent="${2:-n/a}" '$1 == n {print $2; found = 1} END {if (!found) print absent}'
}
# Readiness failures are listed once the first one happened: absent means none.
readiness_failures() { metric 'edge_supervisor_probe_failures_total{kind="readiness"}' 0; }
delta() { if [ "$1" = n/a ] || [ "$2" = n/a ]; then echo n/a; else echo $(($2 - $1)); fi; }

# bench NAME BINARY: the three measures for one build.
bench() {
    local name=$1 bin=$2
    rm -rf "$work/data"
    cat >"$work/supervisor.toml" <<TOML
listen = "$public"
admin_listen = "$admin"
data_dir = "$work/data"
[service]
command = "$PWD/target/release/quote-service"
[restart]
reset_after = "10ms"
budget = 100000
TOML
    EDGE_LOG=warn "$bin" run --config "$work/supervisor.toml" 2>"$work/supervisor-$name.log" &
    local sup=$!
    pids+=("$sup")
    local socket=$work/data/supervisor.sock
    for _ in $(seq 400); do [ -S "$socket" ] && break; sleep 0.05; done
    [ -S "$socket" ] || { echo "$name: no control socket after 20 s" >&2; exit 1; }
    echo "== $name: $bin"
    python3 tests/bench/supervisor_trials.py "$socket" hang "$trials" | sed 's/^hang ->/(a) idle: hang ->/'
    # Bounded: a trial takes about a second; the load stops when the trials are done.
    wrk -t2 -c"$conns" -d"$((trials * 4 + 60))s" "http://$public/quotes/random" >"$work/wrk-trials-$name" 2>&1 &
    local loader=$!
    python3 tests/bench/supervisor_trials.py "$socket" hang "$trials" | sed "s/^hang ->/(b) under wrk -c$conns: hang ->/"
    kill "$loader" 2>/dev/null || true
    wait "$loader" 2>/dev/null || true
    python3 - "$socket" <<'PY'
import sys, time
sys.path.insert(0, "tests/bench")
import supervisor_trials as t
t.wait(sys.argv[1], lambda s: s["ready"] == s["desired"] == 3)
PY
    local ejected failed
    ejected=$(metric edge_supervisor_silent_ejections_total)
    failed=$(readiness_failures)
    duration=${load}s
    echo "(c) ${load}s of wrk -c$conns, no fault:"
    printf '    %-28s %12s %10s %10s\n' "path" "req/s" "p50" "p99"
    printf '    '; wrk_run "$name" "$name" "http://$public/quotes/random"
    local ejected_after failed_after
    ejected_after=$(metric edge_supervisor_silent_ejections_total)
    failed_after=$(readiness_failures)
    echo "    false ejections: $(delta "$ejected" "$ejected_after"), readiness probe failures: $(delta "$failed" "$failed_after"), client errors: $(cat "$work/errors-$name")"
    kill "$sup"
    wait "$sup" 2>/dev/null || true
}

echo "hang benchmark on $(nproc) cores, $(date -u +%FT%TZ): $trials trials each, edge defaults (probe period 250ms, timeout 200ms, threshold 2)"
bench current target/release/edge-supervisor
if [ -n "$baseline" ]; then
    bench baseline "$baseline"
fi
