#!/usr/bin/env bash
# Builds the cluster's OCI image of quote-service, offline: one static musl binary in an image
# FROM scratch (no shell, no libc, no CA certificates: the pod network speaks plain HTTP and
# PostgreSQL without TLS, see image/k3s/README.md), running as uid/gid 65532.
#
#   image/oci/build.sh [amd64|arm64]      (default: the host's architecture)
#
# Tags quote-edge/quote-service:VERSION and :latest, and saves both to
# image/out/quote-service-oci-ARCH.tar for k3s's air-gapped import
# (/var/lib/rancher/k3s/agent/images/). No registry is used. The binary is the same
# quote-service the device runs, built with its `postgres` feature (the device leaves it out).
#
# Needs a docker daemon, the Rust target (rustup target add TRIPLE) and a C compiler for the
# bundled SQLite: musl-tools for amd64; gcc-aarch64-linux-gnu and musl-dev:arm64 for arm64.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { echo "image/oci/build.sh: $*" >&2; exit 1; }

arch=${1:-$(dpkg --print-architecture 2>/dev/null || uname -m)}
# shellcheck source=image/lib/need.sh
source "$repo/image/lib/need.sh"
case "$arch" in
    amd64 | x86_64)
        arch=amd64 target=x86_64-unknown-linux-musl
        need musl-gcc:musl-tools file:file
        ;;
    arm64 | aarch64)
        arch=arm64 target=aarch64-unknown-linux-musl
        need aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu /usr/lib/aarch64-linux-musl/musl-gcc.specs:musl-dev:arm64 file:file
        ;;
    *) die "usage: $0 [amd64|arm64] (not '$arch')" ;;
esac
command -v docker >/dev/null || die "docker is missing"
docker info >/dev/null 2>&1 || die "the docker daemon does not answer (docker info failed)"
cd "$repo"
# Asked here, in the checkout: rustup answers for the toolchain rust-toolchain.toml pins.
if command -v rustup >/dev/null && ! grep -qxF "$target" <<<"$(rustup target list --installed)"; then
    die "the Rust target $target is not installed; install it with: rustup target add $target"
fi
version=${QUOTE_EDGE_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
[ -n "$version" ] || die "no version in Cargo.toml"
image=quote-edge/quote-service
t0=$SECONDS

# The C compiler for x86_64 musl is musl-gcc (the cc crate would pick the glibc gcc otherwise).
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
cargo build --locked --release --target "$target" -p quote-service
bin=${CARGO_TARGET_DIR:-target}/$target/release/quote-service
file -b "$bin" | grep -Eq 'static(-pie)? linked|statically linked' ||
    die "$bin is not statically linked: $(file -b "$bin")"

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
install -m 0555 "$bin" "$context/quote-service"
cp "$here/Dockerfile" "$context/Dockerfile"
docker build --quiet --platform "linux/$arch" \
    --build-arg "VERSION=$version" \
    --tag "$image:$version" --tag "$image:latest" "$context" >/dev/null ||
    die "docker build failed"

# The image must start as configured: read-only, as 65532, with no capability at all.
docker run --rm --read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
    "$image:$version" --version | grep -qF "$version" || die "$image:$version does not run (--version)"

mkdir -p image/out
tar=image/out/quote-service-oci-$arch.tar
docker save "$image:$version" "$image:latest" -o "$tar"
printf 'binary %9d bytes  %s\n' "$(stat -c %s "$bin")" "$(file -b "$bin" | cut -d, -f1-2)"
printf 'image  %9d bytes  %s:%s (docker image inspect .Size)\n' \
    "$(docker image inspect --format '{{.Size}}' "$image:$version")" "$image" "$version"
printf 'tar    %9d bytes  %s\n' "$(stat -c %s "$tar")" "$tar"
echo "built in $((SECONDS - t0)) s. Import on k3s: sudo cp $tar /var/lib/rancher/k3s/agent/images/"
