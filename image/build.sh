#!/usr/bin/env bash
# Builds a bootable device image from the recipe (image/recipe/, see its README.md):
#
#   image/build.sh qemu   -> image/out/quote-edge-qemu-aarch64.img (+ vmlinuz, initrd.img)
#   image/build.sh rpi    -> image/out/quote-edge-rpi-arm64.img
#   image/build.sh qemu --base-only   only the Debian base root (image/out/base-qemu), which the
#                         image is made from and which does not depend on our binaries: CI
#                         builds it while cargo compiles them
#
# Beside each image: IMAGE.bmap (the block map `bmaptool copy` writes and verifies), IMAGE.zst
# (the compressed image to hand out) and NAME.sha256sums (SHA-256 of every file above).
#
# The image is data: packages, dpkg path filters, overlays, masked units, the partition
# layout and the kernel command line all live in image/recipe/; this script only runs the
# steps. Needs root (mmdebstrap --mode=root) and the Debian packages named by `need` below
# (checked first). The static aarch64 binaries come from image/build-aarch64.sh, which this
# script runs when they are missing or older than the sources (QUOTE_EDGE_BIN_DIR=DIR: use the
# binaries in DIR as they are, e.g. those `cross` built). No loop devices, no mounts outside
# mmdebstrap's chroot.
# Downloaded .debs are kept in image/cache/debs (or $QUOTE_EDGE_DEB_CACHE) for rebuilds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
variant=${1:-}
case "$variant" in
    qemu) image_name=quote-edge-qemu-aarch64.img ;;
    rpi) image_name=quote-edge-rpi-arm64.img ;;
    *) echo "usage: $0 qemu|rpi [--base-only]" >&2; exit 2 ;;
esac
base_only=0
case "${2:-}" in
    "") ;;
    --base-only) base_only=1 ;;
    *) echo "$0: unknown option '$2' (usage: $0 qemu|rpi [--base-only])" >&2; exit 2 ;;
esac

recipe=$here/recipe
vrecipe=$recipe/$variant
out=$here/out
work=$out/work-$variant
rootfs=$work/rootfs
cache=${QUOTE_EDGE_DEB_CACHE:-$here/cache/debs}
bins=${QUOTE_EDGE_BIN_DIR:-$out/bin/aarch64-unknown-linux-musl}
test_key=$repo/ota/keys/test-signing.pub
trusted_keys=${QUOTE_EDGE_TRUSTED_KEYS:-}
dev_keys=${QUOTE_EDGE_DEV_KEYS:-0}
t0=$(date +%s)

step() { printf '[build %4ds] %s\n' $(($(date +%s) - t0)) "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }
# A recipe list: one entry per line, '#' comments and blank lines ignored.
read_list() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$@" | grep -v '^$' || true; }

# --- preconditions -------------------------------------------------------------------------
# The trusted OTA keys, first (before root, tools or binaries): an image must never trust the
# repository's test key by accident, since its secret is public. The Pi image needs release keys;
# the QEMU image takes the test key only when asked (QUOTE_EDGE_DEV_KEYS=1), and then its
# supervisor is told it may start with it (allow_test_key) and its console says so at boot.
is_test_key() { [ "$(awk '{print $2; exit}' "$1")" = "$(awk '{print $2; exit}' "$test_key")" ]; }
keygen_hint="make release keys with \`ota keygen --out release\` and set QUOTE_EDGE_TRUSTED_KEYS=release.pub"
# (Not for the base root alone: it holds no keys.)
if [ "$base_only" = 0 ]; then
    if [ -z "$trusted_keys" ]; then
        if [ "$variant" = qemu ] && [ "$dev_keys" = 1 ]; then
            trusted_keys=$test_key
        elif [ "$variant" = qemu ]; then
            die "no trusted OTA key: $keygen_hint, or set QUOTE_EDGE_DEV_KEYS=1 to trust the repository's test key (development only: its secret is public)"
        else
            die "no trusted OTA key for the Pi image: $keygen_hint (the repository's test key is never trusted on a Pi image)"
        fi
    fi
    [ -f "$trusted_keys" ] || die "missing trusted OTA key $trusted_keys (QUOTE_EDGE_TRUSTED_KEYS)"
    if is_test_key "$trusted_keys"; then
        [ "$variant" = rpi ] && die "$trusted_keys is the repository's test key, whose secret is public: a Pi image never trusts it; $keygen_hint"
        [ "$dev_keys" = 1 ] || die "$trusted_keys is the repository's test key, whose secret is public: set QUOTE_EDGE_DEV_KEYS=1 to build a development image with it"
    fi
fi
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root chroots into the new root)"
# shellcheck source=image/lib/need.sh
source "$here/lib/need.sh"
# arch-test is only a Recommends of mmdebstrap, but an arm64 root on an amd64 host needs it.
need mmdebstrap:mmdebstrap arch-test:arch-test qemu-aarch64-static:qemu-user-static mkfs.ext4:e2fsprogs mkfs.vfat:dosfstools mcopy:mtools sfdisk:fdisk bmaptool:bmap-tools zstd:zstd systemd-sysusers:systemd
if [ "$base_only" = 1 ]; then
    : # the base root holds none of our binaries
elif [ -n "${QUOTE_EDGE_BIN_DIR:-}" ]; then
    for bin in edge-supervisor quote-service; do
        [ -x "$bins/$bin" ] || die "missing $bins/$bin (QUOTE_EDGE_BIN_DIR=$QUOTE_EDGE_BIN_DIR)"
    done
else
    # One command from a checkout: the binaries are (re)built when missing or older than any
    # source file, so an image never ships binaries of another commit by accident.
    stale=
    for bin in edge-supervisor quote-service; do
        [ -x "$bins/$bin" ] || { stale="$bin is missing"; break; }
        newer=$(find "$repo/crates" "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$bins/$bin" -type f -print -quit)
        [ -z "$newer" ] || { stale="${newer#"$repo"/} is newer than $bin"; break; }
    done
    if [ -n "$stale" ]; then
        step "building the aarch64 binaries ($stale): image/build-aarch64.sh"
        if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
            # Under sudo: build as the user who asked, with their toolchain (a login shell puts
            # ~/.cargo/bin on PATH), so target/ stays theirs.
            runuser -u "$SUDO_USER" -- bash -lc 'exec "$0"' "$here/build-aarch64.sh" ||
                die "image/build-aarch64.sh failed as $SUDO_USER (see above)"
        else
            command -v cargo >/dev/null || die "no cargo on PATH: install Rust (rustup), or build the binaries first with image/build-aarch64.sh"
            "$here/build-aarch64.sh" || die "image/build-aarch64.sh failed (see above)"
        fi
    fi
fi
# Maintainer scripts of arm64 packages run under qemu-user: register it with binfmt_misc if
# nothing handles aarch64 ELF yet (a fresh CI machine). F: the kernel opens the interpreter
# now, so it works inside the chroot too.
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" || die "cannot mount $binfmt (needed to run arm64 maintainer scripts)"
fi
if ! grep -qs '^enabled' "$binfmt/qemu-aarch64"; then
    step "registering $(command -v qemu-aarch64-static) for aarch64 ELF in binfmt_misc"
    [ -e "$binfmt/qemu-aarch64" ] && echo -1 >"$binfmt/qemu-aarch64"
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$(command -v qemu-aarch64-static)"':F' >"$binfmt/register"
fi

rm -rf "$work"
mkdir -p "$work" "$cache"

# --- 1. the root file system: Debian minbase + the recipe's packages ------------------------
packages=()
for p in $(read_list "$recipe/packages.txt" "$vrecipe/packages.txt"); do
    if [ "${p#./}" != "$p" ]; then
        # A directory in the recipe holding DEBIAN/control: a local package built here.
        dpkg-deb --root-owner-group --build "$recipe/${p#./}" "$work/${p#./}.deb" >/dev/null
        p=$work/${p#./}.deb
    fi
    packages+=("$p")
done
sources=$recipe/sources.list
[ -f "$vrecipe/sources.list" ] && sources=$vrecipe/sources.list

# The base root is reused while its inputs are unchanged (a stamp of the recipe files that feed
# mmdebstrap); QUOTE_EDGE_FRESH=1 forces a new one. The image is always made from a copy.
base=$out/base-$variant
stamp=$(cat "$recipe/packages.txt" "$vrecipe/packages.txt" "$sources" "$recipe/dpkg-excludes" \
        "$recipe"/initramfs-provider/DEBIAN/control | sha256sum | cut -c1-16)
if [ "${QUOTE_EDGE_FRESH:-0}" = 1 ] || [ "$(cat "$base.stamp" 2>/dev/null)" != "$stamp" ]; then
    # A failed mmdebstrap can leave its bind mounts behind; never delete through them.
    awk -v b="$base/" 'index($2, b) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf "$base" "$base.stamp"
    step "mmdebstrap: bookworm arm64 minbase + ${#packages[@]} packages (cache: $(find "$cache" -name '*.deb' | wc -l) .debs)"
    # The setup hooks put the cached .debs where apt looks first; the customize hook copies back
    # what was downloaded. file-mirror-automount makes our local .deb visible inside the chroot.
    mmdebstrap --mode=root --variant=minbase --architectures=arm64 --format=directory \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt="$recipe/dpkg-excludes" \
        --include="$(IFS=,; echo "${packages[*]}")" \
        --skip=download/empty --skip=essential/unlink \
        --hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in '$cache' /var/cache/apt/archives/" \
        --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
        bookworm "$base" - <"$sources" || die "mmdebstrap failed (see above)"
    echo "$stamp" >"$base.stamp"
else
    step "reusing the base root $base (recipe inputs unchanged; QUOTE_EDGE_FRESH=1 rebuilds it)"
fi
if [ "$base_only" = 1 ]; then
    step "base root ready: $base"
    exit 0
fi
cp -a "$base" "$rootfs"

# --- 2. our files: overlays, device configuration, binaries, trusted keys, units -------------
step "overlay, binaries, units"
cp -a "$here/overlay/." "$rootfs/"
[ -d "$vrecipe/overlay" ] && cp -a "$vrecipe/overlay/." "$rootfs/"
# The device configuration (image/overlay/etc/quote-edge/supervisor.toml stays the defaults).
device_config=$recipe/supervisor.toml
[ -f "$vrecipe/supervisor.toml" ] && device_config=$vrecipe/supervisor.toml
install -m 0644 "$device_config" "$rootfs/etc/quote-edge/supervisor.toml"
if is_test_key "$trusted_keys"; then
    # Only reached with QUOTE_EDGE_DEV_KEYS=1 on the QEMU image (checked above).
    grep -q '^\[ota\]' "$rootfs/etc/quote-edge/supervisor.toml" || printf '\n[ota]\n' >>"$rootfs/etc/quote-edge/supervisor.toml"
    sed -i '/^\[ota\]/a allow_test_key = true  # QUOTE_EDGE_DEV_KEYS=1: development image' "$rootfs/etc/quote-edge/supervisor.toml"
    grep -q '^allow_test_key = true' "$rootfs/etc/quote-edge/supervisor.toml" || die "could not allow the test key in the device configuration"
fi
install -m 0755 "$bins/edge-supervisor" "$bins/quote-service" "$rootfs/usr/bin/"
# The supervisor's and the replicas' users (overlay/usr/lib/sysusers.d): made now, since the
# device's root is read-only (its systemd-sysusers.service is masked). It only edits files, so
# the host's systemd-sysusers does it for the aarch64 root.
systemd-sysusers --root="$rootfs" "$rootfs/usr/lib/sysusers.d/quote-edge.conf"
for user in quote-edge:950 quote-replica:951; do
    grep -q "^${user%%:*}:x:${user#*:}:${user#*:}:" "$rootfs/etc/passwd" ||
        die "systemd-sysusers did not make ${user%%:*} with id ${user#*:} (see overlay/usr/lib/sysusers.d)"
done
install -d -m 0755 "$rootfs/etc/quote-edge/keys" "$rootfs/usr/share/doc/quote-edge"
install -m 0644 "$trusted_keys" "$rootfs/etc/quote-edge/keys/"
install -m 0644 "$repo/README.md" "$rootfs/usr/share/doc/quote-edge/README.md"
for unit in $(read_list "$recipe/masked-units.txt" "$vrecipe/masked-units.txt" 2>/dev/null); do
    ln -sfn /dev/null "$rootfs/etc/systemd/system/$unit"
done
read_list "$recipe/enabled-units.txt" "$vrecipe/enabled-units.txt" 2>/dev/null | while read -r unit target; do
    mkdir -p "$rootfs/etc/systemd/system/$target.wants"
    path=$(cd "$rootfs" && find etc/systemd/system lib/systemd/system -maxdepth 1 -name "$unit" | head -1)
    [ -n "$path" ] || die "enabled-units: no unit file $unit in the root"
    ln -sfn "/$path" "$rootfs/etc/systemd/system/$target.wants/$unit"
done
ln -sfn /lib/systemd/system/multi-user.target "$rootfs/etc/systemd/system/default.target"
# Read-only root: an empty machine-id makes systemd use a fresh one in /run on every boot.
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
echo quote-edge >"$rootfs/etc/hostname"
# Mount points that must exist on the read-only root.
read_list "$vrecipe/layout" | awk '$1 !~ /:$/ && $7 != "-" {print $7}' | while read -r mnt; do
    mkdir -p "$rootfs$mnt"
done

# --- 3. kernel and initramfs (busybox + the modules the root disk needs) ---------------------
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -1)
[ -n "$kver" ] || die "no kernel in the root (is linux-image-arm64 in packages.txt?)"
step "kernel $kver; initramfs"
boot=$work/boot
mkdir -p "$boot"
cp "$rootfs/boot/vmlinuz-$kver" "$boot/vmlinuz"
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,etc}
cp "$rootfs/bin/busybox" "$initrd/bin/busybox"
install -m 0755 "$recipe/initrd/init" "$initrd/init"
# Each wanted module after its dependencies, in the order modules.dep gives (last dep first).
moddep=$rootfs/lib/modules/$kver/modules.dep
: >"$initrd/etc/modules.order"
for m in $(read_list "$vrecipe/initrd-modules"); do
    re=${m//[-_]/[-_]} # module names treat - and _ alike
    line=$(grep -E "(^|/)$re\.ko(\.[a-z]+)?:" "$moddep" || true)
    [ -n "$line" ] || { grep -qE "/$re\.ko" "$rootfs/lib/modules/$kver/modules.builtin" && continue; die "initrd-modules: no module $m in $kver"; }
    for dep in $(echo "${line#*:}" | tr ' ' '\n' | tac) "${line%%:*}"; do
        grep -qxF "/lib/modules/$kver/$dep" "$initrd/etc/modules.order" && continue
        install -D -m 0644 "$rootfs/lib/modules/$kver/$dep" "$initrd/lib/modules/$kver/$dep"
        echo "/lib/modules/$kver/$dep" >>"$initrd/etc/modules.order"
    done
done
# busybox's cpio, run under qemu-user: no cpio needed on the build machine.
(cd "$initrd" && find . | sort | "$rootfs/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9n >"$boot/initrd.img"
[ -d "$vrecipe/boot" ] && cp -a "$vrecipe/boot/." "$boot/"
[ -x "$vrecipe/boot.sh" ] && { step "$variant boot files"; "$vrecipe/boot.sh" "$rootfs" "$boot" "$kver"; }

# --- 4. partitions from the layout, then one disk image -------------------------------------
step "partitions"
mkdir -p "$work/data"
chmod 0750 "$work/data"
"$here/lib/assemble.sh" "$vrecipe/layout" "$work" "$out/$image_name"
files=("$out/$image_name")
if [ "$variant" = qemu ]; then
    # run-qemu.sh boots with -kernel/-initrd/-append: no boot loader to wait for.
    cp "$boot/vmlinuz" "$boot/initrd.img" "$out/"
    cp "$vrecipe/cmdline" "$out/cmdline"
    files+=("$out/vmlinuz" "$out/initrd.img")
fi

# --- 5. what a user flashes: block map, compressed image, checksums ---------------------------
step "block map, compressed image, SHA-256 sums"
bmap=$out/${image_name%.img}.bmap
sums=$out/${image_name%.img}.sha256sums
rm -f "$bmap" "$out/$image_name.zst" "$sums"
# The bmap lists the allocated ranges with their SHA-256: bmaptool copy writes only those and
# verifies each; everything else on the card is left as it was (the file systems never read it).
bmaptool create -o "$bmap" "$out/$image_name" || die "bmaptool create failed"
zstd -q -T0 "-${QUOTE_EDGE_ZSTD_LEVEL:-12}" "$out/$image_name" -o "$out/$image_name.zst" || die "zstd failed"
files+=("$bmap" "$out/$image_name.zst")
(cd "$out" && sha256sum "${files[@]##*/}") >"$sums"

step "done in $(($(date +%s) - t0)) s: $out/$image_name"
ls -l "${files[@]}" "$sums" | awk '{printf "  %-60s %7.1f MiB\n", $9, $5/1048576}'
printf '  %-60s %7.1f MiB used (sparse)\n' "$image_name" "$(du -k "$out/$image_name" | awk '{print $1/1024}')"
