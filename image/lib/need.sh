# The tools a script needs, each with the Debian package that provides it. Sourced at the top of
# every script that runs a tool the base system lacks, before it does anything else:
#
#   source "$repo/image/lib/need.sh"
#   need mmdebstrap:mmdebstrap arch-test:arch-test /usr/lib/aarch64-linux-musl/musl-gcc.specs:musl-dev:arm64
#
# TOOL is a command looked up on PATH, or an absolute path that must exist; PACKAGE is what
# `apt-get install` takes (everything after the first colon, so musl-dev:arm64 works). A missing
# tool ends the script with one message naming every missing package and the command to install
# them. Keep each `need` call on one line: .ci/check-tools reads these lines to prove that
# .ci/packages.txt installs every package a CI script needs, on a root with nothing else.
need() {
    # mkfs.*, sfdisk and friends live in /sbin and /usr/sbin, which a user's PATH may lack.
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac
    local item tool missing=() foreign=""
    for item in "$@"; do
        tool=${item%%:*}
        case "$tool" in
            /*) [ -e "$tool" ] ;;
            *) command -v "$tool" >/dev/null ;;
        esac && continue
        missing+=("${item#*:}")
        case "${item#*:}" in *:arm64) foreign="dpkg --add-architecture arm64 && apt-get update && " ;; esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "$(basename "$0"): missing Debian packages: ${missing[*]}" >&2
    echo "  install them with: ${foreign}apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
}
