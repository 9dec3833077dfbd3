#!/usr/bin/env bash
# End-to-end checks of the device image under QEMU (TCG). Builds nothing: boots a fresh copy of
# image/out/quote-edge-qemu-aarch64.img (image/build.sh qemu) with image/run-qemu.sh, drives
# the guest through the test shell on its virtio console (image/lib/guest.py), and checks:
#
#   boot          the image flashed as README says (SHA-256 sums checked, bmaptool copy of the
#                 compressed image and its block map) onto a 1 GiB "card"; time from starting
#                 QEMU to the first HTTP answer
#   grow          first boot grew the data partition to the end of the card, and its ext4
#   welcome       the console tells how to reach the device (address, forwarded host port)
#                 and which update keys it trusts, warning about the repository's test key
#   replicas      answers come from 3 distinct replicas (X-Served-By)
#   sandbox       the supervisor's unit rated <= 2.5 by `systemd-analyze security` in the guest;
#                 the running supervisor is quote-edge (950), not root, with NoNewPrivs, a
#                 seccomp filter and CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_SYS_ADMIN as its whole
#                 bounding and ambient sets; its 3 replicas are ready inside that sandbox, run as
#                 quote-replica (951) with no capability, and that user can read the admin token
#                 but not list the ota/ directory
#   self-heal     kill -9 of a replica inside the guest loses no client request
#   oom           a replica's cgroup pushed past memory.max is OOM-killed by the kernel,
#                 reported as oom_kill by `edge-supervisor status --json`, and replaced by a
#                 ready one
#   sigstop       SIGSTOP of the supervisor: systemd's WatchdogSec kills and restarts it
#   persistence   a quote written before a reboot is there after it
#   grow-resume   a power cut between growing the partition and growing its file system (made
#                 on the host: the card grows, the partition is grown, the device boots): the
#                 file system grows to the partition, the partition is left alone, quotes intact
#   hang          all CPUs starved by real-time spinners (PID 1 can no longer feed the
#                 i6300esb): the hardware watchdog resets the machine and it serves again
#   ota           a USB stick with a signed bundle plugged into the running device: the new
#                 version is rolled out one replica at a time (every rotation change logged
#                 keeps 2 of 3 ready), tried and committed; a quote written before is still
#                 there; the receipt on the stick verifies against the device's key (a changed
#                 copy does not), and the stick is mounted read-only again; the replicas'
#                 user cannot read the OTA state or the device key
#   ota-rollback  power off, plug a stick with a bundle whose service crashes, boot: rolled
#                 back automatically, the previous version serves, quotes intact, not retried
#                 (idle on the same result for three scan intervals, one install logged)
#   powercut      hard power cuts of QEMU during an update, the stick still in: one in the
#                 payload after a journal mark (the next boot resumes from it: the receipt's
#                 resumed bytes), one during the rollout or trial; then committed, quotes intact
#   depot         a fleet depot on the host (ota-depot, reached through QEMU's user network,
#                 still restricted: one guestfwd address), a signed rollout plan published to
#                 it, the supervisor told `--depot`: the device polls, installs while
#                 downloading (no bundle on its flash), commits; the depot holds its signed
#                 receipt, its rollout completed, and served the bundle's bytes about once
#
# Each check prints PASS/FAIL with what it measured, then the number of failures; the exit status
# is 0 when every check passed, 1 when one failed (or the device did not boot), 2 when it could not
# start (no image, a missing tool).
#   tests/qemu/run.sh [CHECK...]        (default: all, in the order above)
# Environment: QEMU_HTTP_PORT (default: a free port), KEEP=1 keeps the work directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(boot grow welcome replicas sandbox self-heal oom sigstop persistence grow-resume hang ota ota-rollback powercut depot)

# shellcheck source=image/lib/device.sh
source "$repo/image/lib/device.sh"
device_init "$(mktemp -d /tmp/quote-edge-qemu.XXXXXX)" || exit 2
failures=0

cleanup() {
    stop_qemu
    stop_depot
    if [ "${KEEP:-0}" = 1 ] || [ $failures -gt 0 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

pass() { printf 'PASS %-12s %s\n' "$1" "$2"; }
fail() { printf 'FAIL %-12s %s\n' "$1" "$2"; failures=$((failures + 1)); }

# --- boot: QEMU start -> first answer ---------------------------------------------------------
check_boot() {
    local t0
    flash_card 1024 || { fail boot "the image does not flash as README says (sums, bmaptool copy)"; exit 1; }
    t0=$(now)
    start_qemu keep
    # The deadline is generous: TCG on a loaded 2-core host; the figure is what is reported.
    if wait_for 300 http_ok; then
        pass boot "first answer $(since "$t0") s after starting QEMU (TCG, cortex-a53, aim <= 15 s)"
    else
        fail boot "no answer on $base within 300 s; console: $console"
        tail -20 "$console"
        exit 1
    fi
    wait_for 60 guest true || { fail boot "the guest test shell does not answer"; exit 1; }
    local rss
    rss=$(guest 'for p in $(pidof edge-supervisor quote-service); do awk "/^VmRSS/{print \$2}" /proc/$p/status; done' |
        awk '{s += $1; n++} END {printf "%.1f MiB over %d processes", s / 1024, n}')
    echo "     stack RSS (supervisor + replicas): $rss (aim <= 40 MiB)"
}

# --- grow: the data partition and its file system fill the card -----------------------------
# data_sizes: "partition-end disk partition-bytes fs-bytes" of the data partition, read in the
# guest; the file system's size is its superblock's (df leaves out the journal and inode tables).
data_sizes() {
    guest 'd=/sys/class/block/vda; fs=$(dumpe2fs -h /dev/vda3 2>/dev/null | awk -F: "/^Block count/ {n = \$2} /^Block size/ {s = \$2} END {print n * s}"); echo $(($(cat $d/vda3/start) + $(cat $d/vda3/size))) $(cat $d/size) $(($(cat $d/vda3/size) * 512)) $fs'
}
# grown DISK_SECTORS: the partition ends within 1 MiB of the disk's end and the file system
# is within 2 MiB of the partition (what resize2fs leaves of a last small block group).
grown() {
    local end disk part fs
    read -r end disk part fs <<<"$(data_sizes)"
    [ "$disk" = "$1" ] && [ $((disk - end)) -le 2048 ] && [ $((part - fs)) -le 2097152 ]
}
# grow_steps: what this boot's grow-data did, "partition" and/or "file-system", in order.
grow_steps() {
    guest 'journalctl -b -u quote-edge-grow-data -o cat' |
        sed -n -e 's/^growing \/dev\/.*/partition/p' -e 's/^growing the ext4.*/file-system/p' | paste -sd, -
}
check_grow() {
    local disk sizes steps
    disk=$(($(stat -c %s "$work/disk.img") / 512))
    wait_for 120 guest 'systemctl is-active quote-edge-grow-data' || true
    sizes=$(data_sizes)
    steps=$(grow_steps)
    if grown "$disk" && [ "$(cut -d' ' -f4 <<<"$sizes")" -gt $((256 << 20)) ] && [ "$steps" = partition,file-system ]; then
        pass grow "1 GiB card: data partition now ends at sector $(cut -d' ' -f1 <<<"$sizes") of $disk, ext4 $(($(cut -d' ' -f4 <<<"$sizes") >> 20)) MiB (image: 256 MiB); steps: $steps"
    else
        fail grow "data partition end/disk/partition bytes/fs bytes: $sizes; steps: '$steps'; $(guest 'systemctl status --no-pager quote-edge-grow-data' | tail -5)"
    fi
}

# --- welcome: the console says how to reach the device and what it trusts --------------------
check_welcome() {
    local want=("quote API: http://10.0.2.15:8080/quotes/random" "under QEMU, from the host: $base/quotes/random"
        "trusted update keys" "test-signing.pub: public key 276372dbe336c2e0..." "WARNING: test-signing.pub is the repository's test key")
    local missing=() line
    wait_for 120 guest 'systemctl is-active quote-edge-welcome' || true
    for line in "${want[@]}"; do grep -qF "$line" "$console" || missing+=("$line"); done
    # The admin token: shown at the disk's first boot, pointed at on later ones; root's alone.
    local token mode
    token=$(admin_token)
    mode=$(guest 'stat -c %a:%U:%G /var/lib/quote-edge/admin-token' | tr -d '\r\n')
    [ ${#token} = 64 ] || missing+=("a 64-digit admin token (got ${#token} characters)")
    [ "$mode" = 640:root:quote-replica ] || missing+=("admin token mode 640:root:quote-replica (got $mode)")
    grep -qF "  $token" "$console" || grep -qF 'the admin token is in /var/lib/quote-edge/admin-token (root and the replicas only)' "$console" ||
        missing+=("the admin token or where it is")
    if [ ${#missing[@]} -eq 0 ]; then
        pass welcome "console: $(grep -F -m1 'under QEMU' "$console" | tr -d '
'); $(grep -cF 'trusted update keys' "$console") key listing(s), test key flagged; admin token $mode, $(grep -qF "  $token" "$console" && echo shown || echo pointed at) on the console"
    else
        fail welcome "console lacks: ${missing[*]}"
    fi
}

# --- replicas: 3 distinct X-Served-By ---------------------------------------------------------
check_replicas() {
    local seen
    wait_for 30 all_ready || true
    seen=$(for _ in $(seq 60); do
        curl -s -m 2 -o /dev/null -D - "$base/quotes/random" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-served-by" {print $2}'
    done | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')
    if [ "$(wc -w <<<"$seen")" -ge 3 ]; then
        pass replicas "60 requests served by: $seen"
    else
        fail replicas "60 requests served by only: ${seen:-nobody}"
    fi
}

# Runs a command in the guest as quote-replica (uid/gid 951, no other group): a replica's user.
as_replica="setpriv --reuid=951 --regid=951 --clear-groups --"
# The OTA files quote-replica must not read, each present (root sees it) and refused to that
# user; prints the ones it could read or that are missing, nothing when all is well.
replica_cannot_read_ota() {
    local file out=""
    for file in state.json device.key; do
        out+=$(guest "test -s /var/lib/quote-edge/ota/$file || echo missing:$file
            $as_replica cat /var/lib/quote-edge/ota/$file >/dev/null 2>&1 && echo readable:$file" | tr -d '\r')
    done
    echo "$out"
}

# --- sandbox: the supervisor runs hardened, rated <= 2.5 by systemd-analyze in the guest -----
check_sandbox() {
    local out exposure proc replicas reads
    out=$(guest 'systemd-analyze security --no-pager edge-supervisor.service 2>&1 | tail -1')
    exposure=$(sed -n 's/.*Overall exposure level for edge-supervisor.service: \([0-9.]*\).*/\1/p' <<<"$out")
    # What the kernel says of the running supervisor: its user, no new privileges, a seccomp
    # filter, and CAP_KILL, CAP_SETGID, CAP_SETUID (bits 5-7), CAP_SYS_ADMIN (21) as its whole
    # bounding and ambient sets.
    proc=$(guest 'awk "/^(Uid|NoNewPrivs|Seccomp|CapBnd|CapAmb):/ {printf \"%s%s \", \$1, \$2}" /proc/$(systemctl show -p MainPID --value edge-supervisor)/status')
    # Each replica (every process in the unit's cgroups but the supervisor): its user and its
    # capability sets, one line each.
    replicas=$(guest 'sup=$(systemctl show -p MainPID --value edge-supervisor)
        for pid in $(cat /sys/fs/cgroup/system.slice/edge-supervisor.service/*/cgroup.procs); do
            [ "$pid" = "$sup" ] && continue
            awk "/^(Uid|CapInh|CapPrm|CapEff|CapAmb):/ {printf \"%s%s \", \$1, \$2}" /proc/$pid/status; echo
        done' | tr -d '\r')
    local unprivileged="Uid:951 CapInh:0000000000000000 CapPrm:0000000000000000 CapEff:0000000000000000 CapAmb:0000000000000000"
    # What quote-replica may read: the admin token, yes; ota/'s list, no (its files: the ota
    # check, once an update made them).
    reads=$(guest "$as_replica cat /var/lib/quote-edge/admin-token >/dev/null 2>&1 || echo token-unreadable
        $as_replica ls /var/lib/quote-edge/ota >/dev/null 2>&1 && echo ota-listable
        echo done" | tr -d '\r')
    if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN {exit !(e <= 2.5)}' &&
        grep -q 'Uid:950 ' <<<"$proc" &&
        grep -q 'NoNewPrivs:1 ' <<<"$proc" && grep -q 'Seccomp:2 ' <<<"$proc" &&
        grep -q 'CapBnd:00000000002000e0 ' <<<"$proc" && grep -q 'CapAmb:00000000002000e0 ' <<<"$proc" &&
        [ "$(grep -c . <<<"$replicas")" = 3 ] &&
        [ "$(grep -cF "$unprivileged" <<<"$replicas")" = 3 ] &&
        [ "$reads" = done ] && all_ready; then
        pass sandbox "exposure $exposure (systemd-analyze security in the guest, aim <= 2.5); supervisor: $proc; 3 replicas ready inside it, each $unprivileged; quote-replica reads the admin token, cannot list ota/"
    else
        fail sandbox "exposure '${exposure:-?}' ($out); supervisor: $proc; replicas: $replicas; reads: $reads"
    fi
}

# --- self-heal: kill -9 a replica during a stream of requests --------------------------------
check_self_heal() {
    local pid before after errors total
    pid=$(status_json | json 'd["replicas"][1]["pid"]')
    before=$(status_json | json 'd["replicas"][1]["restarts"]')
    # 4 clients x 100 requests in the background; the kill lands in the middle.
    local clients=()
    for c in 1 2 3 4; do
        (for _ in $(seq 100); do curl -s -m 5 -o /dev/null -w '%{http_code}\n' "$base/quotes/random" || true; done >"$work/heal-$c.log") &
        clients+=($!)
    done
    # The kill must land while requests are in flight: after every client's first answer.
    for c in 1 2 3 4; do
        wait_for 30 test -s "$work/heal-$c.log" || { fail self-heal "client $c got no answer in 30 s"; return; }
    done
    guest "kill -9 $pid"
    wait_for 20 replaced 1 "$pid" || true
    wait "${clients[@]}"
    total=$(cat "$work"/heal-*.log | wc -l)
    errors=$(cat "$work"/heal-*.log | awk '$1 != 200 {n++} END {print n + 0}')
    after=$(status_json | json 'd["replicas"][1]["restarts"], d["replicas"][1]["last_exit"], d["replicas"][1]["ready"]')
    if [ "$errors" = 0 ] && [ "$total" = 400 ] && [ "$(cut -d' ' -f1 <<<"$after")" -gt "$before" ]; then
        pass self-heal "killed replica-1 (pid $pid) under load: $total requests, 0 failed; replica-1 now: restarts/last_exit/ready = $after"
    else
        fail self-heal "killed replica-1 (pid $pid): $total requests, $errors not 200; replica-1: $after"
    fi
}

# --- oom: push a replica's cgroup past memory.max ---------------------------------------------
check_oom() {
    local pid cg max out t0
    pid=$(status_json | json 'd["replicas"][2]["pid"]')
    cg=$(guest "cut -d: -f3 /proc/$pid/cgroup")
    max=$(guest "cat /sys/fs/cgroup$cg/memory.max")
    # A process joins the replica's cgroup (as `kubectl exec` would join the pod) and grows
    # without bound (tail -c keeps up to 1 GiB of a pipe in memory). memory.oom.group=1,
    # set by the supervisor, makes the kernel kill the whole group, the replica included.
    t0=$(now)
    guest "sh -c 'echo \$\$ > /sys/fs/cgroup$cg/cgroup.procs && head -c 1G /dev/zero | tail -c 1G' >/dev/null 2>&1 &"
    if wait_for 120 last_exit_is 2 oom_kill; then
        local killed
        killed=$(since "$t0")
        if ! wait_for 60 replaced 2 "$pid"; then
            fail oom "replica-2 (pid $pid) was OOM-killed but not replaced by a ready one within 60 s: $(status_json | json 'd["replicas"][2]')"
            return
        fi
        out=$(status_json | json 'd["replicas"][2]["last_exit"]["reason"], d["replicas"][2]["pid"], d["replicas"][2]["ready"]')
        pass oom "replica-2 (pid $pid, cgroup $cg, memory.max $max) OOM-killed, seen in status after $killed s, replaced by a ready replica $(since "$t0") s after the push (last_exit, pid, ready: $out); kernel: $(guest "dmesg | grep -c 'Memory cgroup out of memory'") cgroup OOM lines"
    else
        fail oom "replica-2 (pid $pid, memory.max $max): no oom_kill in status: $(status_json | json 'd["replicas"][2]')"
    fi
}

# --- sigstop: systemd's watchdog restarts a hung supervisor ----------------------------------
check_sigstop() {
    local pid n0 t0 n1
    pid=$(guest 'systemctl show -p MainPID --value edge-supervisor')
    n0=$(guest 'systemctl show -p NRestarts --value edge-supervisor')
    t0=$(now)
    guest "kill -STOP $pid"
    if wait_for 40 restarted_since "$n0" &&
        wait_for 40 http_ok; then
        n1=$(guest 'systemctl show -p NRestarts --value edge-supervisor')
        pass sigstop "supervisor pid $pid stopped; restarted by systemd (NRestarts $n0 -> $n1, new pid $(guest 'systemctl show -p MainPID --value edge-supervisor')), serving again $(since "$t0") s later; journal: $(guest 'journalctl -u edge-supervisor -o cat | grep -m1 -i "watchdog timeout"')"
    else
        fail sigstop "supervisor pid $pid stopped: NRestarts still $(guest 'systemctl show -p NRestarts --value edge-supervisor') after 40 s"
    fi
}

# --- persistence: a quote survives a reboot ---------------------------------------------------
check_persistence() {
    local text id b0 b1 got t0 unauth
    text="written before reboot $(date +%s%N)"
    # The network alone cannot write: the token made at first boot is needed (401 without).
    unauth=$(curl -s -m 5 -o /dev/null -w '%{http_code}' -X POST "$base/quotes" -H 'content-type: application/json' \
        -d "{\"text\":\"$text\",\"author\":\"tests/qemu\"}" || true)
    [ "$unauth" = 401 ] || { fail persistence "POST /quotes without the admin token answered $unauth, not 401"; return; }
    id=$(post_quote "$text" tests/qemu) || { fail persistence "POST /quotes with the admin token failed"; return; }
    b0=$(boot_id)
    t0=$(now)
    # --no-block: the shell's answer must come back before systemd takes the machine down.
    guest 'systemctl --no-block reboot' 10 || true
    wait_for 60 http_down || true
    wait_for 120 http_ok && wait_for 60 guest true || { fail persistence "no answer within 180 s of the reboot"; return; }
    b1=$(boot_id)
    got=$(curl -s -m 5 "$base/quotes/$id" | json 'd["text"]' 2>/dev/null || true)
    if [ "$b0" != "$b1" ] && [ "$got" = "$text" ]; then
        pass persistence "quote $id written, guest rebooted (boot id changed), answering again after $(since "$t0") s, quote $id intact"
    else
        fail persistence "quote $id: after reboot got '$got' (boot id $b0 -> $b1)"
    fi
}

# --- grow-resume: a power cut between the partition and the file system ----------------------
check_grow_resume() {
    local text id before after sizes disk
    text="written before the card grew $(date +%s%N)"
    id=$(post_quote "$text") || { fail grow-resume "POST failed"; return; }
    # Flush the quote to the disk image before pulling the plug (a power cut after a sync).
    guest sync
    power_cut
    # What grow-data's first step leaves behind: a larger card, partition 3 grown to its end,
    # the file system not yet.
    truncate -s +512M "$work/disk.img"
    before=$(partition 3 size) &&
        echo ", +" | sfdisk --quiet --no-reread --no-tell-kernel -N 3 "$work/disk.img" >/dev/null &&
        after=$(partition 3 size) || { fail grow-resume "cannot grow partition 3 of the disk image on the host"; return; }
    disk=$(($(stat -c %s "$work/disk.img") / 512))
    start_qemu keep
    wait_for 300 http_ok && wait_for 60 guest true || { fail grow-resume "no answer after the boot"; return; }
    wait_for 120 guest 'systemctl is-active quote-edge-grow-data' || true
    sizes=$(data_sizes)
    local steps
    steps=$(grow_steps)
    if grown "$disk" && [ "$(cut -d' ' -f3 <<<"$sizes")" = $((after * 512)) ] && [ "$steps" = file-system ] && quote_is "$id" "$text"; then
        pass grow-resume "partition grown on the host ($((before / 2048)) -> $((after / 2048)) MiB), file system not: the boot grew only the file system (ext4 now $(($(cut -d' ' -f4 <<<"$sizes") >> 20)) MiB); quote $id intact"
    else
        fail grow-resume "partition $before -> $after sectors on the host; in the guest end/disk/partition/fs: $sizes; steps logged: '$steps'; quote $id: $(curl -s "$base/quotes/$id")"
    fi
}

# --- hang: starve PID 1; the i6300esb must reset the machine ---------------------------------
check_hang() {
    local b0 t0 b1 wd seen action
    b0=$(boot_id)
    # This QEMU start's own QMP log (a watchdog reset keeps the same QEMU), and in it only the
    # events after this line: an earlier check's reset cannot pass this one.
    seen=$(wc -l <"$events" 2>/dev/null || echo 0)
    wd=$(guest 'cat /sys/class/watchdog/watchdog0/identity /sys/class/watchdog/watchdog0/timeout /sys/class/watchdog/watchdog0/state 2>&1 | paste -sd" "')
    t0=$(now)
    # SCHED_FIFO spinners on every CPU with RT throttling off: nothing of normal priority runs
    # again, PID 1 included, so nobody feeds the watchdog. The kernel itself stays up.
    python3 "$device_lib/guest.py" "$shell" --no-wait \
        'echo -1 > /proc/sys/kernel/sched_rt_runtime_us; for c in $(seq 0 $(($(nproc) - 1))); do taskset -c $c chrt -f 99 sh -c "while :; do :; done" & done'
    wait_for 30 http_down || { fail hang "the guest still answers 30 s after starving its CPUs"; return; }
    local hung
    hung=$(since "$t0")
    if wait_for 120 sh -c "tail -n +$((seen + 1)) '$events' | grep -q '\"WATCHDOG\"'" && wait_for 120 http_ok && wait_for 60 guest true; then
        b1=$(boot_id)
        action=$(tail -n +$((seen + 1)) "$events" | grep -m1 '"WATCHDOG"' | json 'd["data"]["action"]' 2>/dev/null || true)
        if [ "$action" = reset ] && [ -n "$b1" ] && [ "$b0" != "$b1" ]; then
            pass hang "watchdog ($wd) fired: QMP WATCHDOG action '$action' (this boot's event); HTTP down after $hung s, serving again after $(since "$t0") s, boot id changed"
        else
            fail hang "a watchdog event, but action '$action' (want reset) and boot id $b0 -> $b1"
        fi
    else
        fail hang "no watchdog reset within 120 s (watchdog: $wd); QMP events: $(tail -3 "$events" | tr '\n' ' ')"
    fi
}

# --- OTA by USB stick --------------------------------------------------------------------------
check_ota() {
    [ -n "$ota_tool" ] || { fail ota "no ota tool (cargo build -p ota)"; return; }
    local text id img t0 receipts mount private
    text="before the update $(date +%s%N)"
    id=$(post_quote "$text") || { fail ota "POST failed"; return; }
    img=$(stick v2 good 2.0.0 2)
    local cursor
    cursor=$(journal_cursor)
    t0=$(now)
    # Plugged into the running device: udev mounts it, the inbox scan finds the bundle.
    plug_stick "$img" || { fail ota "cannot plug the stick in (QMP)"; return; }
    if wait_for 300 update_ended 2.0.0 committed && wait_for 60 all_ready; then
        local releases rotation receipt verified tampered
        releases=$(status_json | json '",".join(sorted(set(r.get("release") or "?" for r in d["replicas"])))')
        mount=$(guest 'findmnt -no OPTIONS -T /run/quote-edge/usb/*/update.bundle' | cut -d, -f1)
        # One replica at a time: every change of the rotation the supervisor logged during the
        # rollout (each one, not a sample) left at least 2 of the 3 replicas ready.
        rotation=$(journal_since "$cursor" | python3 -c '
import re, sys
sizes = [len(re.findall(r"replica-\d+", l)) for l in sys.stdin if "rotation changed" in l]
print(len(sizes), min(sizes) if sizes else 0)')
        pull_stick
        # Read on the host from the stick's own file system: the receipt is on it, and it is
        # signed by this device's key (and a changed copy is refused).
        receipt=$(mdir -b -i "$img" ::/receipts 2>/dev/null | grep 'committed\.receipt$' || true)
        mkdir -p "$work/device-keys"
        guest 'edge-supervisor device-key --data-dir /var/lib/quote-edge' | tr -d '\r' >"$work/device-keys/device.pub"
        verified=no tampered=accepted
        if [ "$(wc -l <<<"$receipt")" = 1 ] && mcopy -n -i "$img" "$receipt" "$work/ota.receipt"; then
            "$ota_tool" receipt verify --device-keys "$work/device-keys" "$work/ota.receipt" >/dev/null && verified=yes
            sed 's/2\.0\.0/2.0.1/' "$work/ota.receipt" >"$work/tampered.receipt"
            "$ota_tool" receipt verify --device-keys "$work/device-keys" "$work/tampered.receipt" >/dev/null 2>&1 ||
                tampered=refused
        fi
        private=$(replica_cannot_read_ota)
        if [ "$(update_field version)" = 2.0.0 ] && [ "$releases" = 2.0.0 ] && quote_is "$id" "$text" &&
            [ "${rotation% *}" -ge 2 ] && [ "${rotation#* }" -ge 2 ] &&
            [ "$verified" = yes ] && [ "$tampered" = refused ] && [ "$mount" = ro ] && [ -z "$private" ]; then
            pass ota "USB stick plugged in: 2.0.0 committed $(since "$t0") s later; replicas run $releases; rotation changed ${rotation% *} times during the rollout, never below ${rotation#* } of 3 ready; quote $id intact; receipt on the stick verified against the device key (a changed copy refused); the stick is mounted $mount again; quote-replica cannot read ota/state.json or ota/device.key"
        else
            fail ota "after commit: version $(update_field version), replicas $releases, rotation (changes, fewest ready): $rotation, quote $id: $(curl -s "$base/quotes/$id"), receipt on the stick: ${receipt:-none} (verified: $verified, changed copy $tampered), mount: $mount, OTA files for quote-replica: ${private:-refused}"
        fi
    else
        fail ota "no commit of 2.0.0: $(status_json | json 'd["update"]')"
    fi
}

check_ota_rollback() {
    [ -n "$ota_tool" ] || { fail ota-rollback "no ota tool"; return; }
    local text id img t0 before
    before=$(update_field version)
    text="before the bad update $(date +%s%N)"
    id=$(post_quote "$text") || { fail ota-rollback "POST failed"; return; }
    img=$(stick v3 crashes 3.0.0 3)
    t0=$(now)
    boot_with "$img" || { fail ota-rollback "the device did not come back with the stick"; return; }
    if wait_for 300 update_ended 3.0.0 rolled_back && wait_for 60 all_ready; then
        local result scan window installs
        result=$(status_json | json 'd["update"]["last_result"]')
        # "Not retried" is an absence: the agent stays idle on the same result for three scan
        # intervals (the bundle is still on the stick, seen at every scan), and this boot's log
        # shows the one install.
        scan=$(scan_seconds)
        window=$((3 * scan))
        if stays "$window" same_result "$result" &&
            installs=$(guest "journalctl -b -u edge-supervisor -o cat | grep -c 'inbox: installing'" | tr -d '\r') &&
            [ "$installs" = 1 ] && [ "$(update_field version)" = "$before" ] && quote_is "$id" "$text"; then
            pass ota-rollback "bundle 3.0.0 (crashes) rolled back $(since "$t0") s after power-on: $(status_json | json 'd["update"]["last_result"]["reason"]'); $before serving, quote $id intact; not retried: idle on the same result for ${window} s (3 scan intervals), 1 install in this boot's log"
        else
            fail ota-rollback "after the rollback: $(status_json | json 'd["update"]'), installs in this boot's log: ${installs:-?} (wanted 1), version $(update_field version) (wanted $before)"
        fi
    else
        fail ota-rollback "after the crashing bundle: $(status_json | json 'd["update"]')"
    fi
}

check_powercut() {
    [ -n "$ota_tool" ] || { fail powercut "no ota tool"; return; }
    local text id img t0 version second resumed
    text="before the power cut $(date +%s%N)"
    id=$(post_quote "$text") || { fail powercut "POST failed"; return; }
    # 32 MiB that do not compress: a journal mark every 4 MiB and an install that lasts.
    img=$(stick v4 good 4.0.0 4 32)
    boot_with "$img" || { fail powercut "the device did not come back with the stick"; return; }
    # Cut 1, in the payload: once a journal mark is on the disk and the slot is `installing`.
    if ! wait_for 300 install_journaled; then
        fail powercut "never saw a journal mark of the install: $(status_json | json 'd["update"]')"
        return
    fi
    t0=$(now)
    power_cut
    start_qemu keep "$img"
    wait_for 300 http_ok && wait_for 60 guest true || { fail powercut "no power-on after the first cut"; return; }
    # The cut landed mid-install, with a mark, and this boot resumed from it (not from zero).
    if ! wait_for 120 boot_resumed; then
        fail powercut "the boot after a cut mid-install did not resume: $(guest "journalctl -b -u edge-supervisor -o cat | grep -i interrupted" | tr -d '\r')"
        return
    fi
    # Cut 2, once the resumed release is on trial: during its rollout, trial or checks (not
    # while snapshotting or switching: a cut before the switch is saved offers the bundle
    # again, a new install that finds the bytes unchanged rather than resumed).
    if ! wait_for 300 update_state_in rolling_out trial checking; then
        fail powercut "the resumed install never reached its rollout: $(status_json | json 'd["update"]')"
        return
    fi
    second=$(update_field state)
    power_cut
    start_qemu keep "$img"
    if wait_for 300 http_ok && wait_for 60 guest true && wait_for 300 update_ended 4.0.0 committed && wait_for 60 all_ready; then
        version=$(update_field version)
        resumed=$(resumed_bytes 4.0.0)
        if quote_is "$id" "$text" && [ "$version" = 4.0.0 ] && [ "${resumed:-0}" -gt 0 ]; then
            pass powercut "cut mid-install after a journal mark, then resumed with $resumed bytes kept (the receipt); cut again while '$second'; 4.0.0 committed $(since "$t0") s after the first cut; quote $id intact"
        else
            fail powercut "after two cuts: version $version, resumed bytes ${resumed:-none}, quote $id: $(curl -s "$base/quotes/$id")"
        fi
    else
        fail powercut "after the second cut ($second): $(status_json | json 'd["update"]' 2>&1)"
    fi
}

check_depot() {
    [ -n "$ota_tool" ] && [ -n "$depot_tool" ] || { fail depot "no ota or ota-depot tool (cargo build -p ota -p ota-depot)"; return; }
    local text id t0 rollout size keys exec_start
    text="before the depot's update $(date +%s%N)"
    id=$(post_quote "$text") || { fail depot "POST failed"; return; }
    keys=$work/depot-keys
    mkdir -p "$keys"
    cp "$repo/ota/keys/test-signing.pub" "$keys/"
    start_depot "$keys" || { fail depot "the depot did not start: $(tail -5 "$work/depot.log")"; return; }
    # 8 MiB that do not compress: several 1 MiB download parts, each through its own connector.
    bundle v5 good 5.0.0 5 8 || { fail depot "cannot pack the bundle"; return; }
    size=$(stat -c %s "$work/v5.bundle")
    "$ota_tool" rollout --key "$repo/ota/keys/test-signing.key" --bundle "$work/v5.bundle" --waves 100% \
        --success-threshold 100 --error-threshold 0 --out "$work/v5.plan" >/dev/null
    rollout=$(depot publish "$work/v5.bundle" "$work/v5.plan") || { fail depot "publish refused"; return; }
    # The device is told where its depot is the way an operator would for one boot: a runtime
    # drop-in (/run) adding --depot to the unit's own command line. The first poll is at start.
    exec_start=$(guest "sed -n 's/^ExecStart=//p' /etc/systemd/system/edge-supervisor.service" | tr -d '\r')
    t0=$(now)
    guest "mkdir -p /run/systemd/system/edge-supervisor.service.d && printf '[Service]\nExecStart=\nExecStart=%s --depot http://10.0.2.100:8088\n' '$exec_start' >/run/systemd/system/edge-supervisor.service.d/depot.conf && systemctl daemon-reload && systemctl restart edge-supervisor" 60 >/dev/null ||
        { fail depot "cannot restart the supervisor with --depot"; return; }
    if wait_for 300 update_ended 5.0.0 committed && wait_for 60 all_ready &&
        wait_for 60 depot_rollout_is "$rollout" completed; then
        local rollout_json served devices magic found copies heads
        rollout_json=$(depot status --json | json "json.dumps([r for r in d['rollouts'] if r['id'] == $rollout][0] | {'devices': d['devices']})")
        served=$(json 'd["bytes_served"]' <<<"$rollout_json")
        devices=$(json 'd["devices"]' <<<"$rollout_json")
        # No copy of the bundle on the device's flash: it went to the slot as it arrived. A
        # copy starts with the bundle's magic bytes; a slot's kept head (*.head) does by
        # design, and must be found (the search works).
        magic=$(head -c 8 "$work/v5.bundle" | od -An -tx1 | tr -d ' \n')
        found=$(guest "find /var/lib/quote-edge -type f | while read -r f; do [ \"\$(head -c 8 \"\$f\" | od -An -tx1 | tr -d ' \\n')\" = $magic ] && echo \"\$f\"; done; true" 60 | tr -d '\r')
        copies=$(grep -v '\.head$' <<<"$found" || true)
        heads=$(grep -c '\.head$' <<<"$found" || true)
        if [ "$(update_field version)" = 5.0.0 ] && quote_is "$id" "$text" && [ -z "$copies" ] && [ "$heads" -ge 1 ] &&
            [ "$devices" = 1 ] && [ "$served" -ge "$size" ] && [ "$served" -lt $((size + 65536)) ]; then
            pass depot "rollout $rollout from a depot on the host: 5.0.0 committed $(since "$t0") s after the supervisor was told --depot; the depot holds the device's signed receipt (rollout completed) and served $served bytes for a $size-byte bundle; no bundle copy on the device's flash (its kept head found: $heads); quote $id intact"
        else
            fail depot "after the depot's rollout: version $(update_field version), depot's rollout: $rollout_json for a $size-byte bundle, bundle copies on flash: ${copies:-none} (kept heads found: $heads), quote $id: $(curl -s "$base/quotes/$id")"
        fi
    else
        fail depot "no commit of 5.0.0 from the depot: device $(status_json | json 'd["update"]'), depot $(depot status --json 2>&1 | head -c 600), its log: $(tail -5 "$work/depot.log")"
    fi
}
# depot_rollout_is ID STATE: the depot's rollout ID is in STATE.
depot_rollout_is() { [ "$(depot status --json | json "[r['state'] for r in d['rollouts'] if r['id'] == $1][0]")" = "$2" ]; }

for c in "${checks[@]}"; do
    [ "$c" = boot ] || [ -n "$qemu_pid" ] || check_boot
    "check_${c//-/_}"
done
echo "$failures check(s) failed"
exit $((failures > 0))
