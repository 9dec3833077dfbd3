# Drives a QEMU device from the host: boot it, run commands in it, read its status, make USB
# sticks with signed bundles and plug them in, cut its power. Sourced by tests/qemu/run.sh (the
# end-to-end checks) and image/demo.sh (the narrated demo), so both do the same things the
# same way. Bash; `set -euo pipefail` is the caller's.
#
#   source image/lib/device.sh; device_init WORKDIR
#
# WORKDIR receives the disk copy, the console log, the sockets and the sticks.
# Environment: QEMU_HTTP_PORT (default: a free port), OTA and OTA_DEPOT (the ota and ota-depot
# tools; default target/release/NAME or target/debug/NAME).
device_lib=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
device_repo=$(cd "$device_lib/../.." && pwd)
device_image=$device_repo/image/out/quote-edge-qemu-aarch64.img

# device_init WORKDIR: checks the tools and the image, picks the port; sets $work, $base.
device_init() {
    work=$1
    # shellcheck source=image/lib/need.sh
    source "$device_lib/need.sh"
    need qemu-system-aarch64:qemu-system-arm curl:curl python3:python3 mkfs.vfat:dosfstools mcopy:mtools bmaptool:bmap-tools zstd:zstd sfdisk:fdisk
    [ -f "$device_image" ] || { echo "$device_image is missing (build it with image/build.sh qemu)" >&2; return 2; }
    port=${QEMU_HTTP_PORT:-$(free_port)}
    # Where a fleet depot listens on the host; the guest reaches it as http://10.0.2.100:8088
    # (run-qemu.sh's QEMU_DEPOT). Nothing listens there until a check starts a depot.
    depot_addr=127.0.0.1:$(free_port)
    depot_pid=
    base=http://127.0.0.1:$port
    shell=$work/shell.sock
    console=$work/console.log
    # QMP events: one log per QEMU start (start_qemu names it), so none outlives its boot.
    events= qemu_starts=0
    control=$work/control.sock
    qemu_pid= qmp_pid=
    sticks=0
    ota_tool=$(tool "${OTA:-}" ota)
    depot_tool=$(tool "${OTA_DEPOT:-}" ota-depot)
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# tool GIVEN NAME: GIVEN, else the workspace's release or debug build of NAME, else nothing.
tool() {
    local candidate
    for candidate in "$1" "$device_repo/target/release/$2" "$device_repo/target/debug/$2"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    true
}

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
# guest CMD [TIMEOUT]: run CMD in the guest (root shell), print its output, return its status.
guest() { python3 "$device_lib/guest.py" "$shell" "$1" --timeout "${2:-30}"; }
status_json() { guest 'edge-supervisor status --json --data-dir /var/lib/quote-edge'; }
# json EXPR: evaluate a Python expression over the JSON document on stdin (bound to `d`).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds; fails after SECONDS.
wait_for() {
    local deadline
    deadline=$(python3 -c "import time; print(time.monotonic() + $1)")
    shift
    until "$@" >/dev/null 2>&1; do
        python3 -c "import sys,time; sys.exit(time.monotonic() > $deadline)" || return 1
        sleep 0.2
    done
}
http_ok() { curl -sf -m 2 -o /dev/null "$base/quotes/random"; }
http_down() { ! curl -sf -m 1 -o /dev/null "$base/quotes/random"; }
boot_id() { guest 'cat /proc/sys/kernel/random/boot_id' 10; }
served_by() { curl -s -m 2 -o /dev/null -D - "$base/quotes/random" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-served-by" {print $2}'; }
# stays SECONDS CMD...: CMD succeeds at every poll (each 0.5 s) for SECONDS; fails at once when
# it does not. For an absence ("not retried"), which no event can announce.
stays() {
    local deadline
    deadline=$(python3 -c "import time; print(time.monotonic() + $1)")
    shift
    while python3 -c "import sys,time; sys.exit(time.monotonic() > $deadline)"; do
        "$@" >/dev/null 2>&1 || return 1
        sleep 0.5
    done
}
# journal_cursor: where the supervisor's journal ends now (for journal_since).
journal_cursor() { guest 'journalctl -u edge-supervisor -n 1 --show-cursor -o cat' | tr -d '\r' | sed -n 's/^-- cursor: //p'; }
# journal_since CURSOR: the supervisor's log lines after CURSOR.
journal_since() { guest "journalctl -u edge-supervisor -o cat --after-cursor='$1'" 60 | tr -d '\r'; }
# Predicates for wait_for.
ready_count_is() { [ "$(status_json | json 'sum(r["ready"] for r in d["replicas"])')" = "$1" ]; }
all_ready() { ready_count_is 3; }
replaced() { [ "$(status_json | json "d['replicas'][$1]['ready'] and d['replicas'][$1]['pid'] != $2")" = True ]; }
last_exit_is() { [ "$(status_json | json "(d['replicas'][$1]['last_exit'] or {}).get('reason')")" = "$2" ]; }
restarted_since() { [ "$(guest 'systemctl show -p NRestarts --value edge-supervisor')" -gt "$1" ]; }
update_field() { status_json | json "d['update'].get('$1')"; }
# install_journaled: an install is under way with a journal mark on the disk (the slot is
# `installing`, install.journal holds a mark): a cut now must resume, not start over.
install_journaled() {
    guest "test -s /var/lib/quote-edge/ota/install.journal && grep -q '\"installing\"' /var/lib/quote-edge/ota/state.json"
}
# boot_resumed: this boot's agent resumed an interrupted install from its journal mark.
boot_resumed() { guest "journalctl -b -u edge-supervisor -o cat | grep -q 'resuming an interrupted install'"; }
# resumed_bytes VERSION: the bytes the committed install of VERSION kept from before a cut, as its
# signed receipt on the device says.
resumed_bytes() {
    guest "grep -l '\"$1\"' /var/lib/quote-edge/ota/receipts/*committed*.receipt | xargs cat" |
        { grep -o '"resumed_bytes":[0-9]*' || true; } | cut -d: -f2 | head -1
}
# scan_seconds: the agent's inbox scan interval in whole seconds, as the device's configuration
# sets it, or its default (2 s: `[ota] scan_interval`, crates/ota-agent/src/settings.rs).
scan_seconds() {
    local set
    set=$(guest "grep -o '^scan_interval = \"[0-9]*s\"' /etc/quote-edge/supervisor.toml || true" | tr -dc 0-9)
    echo "${set:-2}"
}
# same_result JSON: the agent is idle and its last result is still JSON (as `json` printed it).
same_result() { [ "$(update_field state)" = idle ] && [ "$(status_json | json 'd["update"]["last_result"]')" = "$1" ]; }
# update_state_in STATE...: the agent is in one of these states.
update_state_in() { local state; state=$(update_field state) && [[ " $* " == *" $state "* ]]; }
# update_ended VERSION RESULT: the agent is idle and its last result is RESULT for VERSION.
update_ended() {
    [ "$(status_json | json "d['update']['state'] == 'idle' and (d['update'].get('last_result') or {}).get('result') == '$2' and (d['update'].get('last_result') or {}).get('version') == '$1'")" = True ]
}
# The admin token the first boot made (root only on the device); writes need it.
admin_token() { guest 'cat /var/lib/quote-edge/admin-token' | tr -d '\r\n'; }
post_quote() {
    local token
    token=$(admin_token) && [ -n "$token" ] || return 1
    curl -s -m 10 -X POST "$base/quotes" -H 'content-type: application/json' -H "authorization: Bearer $token" \
        -d "{\"text\":\"$1\",\"author\":\"${2:-quote-edge device}\"}" | json 'd["id"]'
}
quote_is() { [ "$(curl -s -m 5 "$base/quotes/$1" | json 'd["text"]' 2>/dev/null)" = "$2" ]; }

# flash_card MIB: what README tells a user to do with an SD card, onto a sparse file of MIB
# standing in for the card: check the SHA-256 sums, then `bmaptool copy` the compressed image
# with its block map (bmaptool verifies every block it writes). The card is larger than the
# image, so the first boot grows the data partition into the rest. start_qemu keep boots it.
flash_card() {
    local dir=${device_image%/*} name=${device_image##*/}
    (cd "$dir" && sha256sum --quiet -c "${name%.img}.sha256sums") || return 1
    bmaptool -q copy --bmap "$dir/${name%.img}.bmap" "$device_image.zst" "$work/disk.img" || return 1
    truncate -s "${1}M" "$work/disk.img"
}
# partition N FIELD: a field (start, size: 512-byte sectors) of partition N of the device's disk,
# read on the host with sfdisk while the device is off.
partition() { sfdisk --json "$work/disk.img" | json "d['partitiontable']['partitions'][$1 - 1]['$2']"; }

# start_qemu [keep] [STICK]: a fresh copy of the image (or, with `keep`, the disk as the last
# run left it, or as flash_card made it), optionally with STICK attached as a USB stick from
# power-on.
start_qemu() {
    [ "${1:-}" = keep ] || cp --sparse=always "$device_image" "$work/disk.img"
    rm -f "$shell" "$work/qmp.sock" "$control"
    QEMU_IMAGE=$work/disk.img QEMU_HTTP_PORT=$port QEMU_CONSOLE_LOG=$console QEMU_USB=${2:-} \
        QEMU_SHELL=$shell QEMU_MONITOR=$work/qmp.sock QEMU_CONTROL=$control \
        QEMU_DEPOT=$depot_addr \
        "$device_repo/image/run-qemu.sh" &
    qemu_pid=$!
    qemu_starts=$((qemu_starts + 1))
    events=$work/qmp-events.$qemu_starts.log
    python3 "$device_lib/qmp-events.py" "$work/qmp.sock" "$events" &
    qmp_pid=$!
}
# power_cut: pull the plug (SIGKILL to QEMU: no shutdown, no flush of the guest's caches).
power_cut() {
    kill -9 "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    [ -n "$qmp_pid" ] && kill "$qmp_pid" 2>/dev/null || true
    qemu_pid= qmp_pid=
}
# start_depot KEYS_DIR: an ota-depot on the host, trusting the public keys in KEYS_DIR, its data
# in $work/depot, its log in $work/depot.log; returns once it answers.
start_depot() {
    "$depot_tool" serve --listen "$depot_addr" --data-dir "$work/depot" --trusted-keys "$1" >"$work/depot.log" 2>&1 &
    depot_pid=$!
    wait_for 30 curl -sf -m 2 -o /dev/null "http://$depot_addr/healthz"
}
stop_depot() {
    [ -n "$depot_pid" ] && kill "$depot_pid" 2>/dev/null && wait "$depot_pid" 2>/dev/null || true
    depot_pid=
}
# depot VERB ARGS...: the ota-depot CLI against that depot, as its operator (status needs no
# token).
depot() {
    if [ "$1" = status ]; then
        "$depot_tool" status --depot "http://$depot_addr" "${@:2}"
    else
        "$depot_tool" "$1" --depot "http://$depot_addr" --token-file "$work/depot/admin.token" "${@:2}"
    fi
}
stop_qemu() {
    [ -n "$qmp_pid" ] && kill "$qmp_pid" 2>/dev/null || true
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null || true
    qemu_pid= qmp_pid=
}
# boot_with STICK: hard power-off, then boot the same disk with STICK plugged in.
boot_with() {
    power_cut
    start_qemu keep "$1"
    wait_for 300 http_ok && wait_for 60 guest true
}

# bundle NAME KIND VERSION SECURITY_VERSION [DATA_MIB]: $work/NAME.bundle, signed with the test
# key the image trusts, of a release whose quote-service is the image's own (good) or a script
# that exits 3 (crashes), with DATA_MIB of incompressible share/data.bin (default none: a long
# install, with a journal mark every 4 MiB).
bundle() {
    [ -n "$ota_tool" ] || { echo "no ota tool: cargo build -p ota (or set OTA)" >&2; return 2; }
    local rel=$work/rel-$1
    mkdir -p "$rel/bin"
    if [ "$2" = good ]; then
        cp "$device_repo/image/out/bin/aarch64-unknown-linux-musl/quote-service" "$rel/bin/quote-service"
    else
        printf '#!/bin/sh\necho "release %s cannot start" >&2\nexit 3\n' "$3" > "$rel/bin/quote-service"
        chmod 755 "$rel/bin/quote-service"
    fi
    if [ "${5:-0}" -gt 0 ]; then
        mkdir -p "$rel/share"
        head -c "$(($5 << 20))" /dev/urandom > "$rel/share/data.bin"
    fi
    "$ota_tool" pack --key "$device_repo/ota/keys/test-signing.key" --version "$3" --security-version "$4" \
        --level 3 --out "$work/$1.bundle" "$rel" >/dev/null
}
# stick NAME KIND VERSION SECURITY_VERSION [DATA_MIB]: a FAT stick image holding bundle's bundle
# (same arguments). Prints the image's path.
stick() {
    bundle "$@" || return
    rm -f "$work/$1.img"
    # 1 KiB blocks: the bundle and 8 MiB to spare (receipts, the FAT itself), 16 MiB at least.
    local blocks=$(( $(stat -c %s "$work/$1.bundle") / 1024 + 8192 ))
    mkfs.vfat -C -n STICK "$work/$1.img" "$(( blocks > 16384 ? blocks : 16384 ))" >/dev/null
    mcopy -i "$work/$1.img" "$work/$1.bundle" ::update.bundle
    echo "$work/$1.img"
}
# plug_stick STICK: plug a stick into the running device (USB hot-plug through QMP); sets
# $plugged to its device id.
plug_stick() {
    sticks=$((sticks + 1))
    plugged=stick$sticks
    python3 "$device_lib/qmp.py" "$control" \
        "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"$plugged\",\"file\":{\"driver\":\"file\",\"filename\":\"$1\"}}}" \
        "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-storage\",\"bus\":\"xhci.0\",\"drive\":\"$plugged\",\"id\":\"$plugged\"}}" >/dev/null
}
# pull_stick: unplug the stick plugged last (the guest unmounts it: udev remove).
pull_stick() {
    python3 "$device_lib/qmp.py" "$control" \
        "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"$plugged\"}}" \
        "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"$plugged\"}}" >/dev/null
}
