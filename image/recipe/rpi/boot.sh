#!/usr/bin/env bash
# Fills the Raspberry Pi boot partition: the GPU firmware from raspi-firmware, the kernel's
# Broadcom device trees and overlays. config.txt and cmdline.txt come from recipe/rpi/boot/,
# vmlinuz and initrd.img from build.sh.   boot.sh ROOTFS BOOTDIR KERNEL_VERSION
set -euo pipefail
rootfs=$1 boot=$2 kver=$3
fw=$rootfs/usr/lib/raspi-firmware
[ -d "$fw" ] || { echo "boot.sh: $fw missing (is raspi-firmware in rpi/packages.txt?)" >&2; exit 1; }
cp "$fw"/* "$boot/"
dtbs=$rootfs/usr/lib/linux-image-$kver/broadcom
[ -d "$dtbs" ] || { echo "boot.sh: no device trees in $dtbs" >&2; exit 1; }
cp "$dtbs"/bcm27*-rpi-*.dtb "$dtbs"/bcm28*-rpi-*.dtb "$boot/"
[ -d "$rootfs/usr/lib/linux-image-$kver/overlays" ] && cp -r "$rootfs/usr/lib/linux-image-$kver/overlays" "$boot/"
exit 0
