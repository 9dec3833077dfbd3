#!/usr/bin/env bash
# Builds the device binaries for aarch64 with Debian's cross toolchain, statically linked
# against musl, and reports their stripped sizes.
#
#   image/build-aarch64.sh [--profile release|release-small] [--target TRIPLE] [--out DIR]
#
# Needs: gcc-aarch64-linux-gnu, musl-dev:arm64 (after `dpkg --add-architecture arm64`) and the
# Rust target (`rustup target add aarch64-unknown-linux-musl`); each is checked first. The
# linker and C compiler settings are in .cargo/config.toml. `cross` is the other way (see
# README). image/build.sh runs this script itself when its binaries are missing or stale.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
target=aarch64-unknown-linux-musl
out=image/out/bin
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --target) target=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--profile release|release-small] [--target TRIPLE] [--out DIR]" >&2; exit 2 ;;
    esac
done

# shellcheck source=image/lib/need.sh
source image/lib/need.sh
need aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu file:file
[ "$target" != aarch64-unknown-linux-musl ] || need /usr/lib/aarch64-linux-musl/musl-gcc.specs:musl-dev:arm64

# The Rust standard library for the target comes from rustup, not Debian: without it rustc ends
# in "can't find crate for std" deep in the build. rust-toolchain.toml lists the targets.
# (Captured first: grep -q could close the pipe on rustup, which pipefail reports as a miss.)
if command -v rustup >/dev/null && ! grep -qxF "$target" <<<"$(rustup target list --installed)"; then
    echo "the Rust target $target is not installed for this toolchain ($(rustc --version))" >&2
    echo "install it with: rustup target add $target" >&2
    exit 1
fi

bins=(edge-supervisor quote-service)
args=()
for bin in "${bins[@]}"; do args+=(--bin "$bin"); done
# quote-service without its `postgres` feature: the device runs SQLite only, and the PostgreSQL
# client (tokio-postgres, deadpool) would add about 665 KiB, +17 %, to the stripped release
# binary (x86_64 measurement in #11). The cluster's OCI image builds it with the feature.
cargo build --locked --profile "$profile" --target "$target" \
    -p edge-supervisor -p quote-service --no-default-features "${args[@]}"

mkdir -p "$out/$target"
for bin in "${bins[@]}"; do
    src="target/$target/$profile/$bin"
    cp "$src" "$out/$target/$bin"
    printf '%-16s %9d bytes  %s\n' "$bin" "$(stat -c %s "$src")" "$(file -b "$src" | cut -d, -f1-2,5-6)"
done
