#!/usr/bin/env bash
# Builds the container images Cross.toml names, locally, from Debian packages (no container
# registry is reachable): an amd64 bookworm root made with mmdebstrap, holding Debian's aarch64
# cross gcc, musl's arm64 headers and qemu-user, imported with `docker import` as
#
#   localhost/quote-edge-cross:aarch64-unknown-linux-musl
#   localhost/quote-edge-cross:aarch64-unknown-linux-gnu     (the same root)
#
# cross mounts the host's pinned Rust toolchain (rust-toolchain.toml) into the container; the
# image carries no Rust, so cross can never change the toolchain. The C compiler and linker
# settings come from the repository's .cargo/config.toml, which cross mounts with the project.
#
#   image/cross/build-image.sh            # then: cross build --target aarch64-unknown-linux-musl --release
#
# Needs root, mmdebstrap and a running docker daemon. Downloaded .debs are cached in
# image/cache/debs-cross (or $QUOTE_EDGE_DEB_CACHE).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=localhost/quote-edge-cross
cache=${QUOTE_EDGE_DEB_CACHE:-$here/../cache/debs-cross}
t0=$(date +%s)
die() { echo "build-image.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root)"
# shellcheck source=image/lib/need.sh
source "$here/../lib/need.sh"
# The root has arm64 as a foreign architecture (musl-dev:arm64): mmdebstrap then needs arch-test.
need mmdebstrap:mmdebstrap arch-test:arch-test
command -v docker >/dev/null || die "docker missing"
docker info >/dev/null 2>&1 || die "the docker daemon does not answer (docker info failed)"
mkdir -p "$cache"

packages=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/packages.txt" | grep -v '^$' | paste -sd, -)
tags=(aarch64-unknown-linux-musl aarch64-unknown-linux-gnu)
changes=(
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc'
    --change 'ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc'
    --change 'ENV QEMU_LD_PREFIX=/usr/aarch64-linux-gnu'
    --change 'LABEL org.opencontainers.image.description="quote-edge cross image: Debian bookworm, aarch64 cross gcc, musl-dev:arm64"'
)

# The image is reused while its recipe (this script and packages.txt) is unchanged: the stamp is
# a label on the image. QUOTE_EDGE_FRESH=1 forces a new one.
stamp=$(cat "$here/build-image.sh" "$here/packages.txt" | sha256sum | cut -c1-16)
have=$(docker image inspect "$image:${tags[0]}" --format '{{index .Config.Labels "org.quote-edge.recipe"}}' 2>/dev/null || true)
changes+=(--change "LABEL org.quote-edge.recipe=$stamp")
if [ "${QUOTE_EDGE_FRESH:-0}" != 1 ] && [ "$have" = "$stamp" ]; then
    echo "reusing $image:${tags[0]} (recipe $stamp unchanged; QUOTE_EDGE_FRESH=1 rebuilds it)"
else
    echo "mmdebstrap: bookworm amd64 (+arm64 for musl-dev) with $packages"
    # The root goes straight from mmdebstrap (tar on stdout) into docker import: no temporary copy.
    mmdebstrap --mode=root --variant=apt --architectures=amd64,arm64 --format=tar \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --include="$packages" \
        --skip=download/empty --skip=essential/unlink \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in '$cache' /var/cache/apt/archives/" \
        --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
        --customize-hook='chroot "$1" aarch64-linux-gnu-gcc --version >/dev/null' \
        --customize-hook='test -f "$1"/usr/lib/aarch64-linux-musl/musl-gcc.specs' \
        --quiet \
        bookworm - "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" |
        docker import "${changes[@]}" - "$image:${tags[0]}" >/dev/null || die "mmdebstrap or docker import failed"
fi
docker tag "$image:${tags[0]}" "$image:${tags[1]}"

# Smoke test: the toolchain in the image links a static musl program and a glibc one for
# aarch64, and qemu-user inside the image runs them.
cat >"$cache/hello.c" <<'C'
#include <stdio.h>
int main(void) { puts("hello from aarch64"); return 0; }
C
docker run --rm -v "$cache/hello.c:/hello.c:ro" "$image:${tags[0]}" sh -c '
    set -e
    aarch64-linux-gnu-gcc -specs /usr/lib/aarch64-linux-musl/musl-gcc.specs -static -O2 -o /tmp/hello-musl /hello.c
    aarch64-linux-gnu-gcc -O2 -o /tmp/hello-gnu /hello.c
    file -b /tmp/hello-musl
    qemu-aarch64-static /tmp/hello-musl
    qemu-aarch64-static /tmp/hello-gnu' || die "the toolchain in $image:${tags[0]} failed its smoke test"

docker image ls "$image" --format '{{.Repository}}:{{.Tag}}  {{.Size}}'
echo "ready in $(($(date +%s) - t0)) s. Use: cross build --target aarch64-unknown-linux-musl --release"
