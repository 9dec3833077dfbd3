#!/usr/bin/env bash
# Boots the QEMU image (image/build.sh qemu) with one qemu-system-aarch64 command: the `virt`
# machine, a Cortex-A53 under TCG, the kernel and initramfs given directly (no boot loader),
# an i6300esb hardware watchdog and a user-mode network with no route out (restrict=on) whose
# only way in is the forwarded HTTP port.
#
#   image/run-qemu.sh            # console on this terminal (Ctrl-A X quits)
#
# Environment:
#   QEMU_HTTP_PORT=8080     host port (on 127.0.0.1) forwarded to the device's port 8080
#   QEMU_USB=FILE           attach FILE (a raw disk image) as a USB stick (qemu-xhci + usb-storage)
#   QEMU_IMAGE=FILE         disk image (default image/out/quote-edge-qemu-aarch64.img)
#   QEMU_CONSOLE_LOG=FILE   write the serial console to FILE instead of this terminal
#   QEMU_SHELL=SOCKET       a root shell on the guest's virtio console, as a Unix socket (tests)
#   QEMU_MONITOR=SOCKET     the QEMU monitor (QMP) as a Unix socket (tests: watchdog events)
#   QEMU_CONTROL=SOCKET     a second QMP socket, and a USB controller to plug sticks into while
#                           the device runs (image/lib/device.sh: plug_stick, pull_stick)
#   QEMU_DEPOT=HOST:PORT    the guest reaches HOST:PORT on the host as 10.0.2.100:8088 (a fleet
#                           depot): a guestfwd that runs image/lib/connect.py once per connection.
#                           restrict=on stays: nothing else on the host or beyond is reachable
#   QEMU_SMP=2              virtual CPUs (multi-threaded TCG uses one host thread each)
#   QEMU_APPEND=ARGS        added to the kernel command line (e.g. "systemd.show_status=1");
#                           quote_edge.hostfwd= tells the guest's welcome message the host port
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
image=${QEMU_IMAGE:-$out/quote-edge-qemu-aarch64.img}
port=${QEMU_HTTP_PORT:-8080}
netdev="user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:$port-10.0.2.15:8080"
if [ -n "${QEMU_DEPOT:-}" ]; then
    # QEMU's option syntax: a comma in a value is written twice.
    connector="python3 $here/lib/connect.py ${QEMU_DEPOT%:*} ${QEMU_DEPOT##*:}"
    netdev+=",guestfwd=tcp:10.0.2.100:8088-cmd:${connector//,/,,}"
fi

# shellcheck source=image/lib/need.sh
source "$here/lib/need.sh"
need qemu-system-aarch64:qemu-system-arm
for f in "$image" "$out/vmlinuz" "$out/initrd.img" "$out/cmdline"; do
    [ -f "$f" ] || { echo "run-qemu.sh: missing $f (build it with image/build.sh qemu)" >&2; exit 1; }
done

args=(
    -M virt -cpu cortex-a53 -m 512M -smp "${QEMU_SMP:-2}"
    -kernel "$out/vmlinuz" -initrd "$out/initrd.img" -append "$(cat "$out/cmdline") quote_edge.hostfwd=127.0.0.1:$port ${QEMU_APPEND:-}"
    -drive "file=$image,format=raw,if=none,id=disk" -device virtio-blk-pci,drive=disk
    # No route out: restrict=on cuts the guest off from the host and the world; hostfwd still
    # lets clients in, and QEMU_DEPOT's guestfwd lets the guest reach that one address.
    -netdev "$netdev" -device virtio-net-pci,netdev=net,romfile=
    -device i6300esb -watchdog-action reset
    -device virtio-rng-pci
)
if [ -n "${QEMU_CONSOLE_LOG:-}" ]; then
    args+=(-display none -serial "file:$QEMU_CONSOLE_LOG" -monitor none)
else
    args+=(-nographic)
fi
if [ -n "${QEMU_MONITOR:-}" ]; then
    args+=(-qmp "unix:$QEMU_MONITOR,server=on,wait=off")
fi
if [ -n "${QEMU_CONTROL:-}" ]; then
    args+=(-qmp "unix:$QEMU_CONTROL,server=on,wait=off")
fi
if [ -n "${QEMU_USB:-}" ] || [ -n "${QEMU_CONTROL:-}" ]; then
    args+=(-device qemu-xhci,id=xhci)
fi
if [ -n "${QEMU_USB:-}" ]; then
    [ -f "$QEMU_USB" ] || { echo "run-qemu.sh: QEMU_USB=$QEMU_USB is not a file" >&2; exit 1; }
    args+=(-drive "file=$QEMU_USB,format=raw,if=none,id=usbstick" -device usb-storage,bus=xhci.0,drive=usbstick)
fi
if [ -n "${QEMU_SHELL:-}" ]; then
    args+=(-device virtio-serial-pci -chardev "socket,id=shell,path=$QEMU_SHELL,server=on,wait=off"
           -device virtconsole,chardev=shell)
fi
exec qemu-system-aarch64 "${args[@]}"
