#!/usr/bin/env bash
# Benchmark of edge-supervisor with 3 quote-service replicas, on loopback.
#
#   tests/bench/supervisor.sh [TRIALS] [DURATION] [CHAOS_SECONDS] [CONNECTIONS]
#                                        (defaults: 50, 10s, 60, 32)
#
# (a) crash -> replacement ready (replicas that say READY=1, then the same with replicas that
#     never speak), (b) hang -> out of rotation, (c) hang -> replacement ready,
#     p50/p99 over TRIALS each (supervisor_trials.py, through the control socket);
# (d) GET /quotes/random through the supervisor vs HAProxy in front of the same 3 replicas vs
#     one replica direct, the same wrk load in one run;
# (e) client errors during a chaos run: one replica killed every second under load;
# (f) supervisor RSS idle, under load, and peak; binary sizes.
# Each crash trial is measured as a first crash (reset_after is set to 10ms so the backoff,
# which would otherwise grow, starts over): it measures the mechanism, not the policy.
# Needs: wrk, haproxy, curl, python3. Numbers only, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-50}
duration=${2:-10s}
chaos=${3:-60}
conns=${4:-32}
for tool in wrk haproxy curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install $tool)" >&2; exit 1; }
done

cargo build --release --locked --bin edge-supervisor --bin quote-service >&2
work=$(mktemp -d)
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

public=127.0.0.1:18200
admin=127.0.0.1:18201
front=127.0.0.1:18202
# Every crash is measured as a first crash (see above): the backoff starts over at once.
restart='[restart]
reset_after = "10ms"
budget = 100000'
cat >"$work/supervisor.toml" <<TOML
listen = "$public"
admin_listen = "$admin"
data_dir = "$work/data"
$restart
TOML
EDGE_LOG=warn target/release/edge-supervisor run --config "$work/supervisor.toml" 2>"$work/supervisor.log" &
sup=$!; pids+=("$sup")
socket=$work/data/supervisor.sock
for _ in $(seq 400); do
    [ -S "$socket" ] && curl -sf "http://$public/readyz" >/dev/null && break
    sleep 0.05
done
status_json() { target/release/edge-supervisor status --json --socket "$socket"; }
python3 - "$socket" <<'PY'
import json, socket, sys, time
end = time.monotonic() + 30
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"command":"status"}\n')
    d = b""
    while c := s.recv(65536): d += c
    if json.loads(d)["ready"] == 3: break
    time.sleep(0.01)
PY
sleep 1
idle_rss=$(rss_kib "$sup")

echo "edge-supervisor benchmark on $(nproc) cores, $(date -u +%FT%TZ)"
echo "(a)-(c) failure trials, $trials each (edge defaults: probe period 250ms, timeout 200ms, threshold 2)"
python3 tests/bench/supervisor_trials.py "$socket" crash "$trials"
# The same crashes with replicas that never say they are ready (NOTIFY_SOCKET removed by `env`,
# which execs, so the pid stays the replica's): the startup probe's polling alone, as before
# the readiness socket. A second supervisor, idle meanwhile, on its own ports and data.
cat >"$work/silent.toml" <<TOML
listen = "127.0.0.1:18210"
admin_listen = ""
data_dir = "$work/silent"
[service]
command = "env"
args = ["-u", "NOTIFY_SOCKET", "$PWD/target/release/quote-service"]
$restart
TOML
EDGE_LOG=warn target/release/edge-supervisor run --config "$work/silent.toml" 2>"$work/silent.log" &
silent=$!; pids+=("$silent")
for _ in $(seq 400); do [ -S "$work/silent/supervisor.sock" ] && break; sleep 0.05; done
python3 tests/bench/supervisor_trials.py "$work/silent/supervisor.sock" crash "$trials" | sed 's/^crash ->/crash (replicas silent, polled only) ->/'
kill "$silent"; wait "$silent" 2>/dev/null || true
python3 tests/bench/supervisor_trials.py "$socket" hang "$trials"

ports=$(status_json | python3 -c 'import json,sys; print(" ".join(str(r["port"]) for r in json.load(sys.stdin)["replicas"]))')
haproxy_cfg "$front" $ports >"$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -q &
hap=$!; pids+=("$hap")
for _ in $(seq 100); do curl -sf "http://$front/readyz" >/dev/null && break; sleep 0.05; done
direct=$(echo "$ports" | cut -d' ' -f1)

echo
echo "(d) GET /quotes/random, wrk -t2 -c$conns -d$duration"
printf '%-28s %12s %10s %10s\n' "path" "req/s" "p50" "p99"
wrk_run supervisor "edge-supervisor (3 replicas)" "http://$public/quotes/random"
wrk_run haproxy "haproxy (same 3 replicas)" "http://$front/quotes/random"
wrk_run direct "one replica, direct" "http://127.0.0.1:$direct/quotes/random"
echo "supervisor/haproxy $(ratio supervisor haproxy), supervisor/direct $(ratio supervisor direct), haproxy/direct $(ratio haproxy direct)"
loaded_rss=$(rss_kib "$sup")
kill "$hap" 2>/dev/null || true

echo
echo "(e) chaos: one replica killed every second for ${chaos}s under wrk -c$conns"
duration=${chaos}s
(
    end=$((SECONDS + chaos))
    kills=0
    while [ $SECONDS -lt $end ]; do
        sleep 1
        pid=$(status_json | python3 -c 'import json,random,sys; r=[x["pid"] for x in json.load(sys.stdin)["replicas"] if x["pid"]]; print(random.choice(r) if r else "")')
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null && kills=$((kills + 1))
    done
    echo "$kills" >"$work/kills"
) &
killer=$!
wrk_run chaos "edge-supervisor under chaos" "http://$public/quotes/random"
wait "$killer"
echo "replicas killed: $(cat "$work/kills"); client errors: $(cat "$work/errors-chaos")"
status_json | python3 -c 'import json,sys; s=json.load(sys.stdin); print("after chaos: %d/%d ready, restarts %s" % (s["ready"], s["desired"], [r["restarts"] for r in s["replicas"]]))'

echo
echo "(f) supervisor RSS: idle ${idle_rss} KiB, after load ${loaded_rss} KiB, peak $(hwm_kib "$sup") KiB"
for bin in target/release/edge-supervisor image/out/bin/aarch64-unknown-linux-musl/edge-supervisor; do
    if [ -f "$bin" ]; then printf '%s: %d bytes\n' "$bin" "$(stat -c %s "$bin")"; fi
done
