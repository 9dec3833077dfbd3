#!/usr/bin/env bash
# Boots the Raspberry Pi image (image/build.sh rpi) under QEMU's raspi3b machine (TCG).
# QEMU cannot run the Pi's GPU firmware, so the kernel, initramfs, device tree and command line
# are read from the image's own boot partition (p1, FAT at 1 MiB) with mtools and given directly;
# the SD card is the whole image. The console is the mini UART (ttyS1, QEMU's second serial).
# A USB network adapter (usb-net) stands in for the Pi's USB Ethernet, with a user-mode network
# restricted like run-qemu.sh's.
#
# Environment: QEMU_IMAGE (default image/out/quote-edge-rpi-arm64.img), QEMU_HTTP_PORT (8080),
# QEMU_CONSOLE_LOG=FILE (console to a file instead of this terminal), QEMU_APPEND=ARGS (added to
# the kernel command line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${QEMU_IMAGE:-$here/out/quote-edge-rpi-arm64.img}
port=${QEMU_HTTP_PORT:-8080}
# shellcheck source=image/lib/need.sh
source "$here/lib/need.sh"
need qemu-system-aarch64:qemu-system-arm mcopy:mtools
[ -f "$image" ] || { echo "run-qemu-rpi.sh: missing $image (build it with image/build.sh rpi)" >&2; exit 1; }

boot=$(mktemp -d /tmp/quote-edge-rpi-boot.XXXXXX)
trap 'rm -rf "$boot"' EXIT
for f in vmlinuz initrd.img bcm2837-rpi-3-b.dtb cmdline.txt; do
    mcopy -n -i "$image@@1M" "::$f" "$boot/$f" || { echo "run-qemu-rpi.sh: no $f in the boot partition of $image" >&2; exit 1; }
done

args=(
    -M raspi3b -kernel "$boot/vmlinuz" -initrd "$boot/initrd.img" -dtb "$boot/bcm2837-rpi-3-b.dtb"
    # QEMU's raspi machines reset at once when the SoC watchdog is armed (no countdown is
    # emulated), so its driver stays unloaded here; on a real Pi systemd arms it.
    -append "$(cat "$boot/cmdline.txt") modprobe.blacklist=bcm2835_wdt quote_edge.hostfwd=127.0.0.1:$port ${QEMU_APPEND:-}"
    -drive "file=$image,format=raw,if=sd"
    -netdev "user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:$port-10.0.2.15:8080" -device usb-net,netdev=net
)
if [ -n "${QEMU_CONSOLE_LOG:-}" ]; then
    args+=(-display none -monitor none -serial null -serial "file:$QEMU_CONSOLE_LOG")
else
    args+=(-display none -monitor none -serial null -serial stdio)
fi
# Not exec: the trap removes the extracted boot files when QEMU ends, and stopping this script
# (SIGTERM) stops QEMU too.
qemu-system-aarch64 "${args[@]}" &
qemu=$!
trap 'kill "$qemu" 2>/dev/null; wait "$qemu"; rm -rf "$boot"' EXIT INT TERM
wait "$qemu"
