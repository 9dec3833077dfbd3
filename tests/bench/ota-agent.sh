#!/usr/bin/env bash
# Benchmark of the OTA agent itself (inside edge-supervisor) on the anchors' 64 MiB payload:
# install time (open -> verify -> write -> fsync -> slot ready, as the agent logs it) and the
# supervisor's peak RSS, for a full bundle and for a delta of a one-binary change; and the size
# of a delta for the anchors' "minor release" (v1.ext4 -> v2.ext4, fixed 1 MiB chunks).
#
#   RUNS=5 tests/bench/ota-agent.sh   (medians of RUNS fresh devices, default 1; numbers only)
#
# Releases: bin/quote-service (a script starting the real quote-service, so the trial runs),
# bin/app (a 3 MiB binary: edge-supervisor's; the one-binary change swaps it for `ota`'s),
# share/rootfs.ext4 (the anchors' v1.ext4).
set -euo pipefail
cd "$(dirname "$0")/../.."
anchors=$(cd ../shared/anchors/ota 2>/dev/null && pwd) || { echo "needs ../shared/anchors/ota" >&2; exit 1; }
export WORK=${WORK:-/tmp/ota-work}
[ -f "$WORK/v2.ext4" ] || bash "$anchors/01-payload.sh" >&2
cargo build --release --locked -p edge-supervisor -p quote-service -p ota >&2
root=$(pwd)
b=$WORK/quote-edge-agent
rm -rf "$b"; mkdir -p "$b/keys" "$b/data/ota/inbox"
target/release/ota keygen --out "$b/release" >/dev/null
cp "$b/release.pub" "$b/keys/"

release() { # release DIR APP ROOTFS
    mkdir -p "$1/bin" "$1/share"
    printf '#!/bin/sh\nexec %s/target/release/quote-service "$@"\n' "$root" > "$1/bin/quote-service"
    chmod 755 "$1/bin/quote-service"
    cp "$2" "$1/bin/app"; cp "$3" "$1/share/rootfs.ext4"
}
release "$b/r0" target/release/edge-supervisor "$WORK/v1.ext4"   # the factory release
release "$b/r1" target/release/edge-supervisor "$WORK/v1.ext4"
release "$b/r2" target/release/ota "$WORK/v1.ext4"               # one binary changed
release "$b/r3" target/release/edge-supervisor "$WORK/v2.ext4"   # the anchors' minor release
pack() { target/release/ota pack --key "$b/release.key" --level "${LEVEL:-19}" "$@" >/dev/null; }
pack --version 1.0.0 --security-version 1 --out "$b/r1.bundle" "$b/r1"
pack --version 2.0.0 --security-version 2 --out "$b/r2.bundle" "$b/r2"
pack --version 2.0.0 --security-version 2 --delta-from "$b/r1.bundle" --out "$b/r2-delta.bundle" "$b/r2"
pack --version 3.0.0 --security-version 3 --out "$b/r3.bundle" "$b/r3"
pack --version 3.0.0 --security-version 3 --delta-from "$b/r1.bundle" --out "$b/r3-delta.bundle" "$b/r3"
size() { stat -c %s "$1"; }
payload=$(du -sb "$b/r1" | cut -f1)

# run_once N: a fresh device (data directory, supervisor) takes the full bundle, then the
# delta; appends "full_ms full_peak_kib delta_ms delta_peak_kib idle_kib" to $b/runs.
run_once() {
    rm -rf "$b/data"; mkdir -p "$b/data/ota/inbox"
    cat > "$b/supervisor.toml" <<TOML
listen = "127.0.0.1:18480"
admin_listen = ""
replicas = 1
data_dir = "$b/data"
trusted_keys = "$b/keys"
[ota]
factory_bin = "$b/r0/bin"
trial = "1s"
TOML
    EDGE_LOG=info target/release/edge-supervisor run --config "$b/supervisor.toml" 2> "$b/supervisor.log" &
    sup=$!
    until target/release/edge-supervisor status --data-dir "$b/data" >/dev/null 2>&1; do sleep 0.1; done
    local idle t1 h1 t2 h2
    idle=$(rss)
    read -r t1 h1 < <(apply "$b/r1.bundle")
    read -r t2 h2 < <(apply "$b/r2-delta.bundle")
    echo "$t1 $h1 $t2 $h2 $idle" >> "$b/runs"
    last=$(target/release/edge-supervisor status --data-dir "$b/data" --json | python3 -c 'import json,sys; u=json.load(sys.stdin)["update"]; print(u["version"], u["last_result"]["result"])')
    kill "$sup"; wait "$sup" 2>/dev/null || true
}
hwm() { awk '/VmHWM/ {print $2}' /proc/$sup/status; }
rss() { awk '/VmRSS/ {print $2}' /proc/$sup/status; }
apply() { # apply BUNDLE -> "took_ms peak_kib"
    target/release/ota apply --data-dir "$b/data" "$1" >/dev/null
    local took
    took=$(grep 'release installed' "$b/supervisor.log" | tail -1 | sed -n 's/.*took_ms=\([0-9]*\).*/\1/p')
    echo "$took $(hwm)"
}
trap 'kill $sup 2>/dev/null || true' EXIT
sup=
runs=${RUNS:-1}
rm -f "$b/runs"
for _ in $(seq "$runs"); do run_once; done
# Medians over the runs (column 1..5 of $b/runs).
median() { cut -d' ' -f"$1" "$b/runs" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
t1=$(median 1) h1=$(median 2) t2=$(median 3) h2=$(median 4) idle=$(median 5)

echo "OTA agent on the anchors' payload (release $payload bytes: bin/app 3 MiB + share/rootfs.ext4 64 MiB), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg), $(date -u +%FT%TZ)"
echo "median of $runs run(s); install times per run (full delta): $(cut -d' ' -f1,3 "$b/runs" | paste -sd, -)"
printf 'supervisor RSS idle %d KiB\n' "$idle"
printf 'full bundle 1.0.0 (level 19): %d bytes (%.1f%%); agent install %d ms; supervisor peak RSS %d KiB\n' \
    "$(size "$b/r1.bundle")" "$(echo "$(size "$b/r1.bundle") * 100 / $payload" | bc -l)" "$t1" "$h1"
printf 'one-binary change 2.0.0: full %d bytes, delta %d bytes = %.1f%% of full; agent install of the delta %d ms; peak RSS %d KiB\n' \
    "$(size "$b/r2.bundle")" "$(size "$b/r2-delta.bundle")" "$(echo "$(size "$b/r2-delta.bundle") * 100 / $(size "$b/r2.bundle")" | bc -l)" "$t2" "$h2"
printf 'anchors minor release (v1.ext4 -> v2.ext4 as one file): full %d bytes, delta %d bytes = %.1f%% of full (zstd --patch-from -19: 1,665,977 B)\n' \
    "$(size "$b/r3.bundle")" "$(size "$b/r3-delta.bundle")" "$(echo "$(size "$b/r3-delta.bundle") * 100 / $(size "$b/r3.bundle")" | bc -l)"
echo "after the last run: $last"
