#!/usr/bin/env bash
# Turns a partition layout (image/recipe/*/layout) into one disk image, without loop devices:
# each partition is made as a file (mkfs.ext4 -d DIR, or mkfs.vfat + mcopy), then an MBR is
# written with sfdisk and the partitions are copied in with dd (sparse).
#
#   lib/assemble.sh LAYOUT CONTENT_DIR OUTPUT.img
#
# LAYOUT lines: "table: dos", "round: mib|pow2", then one partition per line:
#   name  type  fs  size  label  content  mountpoint  [mkfs-options]
# size is a fixed size (32MiB) or "+N" (the content's size plus N of free space);
# content is a directory under CONTENT_DIR; mkfs-options (optional) are extra mkfs.ext4
# options with commas for spaces ("-b,4096,-i,65536").
set -euo pipefail
layout=$1 dir=$2 img=$3
die() { echo "assemble.sh: $*" >&2; exit 1; }
mib() { # "32MiB" | "1GiB" -> MiB
    case "$1" in *GiB) echo $((${1%GiB} * 1024)) ;; *MiB) echo "${1%MiB}" ;; *) die "size $1: use MiB or GiB" ;; esac
}
lines=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$layout" | grep -v '^$')
table=$(awk '$1 == "table:" {print $2}' <<<"$lines"); table=${table:-dos}
round=$(awk '$1 == "round:" {print $2}' <<<"$lines"); round=${round:-mib}

offset=1 # MiB: the first partition starts at 1 MiB (2048 sectors), aligned for flash
script="label: $table"$'\n'
parts=()
while read -r name type fs size label content mnt options; do
    src=$dir/$content
    [ -d "$src" ] || die "partition $name: no content directory $src"
    if [ "${size#+}" != "$size" ]; then
        # Content size plus headroom, plus 10% for the file system's own metadata.
        used=$(du -s --block-size=1M "$src" | cut -f1)
        size_mib=$((used + used / 10 + $(mib "${size#+}")))
    else
        size_mib=$(mib "$size")
    fi
    part=$dir/part-$name.img
    rm -f "$part"
    case "$fs" in
        ext4)
            truncate -s "${size_mib}M" "$part"
            # shellcheck disable=SC2086 # the options are words
            mkfs.ext4 -q -F -L "$label" -d "$src" -E root_owner=0:0 -m 0 ${options//,/ } "$part" ||
                die "partition $name: mkfs.ext4 failed ($size_mib MiB for $(du -sh "$src" | cut -f1) of content)"
            ;;
        vfat)
            mkfs.vfat -C -n "$label" "$part" $((size_mib * 1024)) >/dev/null
            if [ -n "$(ls -A "$src")" ]; then
                mcopy -s -i "$part" "$src"/* ::/ || die "partition $name: mcopy failed (too small at $size_mib MiB?)"
            fi
            ;;
        *) die "partition $name: unknown file system $fs" ;;
    esac
    entry="start=$((offset * 2048)), size=$((size_mib * 2048)), type=$type"
    [ "$table" = gpt ] && entry+=", name=$name"
    script+=$entry$'\n'
    parts+=("$part:$offset:$size_mib")
    printf '  p%d %-5s %-4s %5d MiB  %-8s -> %s\n' ${#parts[@]} "$name" "$fs" "$size_mib" "$label" "$mnt"
    offset=$((offset + size_mib))
done < <(awk '$1 !~ /:$/' <<<"$lines")

total=$offset
if [ "$round" = pow2 ]; then
    # QEMU's raspi machines want an SD card whose size is a power of two.
    p=1; while [ $p -lt "$total" ]; do p=$((p * 2)); done; total=$p
fi
rm -f "$img"
truncate -s "${total}M" "$img"
sfdisk --quiet --no-reread --no-tell-kernel "$img" <<<"$script" >/dev/null || die "sfdisk failed for $img"
for p in "${parts[@]}"; do
    IFS=: read -r file off _ <<<"$p"
    dd if="$file" of="$img" bs=1M seek="$off" conv=notrunc,sparse status=none
    rm -f "$file"
done
echo "  disk $total MiB, $table"
