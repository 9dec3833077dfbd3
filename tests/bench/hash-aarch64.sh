#!/usr/bin/env bash
# Which chunk hash for aarch64 without crypto extensions (a Raspberry Pi 3 or 4: Cortex-A53/A72
# with NEON, no ARMv8 SHA2 instructions)? Counts the instructions executed per byte by BLAKE3
# (NEON, and portable) and SHA-256 (software, and with the SHA2 instructions, for CPUs that
# have them), as the bundle's chunk table hashes: 1 MiB chunks, the same crate versions as the
# device binaries (tests/bench/hash-cost). No aarch64 machine here, and TCG timings say nothing
# about a Cortex-A53, so the measure is executed instructions, counted by qemu-user's exec log
# one instruction per block (-singlestep -d exec,nochain). Per byte = the difference between
# hashing 2N and N bytes, less the same difference for filling the buffer alone.
#
#   tests/bench/hash-aarch64.sh [N]      N bytes (default 262144); numbers only
#
# Instructions are not cycles: a Cortex-A53 issues up to two simple instructions per cycle and
# fewer NEON ones, so read the ratio as an estimate, not a timing.
set -euo pipefail
cd "$(dirname "$0")/hash-cost"
n=${1:-262144}
target=aarch64-unknown-linux-musl
command -v qemu-aarch64-static >/dev/null || { echo "needs qemu-user-static" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
build() { # build NAME FEATURES
    cargo build --quiet --release --locked --target "$target" --features "$2" --target-dir ../../../target/hash-cost >&2
    cp "../../../target/hash-cost/$target/release/hash-cost" "$out/$1"
}
build device ""
build portable-asm portable-blake3,asm-sha2
# count BIN ALGO BYTES: instructions executed by one run on a Cortex-A53 model.
count() {
    { qemu-aarch64-static -cpu cortex-a53 -singlestep -d exec,nochain -D /dev/fd/3 "$out/$1" "$2" "$3" 3>&1 1>/dev/null; } |
        grep -c '^Trace'
}
per_byte() { # per_byte BIN ALGO -> instructions per byte, fill cost removed
    local a1 a2 b1 b2
    a1=$(count "$1" "$2" "$n") a2=$(count "$1" "$2" $((2 * n)))
    b1=$(count "$1" none "$n") b2=$(count "$1" none $((2 * n)))
    python3 -c "print(f'{(($a2 - $a1) - ($b2 - $b1)) / $n:.2f}')"
}
b3_neon=$(per_byte device blake3)
b3_portable=$(per_byte portable-asm blake3)
sha_soft=$(per_byte device sha256)
sha_hw=$(per_byte portable-asm sha256)
echo "aarch64 (qemu-aarch64 -cpu cortex-a53), instructions executed per byte hashed, $n-byte difference, $(date -u +%FT%TZ):"
printf '  BLAKE3 1.8.7, NEON (the device build)      %8s\n' "$b3_neon"
printf '  BLAKE3 1.8.7, portable                     %8s\n' "$b3_portable"
printf '  SHA-256 (sha2 0.10.9), software            %8s\n' "$sha_soft"
printf '  SHA-256 (sha2 0.10.9), ARMv8 SHA2 insns    %8s\n' "$sha_hw"
python3 -c "print(f'  SHA-256 software / BLAKE3 NEON = {$sha_soft / $b3_neon:.2f}x; BLAKE3 portable / NEON = {$b3_portable / $b3_neon:.2f}x')"
