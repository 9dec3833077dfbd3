#!/usr/bin/env bash
# The router against HAProxy, interleaved: GET /quotes/random through edge-supervisor and through
# HAProxy (nbthread 2, roundrobin, http-reuse always) in front of the same 3 replicas, at 32 and
# 256 connections, ROUNDS rounds of DURATION each, alternating, so that drift hits both alike.
#
#   tests/bench/router.sh [ROUNDS] [DURATION] [SUPERVISOR] [BASELINE_SUPERVISOR]
#                                        (defaults: 3, 10s, target/release/edge-supervisor, none)
#
# BASELINE_SUPERVISOR (another build, e.g. the previous commit's) joins the rotation of runs with
# its own 3 replicas. Per run: req/s, p50, p99, and the front's CPU per request (utime + stime
# from /proc, in microseconds). Prints the medians and the ratios to HAProxy.
# Needs: wrk, haproxy, curl, python3. Numbers only, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
duration=${2:-10s}
supervisor=${3:-target/release/edge-supervisor}
baseline=${4:-}
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
require_tools wrk haproxy curl python3

cargo build --release --locked --bin edge-supervisor --bin quote-service >&2
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# start NAME BINARY PORT: a supervisor with 3 quote-service replicas; its pid in $work/pid-NAME.
start() {
    local name=$1 bin=$2 port=$3
    cat >"$work/$name.toml" <<TOML
listen = "127.0.0.1:$port"
admin_listen = ""
# wrk's connections all come from 127.0.0.1: past the default 64 the router would close them.
max_connections_per_peer = 1024
data_dir = "$work/$name"
[service]
command = "$PWD/target/release/quote-service"
TOML
    if ! "$bin" run --check --config "$work/$name.toml" >/dev/null 2>&1; then
        # A build from before the key: its cap of 64 per address stays.
        sed -i '/max_connections_per_peer/d' "$work/$name.toml"
        echo "$name: no max_connections_per_peer in this build; wrk's connections past 64 are closed"
    fi
    EDGE_LOG=warn "$bin" run --config "$work/$name.toml" 2>"$work/$name.log" &
    pids+=("$!")
    echo "$!" >"$work/pid-$name"
    for _ in $(seq 400); do
        [ -S "$work/$name/supervisor.sock" ] && [ "$("$bin" status --json --socket "$work/$name/supervisor.sock" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["ready"])' 2>/dev/null)" = 3 ] && return
        sleep 0.05
    done
    echo "$name: 3 replicas not ready after 20 s" >&2
    exit 1
}

start current "$supervisor" 18300
fronts=(current)
if [ -n "$baseline" ]; then
    start baseline "$baseline" 18310
    fronts+=(baseline)
fi
ports=$("$supervisor" status --json --socket "$work/current/supervisor.sock" | python3 -c 'import json,sys; print(" ".join(str(r["port"]) for r in json.load(sys.stdin)["replicas"]))')
haproxy_cfg 127.0.0.1:18320 $ports >"$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -q &
pids+=("$!")
echo "$!" >"$work/pid-haproxy"
fronts+=(haproxy)
for _ in $(seq 100); do curl -sf http://127.0.0.1:18320/readyz >/dev/null && break; sleep 0.05; done

url_of() { case $1 in current) echo http://127.0.0.1:18300 ;; baseline) echo http://127.0.0.1:18310 ;; haproxy) echo http://127.0.0.1:18320 ;; esac; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "router vs HAProxy on $(nproc) cores, $(date -u +%FT%TZ): $rounds interleaved rounds of $duration"
for conns in 32 256; do
    for round in $(seq "$rounds"); do
        for front in "${fronts[@]}"; do
            pid=$(cat "$work/pid-$front")
            before=$(cpu_ticks "$pid")
            out=$(wrk -t2 -c"$conns" -d"$duration" --latency "$(url_of "$front")/quotes/random")
            after=$(cpu_ticks "$pid")
            awk -v f="$front" -v c="$conns" -v r="$round" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
                function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; return v * 1000 }
                /^Requests\/sec:/ { rps = $2 } / requests in / { n = $1 }
                $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
                END { printf "%s %s %s %.1f %.3f %.3f %.2f\n", c, f, r, rps, p50, p99, ticks / hz * 1e6 / n }' <<<"$out" >>"$work/runs"
        done
    done
done
python3 - "$work/runs" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    conns, front, _, rps, p50, p99, cpu = line.split()
    runs.setdefault((int(conns), front), []).append((float(rps), float(p50), float(p99), float(cpu)))
for conns in sorted({c for c, _ in runs}):
    print(f"\nwrk -t2 -c{conns}, median of {len(next(iter(runs.values())))} runs")
    print(f"{'front':10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}")
    med = {}
    for (c, front), values in sorted(runs.items()):
        if c != conns:
            continue
        med[front] = [statistics.median(v[i] for v in values) for i in range(4)]
        print(f"{front:10} {med[front][0]:10.0f} {med[front][1]:8.2f} {med[front][2]:8.2f} {med[front][3]:11.2f}")
    for front in med:
        if front != "haproxy":
            rps, _, p99, cpu = med[front]
            h = med["haproxy"]
            print(f"{front}/haproxy: throughput {rps / h[0]:.3f}x, p99 {p99 / h[2]:.3f}x, CPU per request {cpu / h[3]:.3f}x")
PY
