#!/usr/bin/env bash
# Benchmark of quote-service on loopback, with a minimal axum handler measured in the same run.
#
#   tests/bench/quote-service.sh [DURATION] [CONNECTIONS]     (defaults: 10s, 16)
#
# Reports requests/s and p50/p99 latency (wrk --latency) for the baseline, GET /quotes/random,
# GET /quotes/{id} and POST /quotes; bytes written to storage per inserted quote
# (/proc/PID/io: write_bytes reaches the block layer, wchar is what write(2) was handed);
# and RSS idle and after the load. Needs: wrk, curl. Numbers only, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-10s}
conns=${2:-16}
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
require_tools wrk curl

cargo build --release --locked -p quote-service -p tests --bin quote-service --bin bench-baseline >&2
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

svc=127.0.0.1:18090
base=127.0.0.1:18091
QUOTE_LOG=warn target/release/quote-service --listen "$svc" --db "$work/quotes.db" --instance bench-0 &
svc_pid=$!; pids+=("$svc_pid")
target/release/bench-baseline "$base" &
base_pid=$!; pids+=("$base_pid")
for _ in $(seq 200); do
    curl -sf "http://$svc/readyz" >/dev/null && curl -sf "http://$base/" >/dev/null && break
    sleep 0.05
done
curl -sf "http://$svc/readyz" >/dev/null || { echo "quote-service never became ready" >&2; exit 1; }

io_field() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/io"; }
idle_rss=$(rss_kib "$svc_pid")
base_idle_rss=$(rss_kib "$base_pid")

echo "quote-service benchmark: wrk -t2 -c$conns -d$duration on $(nproc) cores, $(date -u +%FT%TZ)"
printf '%-22s %12s %10s %10s\n' "endpoint" "req/s" "p50" "p99"
wrk_run baseline baseline "http://$base/"
wrk_run random "GET /quotes/random" "http://$svc/quotes/random"
wrk_run by-id "GET /quotes/{id}" "http://$svc/quotes/17"

first=$(curl -sf -X POST "http://$svc/quotes" -H 'content-type: application/json' -d '{"text":"first","author":"bench"}' | sed 's/.*"id":\([0-9]*\).*/\1/')
wb0=$(io_field "$svc_pid" write_bytes); wc0=$(io_field "$svc_pid" wchar)
wrk_run insert "POST /quotes" "http://$svc/quotes" -s tests/bench/post.lua
wb1=$(io_field "$svc_pid" write_bytes); wc1=$(io_field "$svc_pid" wchar)
last=$(curl -sf -X POST "http://$svc/quotes" -H 'content-type: application/json' -d '{"text":"last","author":"bench"}' | sed 's/.*"id":\([0-9]*\).*/\1/')
inserted=$((last - first - 1))
loaded_rss=$(rss_kib "$svc_pid")

echo
echo "throughput vs baseline: random $(ratio random baseline), by id $(ratio by-id baseline), insert $(ratio insert baseline)"
echo "inserted quotes: $inserted"
if [ "$inserted" -gt 0 ]; then
    echo "storage writes per quote: write_bytes $(( (wb1 - wb0) / inserted )) B, wchar $(( (wc1 - wc0) / inserted )) B"
fi
echo "RSS: quote-service idle ${idle_rss} KiB, after load ${loaded_rss} KiB; baseline idle ${base_idle_rss} KiB"
