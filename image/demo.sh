#!/usr/bin/env bash
# The air-gapped demo: boots the device image under QEMU (no network: the guest has no route
# out) and walks a person through what the classroom showed on Kubernetes, on the device:
#
#   boot       power on, first answer, the supervisor as a systemd service
#   scale      3 replicas behind one address; scale to 5 and back (kubectl scale)
#   self-heal  kill -9 of a replica under load: replaced, no client request fails
#   probes     a frozen replica fails its liveness probe: out of rotation, replaced
#   limits     each replica's cgroup v2 limits; one pushed past memory.max is OOM-killed
#   update     a signed bundle on a USB stick plugged into the running device: installed into
#              the other slot, rolled out replica by replica, tried, committed; the receipt
#              is written back to the stick
#   rollback   a bundle whose service crashes: rolled back, the data restored, the trial's rows
#              exported, not retried
#   powercut   the power cut in the middle of an update: it resumes and finishes at the next
#              power-on
#   watchdog   a hung system: the hardware watchdog resets it and it serves again
#
#   image/demo.sh                  every step; on a terminal, Enter moves to the next one
#   image/demo.sh update rollback  some steps (the device boots first in any case)
#   DEMO_PAUSE=0 image/demo.sh     no pauses
#
# Needs what image/README's build made (image/out/quote-edge-qemu-aarch64.img, the aarch64
# binaries in image/out/bin/) and the ota tool (cargo build --release -p ota); everything runs
# offline. Each step says what it expects and whether it happened; the exit status is the
# number of steps where it did not. The QEMU console is in the work directory (printed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=image/lib/device.sh
source "$here/lib/device.sh"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(boot scale self-heal probes limits update rollback powercut watchdog)
all_steps=" boot scale self-heal probes limits update rollback powercut watchdog "
for s in "${steps[@]}"; do
    [[ "$all_steps" == *" $s "* ]] || { echo "demo.sh: no step '$s' (steps:$all_steps)" >&2; exit 2; }
done
device_init "$(mktemp -d /tmp/quote-edge-demo.XXXXXX)" || exit 2
[ -n "$ota_tool" ] || { echo "demo.sh: no ota tool (cargo build --release -p ota, or OTA=PATH)" >&2; exit 2; }
pause=${DEMO_PAUSE:-$([ -t 0 ] && echo 1 || echo 0)}
missed=0
trap 'stop_qemu; echo; echo "work directory (console log, sticks): $work"' EXIT

bold=$([ -t 1 ] && printf '\033[1m' || true) dim=$([ -t 1 ] && printf '\033[2m' || true) off=$([ -t 1 ] && printf '\033[0m' || true)
# title TEXT: a step begins.
title() {
    if [ "$pause" = 1 ]; then read -r -p "${dim}(Enter: next step)${off}" _ </dev/tty || true; fi
    printf '\n%s== %s ==%s\n' "$bold" "$1" "$off"
}
# say TEXT...: narration, wrapped.
say() { printf '%s\n' "$*" | fold -s -w 96; }
# run_guest CMD: show a command as typed on the device, then its output.
run_guest() { printf '%sdevice# %s%s\n' "$dim" "$1" "$off"; guest "$1" "${2:-30}" | sed 's/^/  /' || true; }
es() { run_guest "edge-supervisor $1 --data-dir /var/lib/quote-edge"; }
# expect OK TEXT: the step's verdict.
expect() {
    if [ "$1" = 0 ]; then printf '  %s-> as expected:%s %s\n' "$bold" "$off" "$2"; else
        printf '  %s-> NOT as expected:%s %s\n' "$bold" "$off" "$2"; missed=$((missed + 1)); fi
}
# spread N: N requests, counted by the replica that answered.
spread() {
    for _ in $(seq "$1"); do served_by; done | sort | uniq -c | awk '{printf "%s: %s  ", $2, $1}'
    echo
}
# load_start N: N clients in the background, each sending requests until load_end (at most
# $load_max each), and returns once every client has its first answer: what follows happens
# under load. load_end stops them, waits, and sets $load_total, $load_failed and $load_spanned
# (yes when no client ran out of requests before the stop: the load covered the whole step).
# Not in a subshell: only this shell can wait for its children.
load_max=3000
load_start() {
    rm -f "$work"/load-*.log "$work/load.stop"
    load_pids=()
    for c in $(seq "$1"); do
        (for _ in $(seq "$load_max"); do
            [ -e "$work/load.stop" ] && break
            curl -s -m 5 -o /dev/null -w '%{http_code}\n' "$base/quotes/random" || true
        done >"$work/load-$c.log") &
        load_pids+=($!)
    done
    for c in $(seq "$1"); do wait_for 30 test -s "$work/load-$c.log" || true; done
}
load_end() {
    touch "$work/load.stop"
    wait "${load_pids[@]}"
    load_total=$(cat "$work"/load-*.log | wc -l)
    load_failed=$(cat "$work"/load-*.log | awk '$1 != 200 {n++} END {print n + 0}')
    load_spanned=yes
    for log in "$work"/load-*.log; do [ "$(wc -l <"$log")" -lt "$load_max" ] || load_spanned=no; done
}
# replicas_serving N: how many distinct replicas answered N requests.
replicas_serving() { for _ in $(seq "$1"); do served_by; done | sort -u | grep -c . || true; }
replica_field() { status_json | json "d['replicas'][$1]['$2']"; }
# follow_update VERSION RESULT SECONDS: print each new state of the agent until its last
# result is RESULT for VERSION.
follow_update() {
    local deadline last="" line
    deadline=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        line=$(status_json 2>/dev/null | json "d['update']['state'] + (' ' + str(d['update'].get('progress')) if d['update'].get('progress') else '') + ('' if d['update']['state'] != 'idle' else ' (last result: ' + str((d['update'].get('last_result') or {}).get('result')) + ' ' + str((d['update'].get('last_result') or {}).get('version')) + ')')" 2>/dev/null) || line=""
        if [ -n "$line" ] && [ "$line" != "$last" ]; then
            printf '  %6.1f s  %s\n' "$(since "$t0")" "$line"
            last=$line
        fi
        update_ended "$1" "$2" 2>/dev/null && return 0
        sleep 0.3
    done
    return 1
}

step_boot() {
    title "Power on"
    say "An embedded device boots: systemd starts the supervisor (a Type=notify unit with a" \
        "watchdog), which starts 3 replicas of the quote service on the SQLite database on flash." \
        "QEMU emulates an aarch64 Cortex-A53 in software, so everything is slower than on a Pi."
    t0=$(now)
    start_qemu
    if wait_for 300 http_ok && wait_for 60 guest true; then
        expect 0 "first HTTP answer $(since "$t0") s after power-on"
    else
        expect 1 "no answer within 300 s (console: $console)"; exit 1
    fi
    run_guest 'systemctl status edge-supervisor --no-pager -n 0 | head -4'
    es status
    run_guest 'for p in $(pidof edge-supervisor quote-service); do awk "/^VmRSS/{print \$2}" /proc/$p/status; done | awk "{s += \$1} END {printf \"whole stack: %.1f MiB RSS\\n\", s / 1024}"'
}

step_scale() {
    title "Scaling (kubectl scale)"
    say "One address, several replicas: each request may land on another replica; the data is" \
        "the same because they share one database. 12 requests:"
    spread 12
    es "scale 5"
    local ok=1 five three
    wait_for 60 ready_count_is 5 && ok=0
    say "5 replicas ready; 20 requests:"
    spread 20
    five=$(replicas_serving 30)
    es "scale 3"
    wait_for 60 ready_count_is 3 || ok=1
    three=$(replicas_serving 18)
    { [ "$five" = 5 ] && [ "$three" = 3 ]; } || ok=1
    expect $ok "scaled to 5 and back to 3 replicas; distinct replicas answering: $five of 5, then $three of 3"
}

step_self_heal() {
    title "Self-healing (a pod dies, the ReplicaSet recreates it)"
    local pid before
    pid=$(replica_field 1 pid)
    before=$(replica_field 1 restarts)
    say "4 clients send requests; once each has its first answer, replica-1 (pid $pid) is killed" \
        "with kill -9."
    load_start 4
    run_guest "kill -9 $pid"
    local ok=0
    wait_for 20 replaced 1 "$pid" || ok=1
    load_end
    es status
    { [ "$load_failed" = 0 ] && [ "$(replica_field 1 restarts)" -gt "$before" ]; } || ok=1
    expect $ok "$load_total requests, $load_failed failed: a refused connection is retried on another replica; replica-1 replaced by a ready one (new pid $(replica_field 1 pid))"
}

step_probes() {
    title "Liveness and readiness probes"
    say "Readiness decides whether a replica gets traffic; liveness whether it is restarted." \
        "A replica frozen with SIGSTOP still holds its port but answers nothing: its probes time" \
        "out, it leaves the rotation (readiness), and after the liveness threshold it is replaced." \
        "As behind a Kubernetes Service, requests already sent to it are lost; the next ones go" \
        "to the other replicas."
    local pid t1 cursor out
    pid=$(replica_field 2 pid)
    cursor=$(journal_cursor)
    load_start 2
    t0=$(now)
    run_guest "kill -STOP $pid"
    if wait_for 30 last_exit_is 2 liveness && t1=$(since "$t0") && wait_for 30 replaced 2 "$pid"; then
        load_end
        es status
        # Out of rotation before the restart: the supervisor logs every change of the rotation.
        out=$(journal_since "$cursor" | grep 'rotation changed' | grep -vc 'replica-2' || true)
        [ "$out" -gt 0 ] || { expect 1 "replica-2 was restarted but never left the rotation (no rotation change without it was logged)"; return; }
        expect 0 "replica-2 left the rotation (readiness; logged), was restarted for liveness ${t1} s after the freeze and replaced by a ready one; of $load_total requests from 2 clients, $load_failed were inside the frozen replica and failed"
    else
        load_end
        expect 1 "replica-2 (pid $pid) frozen: not out of rotation, restarted for liveness and replaced: $(status_json | json 'd["replicas"][2]')"
    fi
}

step_limits() {
    title "Requests and limits (cgroup v2)"
    say "Each replica runs in its own cgroup under the supervisor's unit (Delegate=yes): a memory" \
        "limit and a CPU quota, like a pod's limits. This is replica-0's:"
    local pid cg t1
    pid=$(replica_field 0 pid)
    cg=$(guest "cut -d: -f3 /proc/$pid/cgroup")
    run_guest "cd /sys/fs/cgroup$cg && grep . memory.max cpu.max pids.max memory.oom.group memory.current"
    say "A process joins that cgroup (as kubectl exec would) and grows without bound. The kernel" \
        "kills the whole group; the supervisor reports oom_kill and starts a replacement."
    t0=$(now)
    guest "sh -c 'echo \$\$ > /sys/fs/cgroup$cg/cgroup.procs && head -c 1G /dev/zero | tail -c 1G' >/dev/null 2>&1 &"
    if wait_for 120 last_exit_is 0 oom_kill; then
        t1=$(since "$t0")
        local ok=0
        wait_for 60 replaced 0 "$pid" || ok=1
        es status
        expect $ok "replica-0 OOM-killed by the kernel, reported as oom_kill after $t1 s, replaced by a ready one (pid $(replica_field 0 pid))"
    else
        expect 1 "no oom_kill reported for replica-0"
    fi
}

step_update() {
    title "An offline update from a USB stick"
    local img id text releases receipts
    img=$(stick v2 good 2.0.0 2)
    say "On a USB stick: $("$ota_tool" inspect --json "$work/v2.bundle" | json '"bundle %s %s (security version %s, %s bytes: %s), signed (Ed25519) by key %s" % (d["product"], d["version"], d["security_version"], d["bundle_bytes"], ", ".join(f["path"] for f in d["files"]), ", ".join(d["signatures"]))')."
    text="written before the update $(date +%s)"
    id=$(post_quote "$text")
    say "Quote $id is written first. Then the stick goes in while 2 clients keep sending requests." \
        "The agent verifies signatures and hashes before writing a byte, installs into the other" \
        "slot, snapshots the database, replaces the replicas one at a time (a new one ready" \
        "before an old one stops: readiness at work), tries the new release, then commits."
    load_start 2
    t0=$(now)
    plug_stick "$img"
    local ok=0
    { follow_update 2.0.0 committed 300 && wait_for 60 all_ready; } || ok=1
    load_end
    releases=$(status_json | json '",".join(sorted(set(r.get("release") or "?" for r in d["replicas"])))')
    es status
    say "The install receipt, signed by the device's own key, is written back to the stick (remounted" \
        "read-write for that one write, then read-only again):"
    run_guest 'ls /run/quote-edge/usb/*/receipts/; findmnt -no TARGET,OPTIONS -T /run/quote-edge/usb/*/update.bundle'
    pull_stick
    receipts=$(mdir -b -i "$img" ::/receipts 2>/dev/null | grep -c 'committed\.receipt$' || true)
    { [ "$releases" = 2.0.0 ] && quote_is "$id" "$text" && [ "$load_failed" = 0 ] && [ "$load_spanned" = yes ] &&
        [ "$receipts" = 1 ]; } || ok=1
    expect $ok "2.0.0 committed $(since "$t0") s after the stick went in; replicas run $releases; quote $id intact; $load_total requests from before the stick went in until after the commit (the load spanned the rollout: $load_spanned), $load_failed failed; receipts on the stick, read back on this machine: $receipts"
}

step_rollback() {
    title "A bad update is rolled back"
    local img id text before
    before=$(update_field version)
    img=$(stick v3 crashes 3.0.0 3)
    text="written before the bad update $(date +%s)"
    id=$(post_quote "$text")
    say "Bundle 3.0.0 is signed and valid, but its service exits at start. The new replicas never" \
        "get ready, so the trial fails: every replica stops, the database is restored from the" \
        "snapshot (rows written since are exported beside it), and $before starts again."
    local exports0 exports1 result cursor window installs
    exports0=$(guest 'ls /var/lib/quote-edge/db/*.jsonl 2>/dev/null | wc -l' | tr -dc 0-9)
    cursor=$(journal_cursor)
    t0=$(now)
    plug_stick "$img"
    local ok=0
    { follow_update 3.0.0 rolled_back 300 && wait_for 60 all_ready; } || ok=1
    say "The agent's last result (edge-supervisor status --json, .update.last_result), and the" \
        "export of the rows written during the trial:"
    status_json | json 'd["update"]["last_result"]' | sed 's/^/  /' || true
    run_guest 'ls -l /var/lib/quote-edge/db/'
    exports1=$(guest 'ls /var/lib/quote-edge/db/*.jsonl 2>/dev/null | wc -l' | tr -dc 0-9)
    # Not retried: the stick stays in for three scan intervals; the agent stays idle on the same
    # result, and the log shows one install since the stick went in.
    result=$(status_json | json 'd["update"]["last_result"]')
    window=$((3 * $(scan_seconds)))
    stays "$window" same_result "$result" || ok=1
    installs=$(journal_since "$cursor" | grep -c 'inbox: installing' || true)
    pull_stick
    { [ "$(update_field version)" = "$before" ] && quote_is "$id" "$text" && [ "$exports1" -gt "$exports0" ] &&
        [ "$installs" = 1 ]; } || ok=1
    expect $ok "3.0.0 rolled back after $(since "$t0") s; $before serves again; quote $id intact; the trial's rows exported ($exports0 -> $exports1 exports); not retried: idle on the same result for $window s with the stick in, $installs install logged"
}

step_powercut() {
    title "A power cut in the middle of an update"
    local img id text resumed
    img=$(stick v4 good 4.0.0 4 32)
    text="written before the power cut $(date +%s)"
    id=$(post_quote "$text")
    say "Stick with 4.0.0 in (32 MiB more than before); once the agent has written part of it and" \
        "journaled how far it got, the power goes (QEMU is killed: no shutdown, no cache flush)."
    plug_stick "$img"
    local ok=0
    wait_for 300 install_journaled || ok=1
    run_guest 'grep -o "\"status\": *\"installing\"" /var/lib/quote-edge/ota/state.json; ls -l /var/lib/quote-edge/ota/install.journal'
    power_cut
    say "Power on again, the stick still in: the install resumes from its last journal mark."
    t0=$(now)
    start_qemu keep "$img"
    wait_for 300 http_ok && wait_for 60 guest true || ok=1
    wait_for 120 boot_resumed || ok=1
    run_guest "journalctl -b -u edge-supervisor -o cat | grep -i 'interrupted install'"
    { follow_update 4.0.0 committed 300 && wait_for 60 all_ready && quote_is "$id" "$text"; } || ok=1
    resumed=$(resumed_bytes 4.0.0)
    [ "${resumed:-0}" -gt 0 ] || ok=1
    expect $ok "cut mid-install after a journal mark; the next power-on resumed with ${resumed:-no} bytes kept (the signed receipt says) and finished: $(update_field version) committed, quote $id intact"
}

step_watchdog() {
    title "A hung system and the hardware watchdog"
    local b0 b1
    b0=$(boot_id)
    run_guest 'cat /sys/class/watchdog/watchdog0/identity; systemctl show -p RuntimeWatchdogUSec'
    say "Real-time spinners take every CPU: nothing else runs, not even systemd (PID 1), so nobody" \
        "feeds the i6300esb watchdog. It resets the machine, which boots and serves again."
    t0=$(now)
    local seen
    seen=$(wc -l <"$events")
    python3 "$device_lib/guest.py" "$shell" --no-wait \
        'echo -1 > /proc/sys/kernel/sched_rt_runtime_us; for c in $(seq 0 $(($(nproc) - 1))); do taskset -c $c chrt -f 99 sh -c "while :; do :; done" & done'
    wait_for 30 http_down || true
    say "Hung after $(since "$t0") s; waiting for the watchdog..."
    if wait_for 180 http_ok && wait_for 60 guest true; then
        b1=$(boot_id)
        local ok=0
        local action
        action=$(tail -n +"$((seen + 1))" "$events" | grep -m1 '"WATCHDOG"' | json 'd["data"]["action"]' 2>/dev/null || true)
        { [ "$b0" != "$b1" ] && [ "$action" = reset ]; } || ok=1
        expect $ok "reset by the watchdog (QEMU's event: ${action:-none}; boot id changed: $([ "$b0" != "$b1" ] && echo yes || echo no)), serving again $(since "$t0") s after the hang"
    else
        expect 1 "no answer within 180 s of the hang"
    fi
}

printf '%squote-edge: the air-gapped demo%s (work directory %s; the device answers on %s)\n' "$bold" "$off" "$work" "$base"
step_boot
for s in "${steps[@]}"; do
    [ "$s" = boot ] || "step_${s//-/_}"
done
printf '\n%s%d step(s) not as expected%s\n' "$bold" "$missed" "$off"
exit "$missed"
