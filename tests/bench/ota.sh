#!/usr/bin/env bash
# Benchmark of `ota pack` and `ota verify` on the anchors' deterministic 64 MiB payload
# (../shared/anchors/ota/01-payload.sh makes it), so the figures stand next to RAUC, Mender
# and SWUpdate measured on the same bytes (../shared/anchors/ota/results/).
#
#   tests/bench/ota.sh [RUNS]      (default 3; reports the median wall time and peak RSS)
#
# Needs: openssl, e2fsprogs (for the payload), GNU time (/usr/bin/time). Numbers only.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
anchors=$(cd ../shared/anchors/ota 2>/dev/null && pwd) || { echo "needs ../shared/anchors/ota" >&2; exit 1; }
export WORK=${WORK:-/tmp/ota-work}
[ -f "$WORK/v1.ext4" ] || bash "$anchors/01-payload.sh" >&2
[ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
cargo build --release --locked --bin ota --bin ota-install >&2
ota=target/release/ota
bench=$WORK/quote-edge-bench
rm -rf "$bench"; mkdir -p "$bench/release"
cp "$WORK/v1.ext4" "$bench/release/rootfs.ext4"
$ota keygen --out "$bench/key" >/dev/null
payload=$(stat -c %s "$bench/release/rootfs.ext4")

# measure NAME CMD... -> "NAME wall_median maxrss" over $runs runs
measure() {
    local name=$1; shift
    local walls=() rss=0
    for _ in $(seq "$runs"); do
        local start end out
        start=$(date +%s.%N)
        out=$( { /usr/bin/time -f '%M' "$@" >/dev/null; } 2>&1 | tail -1)
        end=$(date +%s.%N)
        walls+=("$(echo "$end - $start" | bc)")
        [ "$out" -gt "$rss" ] && rss=$out
    done
    local median
    median=$(printf '%s\n' "${walls[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
    printf '%-32s wall median %7.3fs   peak RSS %6.1f MiB\n' "$name" "$median" "$(echo "$rss / 1024" | bc -l)"
}

echo "ota on the anchors' payload: $payload bytes (v1.ext4), $runs runs, $(nproc) cores, $(date -u +%FT%TZ)"
for level in 3 19; do
    measure "pack --level $level" $ota pack --key "$bench/key.key" --version 1.0.0 --level "$level" --out "$bench/l$level.bundle" "$bench/release"
    size=$(stat -c %s "$bench/l$level.bundle")
    printf '%-32s %d bytes = %.1f%% of the payload\n' "  bundle size" "$size" "$(echo "$size * 100 / $payload" | bc -l)"
    measure "verify (all chunks) level $level" $ota verify --key "$bench/key.pub" "$bench/l$level.bundle"
    # The agent's install data path (ota_agent::install_once): admission, verify, decompress,
    # hash, write, fsync files and directories, the slot marked ready; a new device each run.
    mkdir -p "$bench/keys" && cp "$bench/key.pub" "$bench/keys/"
    measure "install into a slot level $level" sh -c 'rm -rf "$3" && exec "$0" "$1" "$2" "$3"' \
        target/release/ota-install "$bench/keys" "$bench/l$level.bundle" "$bench/device"
done
# RAUC on the same bytes in the same window (when installed: apt-get install rauc squashfs-tools):
# a verity bundle with zstd level 19, as the anchors measured it, signed with a throwaway EC key.
if command -v rauc >/dev/null && command -v mksquashfs >/dev/null; then
    r=$bench/rauc; mkdir -p "$r/in"
    cp "$bench/release/rootfs.ext4" "$r/in/"
    printf '[update]\ncompatible=bench\nversion=1.0.0\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.ext4\n' \
        >"$r/in/manifest.raucm"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$r/key.pem" \
        -out "$r/cert.pem" -subj /CN=bench -days 1 2>/dev/null
    measure "rauc bundle zstd-19 (verity)" sh -c 'rm -f "$0/r.raucb" && rauc bundle --cert="$0/cert.pem" --key="$0/key.pem" \
        --mksquashfs-args="-comp zstd -Xcompression-level 19" "$0/in" "$0/r.raucb" 2>/dev/null' "$r"
    size=$(stat -c %s "$r/r.raucb")
    printf '%-32s %d bytes = %.1f%% of the payload\n' "  bundle size" "$size" "$(echo "$size * 100 / $payload" | bc -l)"
else
    echo "rauc bundle: not measured (apt-get install rauc squashfs-tools)"
fi
echo "hash speed on this CPU, 64 MiB (single thread): blake3 vs sha256"
python3 - "$bench/release/rootfs.ext4" <<'PY'
import hashlib, sys, time
data = open(sys.argv[1], 'rb').read()
t = time.perf_counter(); hashlib.sha256(data).digest(); s = time.perf_counter() - t
print(f"  sha256 (python hashlib/openssl): {len(data) / s / 1e6:.0f} MB/s")
PY
if command -v b3sum >/dev/null; then
    measure "  b3sum --num-threads 1" b3sum --num-threads 1 "$bench/release/rootfs.ext4"
fi
