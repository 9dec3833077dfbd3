#!/usr/bin/env bash
# Boot to first answer under QEMU (TCG, no KVM) for both device images: the time from starting
# QEMU to the first successful `GET /quotes/random` through the forwarded port, and, for the
# Raspberry Pi image under `-M raspi3b`, also to the supervisor's first line on its console.
# Every boot is a first boot of a fresh copy of the image (database created and seeded).
#
#   tests/bench/boot.sh [RUNS]    RUNS boots of the QEMU image (default 3), then one of the Pi
#                                 image when image/out/quote-edge-rpi-arm64.img exists
#
# CARD_MIB=N boots the image flashed (bmaptool copy of the .zst) onto an N MiB card instead of a
# copy of the same size, so the first boot also grows the data partition into the rest.
#
# Builds nothing (image/build.sh qemu|rpi). Numbers only; the host's load is printed with each.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
# shellcheck source=image/lib/device.sh
source image/lib/device.sh
device_init "$(mktemp -d /tmp/quote-edge-boot.XXXXXX)"
trap 'stop_qemu; [ -n "${rpi:-}" ] && kill "$rpi" 2>/dev/null; rm -rf "$work"' EXIT
load() { cut -d' ' -f1 /proc/loadavg; }

times=()
for i in $(seq "$runs"); do
    l=$(load)
    if [ -n "${CARD_MIB:-}" ]; then
        flash_card "$CARD_MIB"
        t0=$(now)
        start_qemu keep
    else
        t0=$(now)
        start_qemu
    fi
    wait_for 300 http_ok || { echo "qemu image: no answer within 300 s (console: $console)" >&2; exit 1; }
    t=$(since "$t0")
    times+=("$t")
    echo "qemu image${CARD_MIB:+ on a $CARD_MIB MiB card}, boot $i: first answer after $t s (host load $l)"
    stop_qemu
done
printf 'qemu image: median of %d boots %s s\n' "$runs" \
    "$(printf '%s\n' "${times[@]}" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')"

pi=image/out/quote-edge-rpi-arm64.img
[ -f "$pi" ] || { echo "no $pi (image/build.sh rpi): Pi boot not measured"; exit 0; }
cp --sparse=always "$pi" "$work/pi.img"
l=$(load)
t0=$(now)
QEMU_IMAGE=$work/pi.img QEMU_HTTP_PORT=$port QEMU_CONSOLE_LOG=$work/pi-console.log image/run-qemu-rpi.sh &
rpi=$!
wait_for 600 grep -qa 'edge-supervisor' "$work/pi-console.log" || { echo "pi image: no supervisor line within 600 s" >&2; tail -5 "$work/pi-console.log" >&2; exit 1; }
first_line=$(since "$t0")
echo "pi image (raspi3b): supervisor's first console line after $first_line s: $(grep -am1 'edge-supervisor' "$work/pi-console.log" | tr -d '\r' | cut -c1-120)"
if wait_for 300 http_ok; then
    echo "pi image (raspi3b): first answer after $(since "$t0") s (host load at start $l)"
else
    echo "pi image (raspi3b): no answer within 300 s more"
fi
