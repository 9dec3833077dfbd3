#!/usr/bin/env bash
# Benchmark of ota-depot: the anchors' 64 MiB release (../shared/anchors/ota/01-payload.sh) as a
# bundle, published and rolled out at once (one wave, 100%) to DEVICES simulated devices that
# download it concurrently (tests/src/bin/depot-load.rs: the depot protocol, real signatures and
# receipts, nothing written on the device side). Then the same release with a quote-service, to
# DEVICES real devices on this host (edge-supervisor with 3 quote-service replicas each, its
# own data directory, polling a second depot every second): each installs while it downloads,
# rolls out one replica at a time, tries the release for the default 10 s trial and commits.
#
#   tests/bench/depot.sh [DEVICES]      (default 12)
#
# Prints: bundle size, publish time (upload and full verification), rollout wall time, the
# depot's CPU time and peak RSS (VmHWM, the whole run), bytes served per device against the
# bundle size; for the real devices, the wall time from publish to the rollout completed, and
# the depot's CPU and peak RSS. Numbers only; nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/../.."
devices=${1:-12}
anchors=$(cd ../shared/anchors/ota 2>/dev/null && pwd) || { echo "needs ../shared/anchors/ota" >&2; exit 1; }
export WORK=${WORK:-/tmp/ota-work}
[ -f "$WORK/v1.ext4" ] || bash "$anchors/01-payload.sh" >&2
cargo build --release --locked -p ota-depot -p ota -p tests -p edge-supervisor -p quote-service \
    --bin ota-depot --bin ota --bin depot-load --bin edge-supervisor --bin quote-service >&2
bin=target/release
bench=$WORK/depot-bench
rm -rf "$bench"; mkdir -p "$bench/release" "$bench/keys"
cp "$WORK/v1.ext4" "$bench/release/rootfs.ext4"
$bin/ota keygen --out "$bench/release-key" >/dev/null
cp "$bench/release-key.pub" "$bench/keys/"
$bin/ota pack --key "$bench/release-key.key" --version 2.0.0 --level 3 --out "$bench/r.bundle" "$bench/release" >/dev/null
size=$(stat -c %s "$bench/r.bundle")
$bin/ota rollout --key "$bench/release-key.key" --bundle "$bench/r.bundle" --waves 100% \
    --success-threshold 90 --error-threshold 10 --out "$bench/r.plan" >/dev/null

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# depot NAME: an ota-depot with its data in $bench/NAME; sets $pid and $url.
depot() {
    $bin/ota-depot serve --listen 127.0.0.1:0 --data-dir "$bench/$1" --trusted-keys "$bench/keys" \
        2>"$bench/$1.log" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do grep -q listening "$bench/$1.log" && break; sleep 0.1; done
    local addr
    addr=$(sed -n 's/.*listening.*address=\([^ ]*\).*/\1/p' "$bench/$1.log" | head -1)
    [ -n "$addr" ] || { cat "$bench/$1.log" >&2; exit 1; }
    url=http://$addr
}
# field PYTHON-EXPRESSION: over the depot's status (`s`) and its first rollout (`r`).
field() {
    $bin/ota-depot status --depot "$url" --json |
        python3 -c "import json,sys; s=json.load(sys.stdin); r=(s['rollouts'] or [None])[0]; print($1)"
}
depot data
$bin/depot-load enroll "$url" "$devices"
start=$(date +%s.%N)
$bin/ota-depot publish --depot "$url" --token-file "$bench/data/admin.token" "$bench/r.bundle" "$bench/r.plan" >/dev/null 2>&1
publish=$(echo "$(date +%s.%N) - $start" | bc)
$bin/depot-load rollout "$url" "$devices" 2.0.0 >"$bench/load.txt"
wall_ms=$(sed -n 's/^wall_ms //p' "$bench/load.txt")
ticks=$(getconf CLK_TCK)
cpu=$(awk -v t="$ticks" '{print ($14 + $15) / t}' "/proc/$pid/stat")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
served=$(field "r['bytes_served']")
state=$(field "r['state']")

# Real devices: the release gains the quote-service its replicas run after the update.
mkdir -p "$bench/release/bin"
cp $bin/quote-service "$bench/release/bin/"
$bin/ota pack --key "$bench/release-key.key" --version 2.0.0 --level 3 --out "$bench/d.bundle" "$bench/release" >/dev/null
$bin/ota rollout --key "$bench/release-key.key" --bundle "$bench/d.bundle" --waves 100% \
    --success-threshold 90 --error-threshold 10 --out "$bench/d.plan" >/dev/null
depot real
for n in $(seq "$devices"); do
    mkdir -p "$bench/dev$n"
    cat >"$bench/dev$n.toml" <<EOF
listen = "127.0.0.1:0"
admin_listen = ""
replicas = 3
trusted_keys = "$bench/keys"
[service]
command = "$PWD/$bin/quote-service"
[ota]
depot = "$url"
poll_interval = "1s"
EOF
    $bin/edge-supervisor run --config "$bench/dev$n.toml" --data-dir "$bench/dev$n" 2>"$bench/dev$n.log" &
    pids+=($!)
done
# Bounded waits: every device enrolled (30 s), then the rollout completed (900 s).
for _ in $(seq 300); do [ "$(field "s['devices']")" = "$devices" ] && break; sleep 0.1; done
[ "$(field "s['devices']")" = "$devices" ] ||
    { echo "only $(field "s['devices']") of $devices devices enrolled (logs: $bench/dev*.log)" >&2; exit 1; }
start=$(date +%s.%N)
$bin/ota-depot publish --depot "$url" --token-file "$bench/real/admin.token" "$bench/d.bundle" "$bench/d.plan" >/dev/null 2>&1
for _ in $(seq 1800); do [ "$(field "r['state']")" = completed ] && break; sleep 0.5; done
real_wall=$(echo "$(date +%s.%N) - $start" | bc)
[ "$(field "r['state']")" = completed ] ||
    { echo "the rollout to real devices did not complete: $(field "r['waves']")" >&2; exit 1; }
real_state=$(field "r['state'], r['waves'][0]['committed']")
real_cpu=$(awk -v t="$ticks" '{print ($14 + $15) / t}' "/proc/$pid/stat")
real_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
real_size=$(stat -c %s "$bench/d.bundle")

echo "ota-depot, $devices devices at once, $(nproc) cores, $(date -u +%FT%TZ)"
printf '%-40s %d bytes (level 3, of the 64 MiB v1.ext4)\n' "bundle" "$size"
printf '%-40s %.2f s\n' "publish (upload + verify every chunk)" "$publish"
printf '%-40s %.2f s (rollout state: %s)\n' "rollout: all devices downloaded, reported" "$(echo "$wall_ms / 1000" | bc -l)" "$state"
printf '%-40s %.2f s\n' "depot CPU (user + system, whole run)" "$cpu"
printf '%-40s %.1f MiB\n' "depot peak RSS (VmHWM, whole run)" "$(echo "$hwm / 1024" | bc -l)"
printf '%-40s %.4f x the bundle\n' "bytes served per device" "$(echo "$served / $devices / $size" | bc -l)"
printf '%-40s %d bytes\n' "ota-depot binary (release, $(uname -m), glibc)" "$(stat -c %s $bin/ota-depot)"
echo "real devices: edge-supervisor + 3 quote-service replicas each, on this host, polling every 1 s"
printf '%-40s %d bytes (v1.ext4 and quote-service, level 3)\n' "bundle" "$real_size"
printf '%-40s %.1f s (state, committed: %s; default 10 s trial)\n' "publish -> rollout completed" "$real_wall" "$real_state"
printf '%-40s %.2f s\n' "depot CPU (user + system, whole run)" "$real_cpu"
printf '%-40s %.1f MiB\n' "depot peak RSS (VmHWM, whole run)" "$(echo "$real_hwm / 1024" | bc -l)"
