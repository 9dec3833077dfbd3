#!/usr/bin/env bash
# Builds quote-edge/postgres:15, the PostgreSQL image of the cluster variant, offline and from
# Debian's packages (no registry is reachable): a bookworm minbase root with postgresql-15 made
# by mmdebstrap and imported with `docker import`. User postgres has the fixed uid/gid 999, so
# a pod can say runAsUser: 999; the entry point is postgres/quote-edge-postgres (read it for the
# environment it takes).
#
#   image/oci/build-postgres.sh [amd64|arm64]     (default: the host's architecture)
#
# Saves image/out/postgres-oci-ARCH.tar for k3s's air-gapped import. The image is rebuilt only
# when this script, the entry point or the package list changed (a label holds their hash;
# QUOTE_EDGE_FRESH=1 forces it). Needs root (mmdebstrap --mode=root) and a docker daemon.
# Downloaded .debs are cached in image/cache/debs-postgres (or $QUOTE_EDGE_DEB_CACHE).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { echo "image/oci/build-postgres.sh: $*" >&2; exit 1; }

arch=${1:-$(dpkg --print-architecture 2>/dev/null || uname -m)}
case "$arch" in
    amd64 | x86_64) arch=amd64 ;;
    arm64 | aarch64) arch=arm64 ;;
    *) die "usage: $0 [amd64|arm64] (not '$arch')" ;;
esac
image=quote-edge/postgres:15
packages=postgresql-15
cache=${QUOTE_EDGE_DEB_CACHE:-$repo/image/cache/debs-postgres}
tar=$repo/image/out/postgres-oci-$arch.tar
t0=$SECONDS

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root)"
# shellcheck source=image/lib/need.sh
source "$repo/image/lib/need.sh"
need mmdebstrap:mmdebstrap arch-test:arch-test
command -v docker >/dev/null || die "docker is missing"
docker info >/dev/null 2>&1 || die "the docker daemon does not answer (docker info failed)"

stamp=$(cat "$0" "$here/postgres/quote-edge-postgres" <(echo "$packages $arch") | sha256sum | cut -c1-16)
have=$(docker image inspect --format '{{index .Config.Labels "quote-edge.stamp"}}' "$image" 2>/dev/null || true)
if [ "${QUOTE_EDGE_FRESH:-0}" != 1 ] && [ "$have" = "$stamp" ]; then
    echo "$image is up to date (stamp $stamp)"
else
    mkdir -p "$cache"
    # Left out of the root (about 170 MB): LLVM and z3, which only PostgreSQL's JIT loads (the
    # entry point turns jit off), its bitcode, and locale sources (C.UTF-8 is built into glibc).
    echo "mmdebstrap: bookworm $arch minbase + $packages (cache: $(find "$cache" -name '*.deb' | wc -l) .debs)"
    entry=$here/postgres/quote-edge-postgres
    # Before any package: the postgres user with a fixed id (postgresql-common's adduser keeps
    # it), and no default cluster (the entry point makes one in the volume at first start).
    mmdebstrap --mode=root --variant=minbase --architectures="$arch" --format=tar \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/i18n/*' \
        --dpkgopt='path-exclude=/usr/lib/*/libLLVM*' --dpkgopt='path-exclude=/usr/lib/*/libz3.so*' \
        --dpkgopt='path-exclude=/usr/lib/postgresql/15/lib/llvmjit*' \
        --dpkgopt='path-exclude=/usr/lib/postgresql/15/lib/bitcode/*' \
        --include="$packages" \
        --skip=download/empty --skip=essential/unlink \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in '$cache' /var/cache/apt/archives/" \
        --essential-hook='echo "postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash" >>"$1"/etc/passwd' \
        --essential-hook='echo "postgres:x:999:" >>"$1"/etc/group' \
        --essential-hook='echo "postgres:*:19000:0:99999:7:::" >>"$1"/etc/shadow' \
        --essential-hook='mkdir -p "$1"/etc/postgresql-common && echo "create_main_cluster = false" >"$1"/etc/postgresql-common/createcluster.conf' \
        --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
        --customize-hook="upload '$entry' /usr/local/bin/quote-edge-postgres" \
        --customize-hook='chmod 0755 "$1"/usr/local/bin/quote-edge-postgres' \
        --customize-hook='install -d -o 999 -g 999 -m 0700 "$1"/var/lib/postgresql/data' \
        --customize-hook='test "$(chroot "$1" id -u postgres)" = 999' \
        --customize-hook='test -x "$1"/usr/lib/postgresql/15/bin/postgres' \
        ${QUOTE_EDGE_VERBOSE:+--verbose} --quiet \
        bookworm - "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" |
        docker import --platform "linux/$arch" - "$image-root" >/dev/null || die "mmdebstrap or docker import failed"
    # `docker import --change` takes no STOPSIGNAL: the configuration is a one-step build on top.
    docker build --quiet --tag "$image" - >/dev/null <<DOCKERFILE || die "docker build of $image failed"
FROM $image-root
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV PGDATA=/var/lib/postgresql/data/pgdata
USER 999:999
EXPOSE 5432
VOLUME /var/lib/postgresql/data
# Fast shutdown: SIGTERM (smart) would wait for every client, and the quote replicas keep a pool.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/quote-edge-postgres"]
LABEL quote-edge.stamp=$stamp
LABEL org.opencontainers.image.description="PostgreSQL 15 from Debian bookworm packages, for quote-edge"
DOCKERFILE
    docker rmi "$image-root" >/dev/null
    rm -f "$tar.stamp"
fi
if [ ! -s "$tar" ] || [ "$(cat "$tar.stamp" 2>/dev/null)" != "$stamp" ]; then
    mkdir -p "$(dirname "$tar")"
    docker save "$image" -o "$tar"
    echo "$stamp" >"$tar.stamp"
fi
printf 'image %10d bytes  %s (docker image inspect .Size)\n' "$(docker image inspect --format '{{.Size}}' "$image")" "$image"
printf 'tar   %10d bytes  %s\n' "$(stat -c %s "$tar")" "${tar#"$repo"/}"
echo "done in $((SECONDS - t0)) s"
