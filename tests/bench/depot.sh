#!/usr/bin/env bash
# Benchmark of ota-depot: the anchors' 64 MiB release (../shared/anchors/ota/01-payload.sh) as a
# bundle, published and rolled out at once (one wave, 100%) to DEVICES simulated devices that
# download it concurrently (tests/src/bin/depot-load.rs: the depot protocol, real signatures and
# receipts, nothing written on the device side).
#
#   tests/bench/depot.sh [DEVICES]      (default 12)
#
# Prints: bundle size, publish time (upload and full verification), rollout wall time, the
# depot's CPU time and peak RSS (VmHWM, the whole run), bytes served per device against the
# bundle size. Numbers only; nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/../.."
devices=${1:-12}
anchors=$(cd ../shared/anchors/ota 2>/dev/null && pwd) || { echo "needs ../shared/anchors/ota" >&2; exit 1; }
export WORK=${WORK:-/tmp/ota-work}
[ -f "$WORK/v1.ext4" ] || bash "$anchors/01-payload.sh" >&2
cargo build --release --locked -p ota-depot -p ota -p tests --bin ota-depot --bin ota --bin depot-load >&2
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

$bin/ota-depot serve --listen 127.0.0.1:0 --data-dir "$bench/data" --trusted-keys "$bench/keys" \
    2>"$bench/depot.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$bench/depot.log" && break; sleep 0.1; done
addr=$(sed -n 's/.*listening.*address=\([^ ]*\).*/\1/p' "$bench/depot.log" | head -1)
[ -n "$addr" ] || { cat "$bench/depot.log" >&2; exit 1; }
url=http://$addr
$bin/depot-load enroll "$url" "$devices"
start=$(date +%s.%N)
$bin/ota-depot publish --depot "$url" --token-file "$bench/data/admin.token" "$bench/r.bundle" "$bench/r.plan" >/dev/null 2>&1
publish=$(echo "$(date +%s.%N) - $start" | bc)
$bin/depot-load rollout "$url" "$devices" 2.0.0 >"$bench/load.txt"
wall_ms=$(sed -n 's/^wall_ms //p' "$bench/load.txt")
ticks=$(getconf CLK_TCK)
cpu=$(awk -v t="$ticks" '{print ($14 + $15) / t}' "/proc/$pid/stat")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
served=$($bin/ota-depot status --depot "$url" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rollouts"][0]["bytes_served"])')
state=$($bin/ota-depot status --depot "$url" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rollouts"][0]["state"])')

echo "ota-depot, $devices devices at once, $(nproc) cores, $(date -u +%FT%TZ)"
printf '%-40s %d bytes (level 3, of the 64 MiB v1.ext4)\n' "bundle" "$size"
printf '%-40s %.2f s\n' "publish (upload + verify every chunk)" "$publish"
printf '%-40s %.2f s (rollout state: %s)\n' "rollout: all devices downloaded, reported" "$(echo "$wall_ms / 1000" | bc -l)" "$state"
printf '%-40s %.2f s\n' "depot CPU (user + system, whole run)" "$cpu"
printf '%-40s %.1f MiB\n' "depot peak RSS (VmHWM, whole run)" "$(echo "$hwm / 1024" | bc -l)"
printf '%-40s %.4f x the bundle\n' "bytes served per device" "$(echo "$served / $devices / $size" | bc -l)"
printf '%-40s %d bytes\n' "ota-depot binary (release, $(uname -m), glibc)" "$(stat -c %s $bin/ota-depot)"
