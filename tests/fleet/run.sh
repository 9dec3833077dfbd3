#!/usr/bin/env bash
# The fleet, proven with several hosts: one ota-depot container and DEVICES device containers
# (the static edge-supervisor and quote-service, FROM scratch, each with its own data
# directory) on a private Docker network with no route out. Prints PASS/FAIL per step and a
# closing "N passed, N failed"; exits 1 if any step failed.
#
#   tests/fleet/run.sh        (as root, with a docker daemon; QUOTE_EDGE_FLEET_DEVICES=12,
#                             DEPOT_LOAD=a built tests/src/bin/depot-load, else it is built)
#
# Steps: a good release through waves 1,25%,100% (no wave opens before its gate); a release
# that crashes, stopped at the canary (nobody else downloads a byte, the canary's quotes
# intact); tampered bundles and plans refused at publish; a depot that serves a tampered
# bundle anyway, refused by the device; a 24 MiB release with devices cut off mid-download
# (docker network disconnect) and the depot killed with SIGKILL mid-rollout, resumed and
# completed; a device's real report captured and sent again, and forged with another key,
# refused (the rules of signed requests are unit-tested in crates/ota-depot/tests/depot.rs).
#
# Everything it creates is named qe-fleet-$$ and removed on exit. Waits poll a condition
# against a deadline (there is no event to wait on across containers); the times measured are
# printed, not judged.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
# shellcheck source=image/lib/need.sh
source image/lib/need.sh
need curl:curl python3:python3 musl-gcc:musl-tools file:file
command -v docker >/dev/null || { echo "docker is missing" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "the docker daemon does not answer (docker info failed)" >&2; exit 1; }
devices=${QUOTE_EDGE_FLEET_DEVICES:-12}
target=x86_64-unknown-linux-musl
if command -v rustup >/dev/null && ! grep -qxF "$target" <<<"$(rustup target list --installed)"; then
    echo "the Rust target $target is not installed; install it with: rustup target add $target" >&2
    exit 1
fi

# Static binaries: the device's two (without the cluster's PostgreSQL client, as on the
# device), the depot and the release tool.
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
cargo build --locked --release --target "$target" -p edge-supervisor -p quote-service --no-default-features
cargo build --locked --release --target "$target" -p ota-depot -p ota
# The host's replayer (tests/src/bin/depot-load.rs): requests sent exactly as captured. CI
# passes the one its test pass built (DEPOT_LOAD).
load=${DEPOT_LOAD:-}
if [ -z "$load" ]; then
    cargo build --locked -p tests --bin depot-load
    load=${CARGO_TARGET_DIR:-target}/debug/depot-load
fi
bin=${CARGO_TARGET_DIR:-target}/$target/release
for b in edge-supervisor quote-service ota-depot ota; do
    file -b "$bin/$b" | grep -Eq 'static(-pie)? linked|statically linked' ||
        { echo "$bin/$b is not statically linked" >&2; exit 1; }
done

run=qe-fleet-$$
net=$run
work=$(mktemp -d /tmp/qe-fleet.XXXXXX)
failed=0 passed=0
cleanup() {
    local ids
    ids=$(docker ps -aq --filter "name=^$run-" 2>/dev/null || true)
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
    docker rmi "$run-device" "$run-depot" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
pass() { printf 'PASS  %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failed=$((failed + 1)); }
info() { printf '      %s\n' "$*"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
# until_true DEADLINE_S CMD...: polls CMD every 0.2 s until it succeeds or the deadline passes.
until_true() {
    local deadline=$1 end
    shift
    end=$(python3 -c "import sys; print(float(sys.argv[1]) + float(sys.argv[2]))" "$(now)" "$deadline")
    until "$@"; do
        python3 -c "import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]))" "$(now)" "$end" || return 1
        sleep 0.2
    done
}
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }

# The release key (made here, for this run only) and the releases.
"$bin/ota" keygen --out "$work/release" >/dev/null
printf 'int main(void) { return 3; }\n' >"$work/crash.c"
musl-gcc -static -Os -o "$work/crash" "$work/crash.c"
# release VERSION KIND [MiB of incompressible data] -> a signed bundle at $work/VERSION.bundle
release() {
    local dir=$work/rel-$1
    mkdir -p "$dir/bin"
    case $2 in
        good) install -m 0755 "$bin/quote-service" "$dir/bin/quote-service" ;;
        crash) install -m 0755 "$work/crash" "$dir/bin/quote-service" ;;
    esac
    echo "$1" >"$dir/VERSION"
    if [ "${3:-0}" -gt 0 ]; then
        mkdir -p "$dir/share"
        head -c "$(($3 << 20))" /dev/urandom >"$dir/share/data.bin"
    fi
    "$bin/ota" pack --key "$work/release.key" --version "$1" --security-version "${1%%.*}" \
        --level 3 --out "$work/$1.bundle" "$dir" >/dev/null
}
# plan VERSION WAVES -> $work/VERSION.plan
plan() {
    "$bin/ota" rollout --key "$work/release.key" --bundle "$work/$1.bundle" --waves "$2" \
        --success-threshold 90 --error-threshold 10 --out "$work/$1.plan" >/dev/null
}
# The bundle's manifest digest, as its signed plan names it.
digest_of() { sed -n 2p "$work/$1.plan" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bundle"])'; }

# The images, FROM scratch: no shell, no libc, only what the programs need.
mkdir -p "$work/device/bin" "$work/device/etc/quote-edge/keys" "$work/device/data" "$work/depot/bin" "$work/depot/keys"
install -m 0755 "$bin/edge-supervisor" "$bin/quote-service" "$work/device/bin/"
cp "$work/release.pub" "$work/device/etc/quote-edge/keys/"
cat >"$work/device/etc/quote-edge/supervisor.toml" <<'EOF'
listen = "0.0.0.0:8080"
admin_listen = ""
data_dir = "/data"
replicas = 2
trusted_keys = "/etc/quote-edge/keys"
[ota]
depot = "http://depot:8088"
poll_interval = "2s"
trial = "2s"
EOF
printf 'FROM scratch\nCOPY bin/ /bin/\nCOPY etc/ /etc/\nCOPY data/ /data/\nENTRYPOINT ["/bin/edge-supervisor", "run", "--config", "/etc/quote-edge/supervisor.toml"]\n' \
    >"$work/device/Dockerfile"
install -m 0755 "$bin/ota-depot" "$work/depot/bin/"
cp "$work/release.pub" "$work/depot/keys/"
printf 'FROM scratch\nCOPY bin/ /bin/\nCOPY keys/ /keys/\nENTRYPOINT ["/bin/ota-depot", "serve", "--listen", "0.0.0.0:8088", "--data-dir", "/data", "--trusted-keys", "/keys"]\n' \
    >"$work/depot/Dockerfile"
docker build --quiet --tag "$run-device" "$work/device" >/dev/null
docker build --quiet --tag "$run-depot" "$work/depot" >/dev/null

# --internal: no route out, as the depot's network in a workshop.
docker network create --internal "$net" >/dev/null
mkdir -p "$work/depot-data"
docker run -d --name "$run-depot" --network "$net" --network-alias depot \
    -v "$work/depot-data:/data" "$run-depot" >/dev/null
depot_answers() { curl -sf -m 2 "http://$(ip_of "$run-depot"):8088/healthz" >/dev/null; }
until_true 60 depot_answers || { docker logs "$run-depot" 2>&1 | tail; echo "the depot did not start" >&2; exit 1; }
url() { echo "http://$(ip_of "$run-depot"):8088"; }
status_json() { curl -sf -m 5 "$(url)/api/v1/status"; }
# q PYTHON-EXPRESSION: evaluated with `s` the depot's status and `r` its newest rollout.
q() { status_json | python3 -c "import json,sys; s=json.load(sys.stdin); r=(s['rollouts'] or [None])[0]; print($1)"; }
publish() {
    "$bin/ota-depot" publish --depot "$(url)" --token-file "$work/depot-data/admin.token" "$@"
}
depot_cli() { "$bin/ota-depot" "$1" --depot "$(url)" --token-file "$work/depot-data/admin.token" "${@:2}"; }

started=$(now)
names=()
for i in $(seq -w 1 "$devices"); do
    names+=("$run-dev$i")
    docker run -d --name "$run-dev$i" --hostname "dev$i" --network "$net" "$run-device" >/dev/null
done
enrolled() { [ "$(q "s['devices']")" = "$devices" ]; }
if until_true 120 enrolled; then
    pass "$devices devices (FROM scratch, static binaries) enrolled with the depot in $(since "$started") s"
else
    fail "$devices devices enrolled: the depot knows $(q "s['devices']")"
    for n in "${names[@]:0:2}"; do docker logs "$n" 2>&1 | tail -5; done
    exit 1
fi
# Each device's id (its device key's), to name it in the depot's status.
declare -A id_of=() name_of=()
for n in "${names[@]}"; do
    id=$(docker exec "$n" /bin/edge-supervisor device-key --data-dir /data | awk '{print $NF}')
    id_of[$n]=$id
    name_of[$id]=$n
done
# One quote written on every device, to be read back after what happens to it.
declare -A quote_of=()
for n in "${names[@]}"; do
    body=$(curl -s -m 5 -H 'content-type: application/json' \
        -d "{\"text\":\"Written on $n before the fleet's updates.\",\"author\":\"fleet test\"}" \
        "http://$(ip_of "$n"):8080/quotes" || true)
    quote_of[$n]=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$body" 2>/dev/null || echo "")
done

# 1. A good release through waves 1,25%,100%: every status sampled holds the gate.
release 2.0.0 good
plan 2.0.0 1,25%,100%
t=$(now)
rollout=$(publish "$work/2.0.0.bundle" "$work/2.0.0.plan" 2>/dev/null)
gate_log=$work/gates.log
: >"$gate_log"
sample() {
    status_json | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = [r for r in s["rollouts"] if r["id"] == int(sys.argv[1])][0]
w = r["waves"]
for i in range(1, len(w)):
    if w[i]["state"] != "waiting":
        size = sum(x["size"] for x in w[:i]); done = sum(x["committed"] for x in w[:i])
        if done * 100 < size * 90:
            print("VIOLATION wave", i, "open with", done, "of", size, "committed before it")
print(r["state"], " ".join(f"{x['"'"'state'"'"']}:{x['"'"'committed'"'"']}/{x['"'"'size'"'"']}" for x in w))
' "$rollout" >>"$gate_log"
    tail -1 "$gate_log" | grep -q '^completed'
}
if until_true 400 sample && ! grep -q VIOLATION "$gate_log"; then
    pass "2.0.0 reached all $devices devices through waves 1,25%,100% in $(since "$t") s; no wave opened before its gate ($(wc -l <"$gate_log") statuses sampled)"
    info "waves as sampled: $(uniq <"$gate_log" | cut -d' ' -f2- | tr '\n' '|' | head -c 400)"
else
    fail "2.0.0 through waves: $(tail -1 "$gate_log"); $(grep -c VIOLATION "$gate_log" || true) violations"
fi
running() { [ "$(q "sum(1 for d in s['fleet'] if d['version'] == '$1')")" = "$devices" ]; }
if until_true 60 running 2.0.0; then
    pass "every device runs 2.0.0 (its own poll says so)"
else
    fail "every device runs 2.0.0: $(q "[d['version'] for d in s['fleet']]")"
fi

# 2. A release that crashes on start: the canary rolls back, the rollout halts, nobody else
#    downloads a byte of it, the canary's quotes are intact.
release 3.0.0 crash
plan 3.0.0 1,25%,100%
rollout=$(publish "$work/3.0.0.bundle" "$work/3.0.0.plan" 2>/dev/null)
crash_digest=$(digest_of 3.0.0)
halted() { [ "$(q "r['state']")" = halted ]; }
if until_true 300 halted; then
    canary=$(q "[m['device'] for m in r['members'] if m['wave'] == 0][0]")
    pass "3.0.0 crashed on the canary (${name_of[$canary]#"$run-"}), was rolled back and the rollout halted: $(q "r['reason']")"
    downloaders=$(docker logs "$run-depot" 2>&1 | grep 'bundle served' | grep "digest=$crash_digest" |
        sed -n 's/.*downloader=Some("\([0-9a-f]*\)").*/\1/p' | sort -u | tr '\n' ' ')
    if [ "$downloaders" = "$canary " ]; then
        pass "no other device downloaded a byte of 3.0.0 (only the canary asked, $(q "r['bytes_served']") bytes)"
    else
        fail "only the canary downloaded 3.0.0: downloaders were: $downloaders"
    fi
    cn=${name_of[$canary]}
    back() { [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://$(ip_of "$cn"):8080/quotes/${quote_of[$cn]}")" = 200 ]; }
    if until_true 60 back; then
        pass "the canary serves again, its quote #${quote_of[$cn]} intact"
    else
        fail "the canary's quote after the rollback"
    fi
else
    fail "3.0.0 halted: $(q "r['state'], r['waves']")"
fi
depot_cli abort "$rollout" >/dev/null

# 3. Tampered bundles and plans are refused at publish.
release 4.0.0 good
plan 4.0.0 1,100%
cp "$work/4.0.0.bundle" "$work/bad.bundle"
size=$(stat -c %s "$work/bad.bundle")
printf '\xff' | dd of="$work/bad.bundle" bs=1 seek=$((size - 100)) conv=notrunc status=none
set +e
out=$(publish "$work/bad.bundle" "$work/4.0.0.plan" 2>&1); code=$?
set -e
if [ $code = 3 ] && grep -q 'the bundle is refused' <<<"$out"; then
    pass "a bundle with one byte changed is refused at publish (exit 3: $(grep -o 'the bundle is refused: [^(]*' <<<"$out" | head -c 120))"
else
    fail "a tampered bundle at publish: exit $code: $out"
fi
sed 's/"success_threshold":90/"success_threshold":1/' "$work/4.0.0.plan" >"$work/bad.plan"
set +e
out=$(publish "$work/4.0.0.bundle" "$work/bad.plan" 2>&1); code=$?
set -e
if [ $code = 3 ] && grep -q 'signed by 0' <<<"$out"; then
    pass "a plan edited after signing is refused at publish (exit 3)"
else
    fail "a tampered plan at publish: exit $code: $out"
fi

# 4. A hostile depot serves a tampered bundle anyway (its file changed on disk after it was
#    verified): the canary refuses it chunk by chunk, keeps running 2.0.0, reports the refusal.
token=$(cat "$work/depot-data/admin.token")
curl -sf -m 60 -H "Authorization: Bearer $token" -H 'expect:' --data-binary "@$work/4.0.0.bundle" \
    "$(url)/api/v1/bundles" >/dev/null
served_file=$work/depot-data/bundles/$(digest_of 4.0.0).bundle
printf '\xff' | dd of="$served_file" bs=1 seek=$((size - 100)) conv=notrunc status=none
rollout=$(curl -sf -m 10 -H "Authorization: Bearer $token" --data-binary "@$work/4.0.0.plan" \
    "$(url)/api/v1/rollouts" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
if until_true 300 halted; then
    canary=$(q "[m['device'] for m in r['members'] if m['wave'] == 0][0]")
    state=$(q "[m['state'] for m in r['members'] if m['wave'] == 0][0]")
    version=$(q "[d['version'] for d in s['fleet'] if d['id'] == '$canary'][0]")
    if [ "$state" = refused ] && [ "$version" = 2.0.0 ]; then
        pass "a tampered bundle served anyway is refused by the device (reported: $state; it runs $version)"
    else
        fail "the device refuses a tampered bundle: canary reported $state, runs $version"
    fi
else
    fail "the tampered 4.0.0 halted: $(q "r['state'], r['waves']")"
fi
depot_cli abort "$rollout" >/dev/null

# 5. A 24 MiB release to everyone at once; 4 devices cut off mid-download, the depot killed
#    with SIGKILL mid-rollout; all resume and commit, re-downloading at most one 1 MiB chunk.
#    The depot gets 1% of a CPU, so that downloads last long enough to be cut in the middle.
release 5.0.0 good 24
plan 5.0.0 100%
size=$(stat -c %s "$work/5.0.0.bundle")
t=$(now)
since_ts=$(date -u +%FT%T.%NZ)
rollout=$(publish "$work/5.0.0.bundle" "$work/5.0.0.plan" 2>/dev/null)
docker update --cpus 0.01 "$run-depot" >/dev/null
cut=("${names[@]:0:4}")
# Downloading: the depot logs a part served to each of them.
downloading() {
    local n log
    log=$(docker logs --since "$since_ts" "$run-depot" 2>&1 | grep 'bundle served')
    for n in "${cut[@]}"; do grep -q "downloader=Some(\"${id_of[$n]}\")" <<<"$log" || return 1; done
}
until_true 120 downloading || info "not every device to cut had started downloading"
for n in "${cut[@]}"; do docker network disconnect "$net" "$n"; done
committed_before=$(q "sum(1 for m in r['members'] if m['state'] == 'committed')")
docker kill -s KILL "$run-depot" >/dev/null
docker start "$run-depot" >/dev/null
until_true 60 depot_answers || fail "the depot restarted"
committed_after=$(q "sum(1 for m in r['members'] if m['state'] == 'committed')")
if [ "$(q "r['id']")" = "$rollout" ] && [ "$(q "r['state'] in ('running', 'completed')")" = True ] &&
    [ "$committed_after" -ge "$committed_before" ]; then
    pass "the depot killed with SIGKILL mid-rollout restarted where it was: rollout $rollout still $(q "r['state']"), $committed_before committed before the kill, $committed_after after"
else
    fail "the depot after SIGKILL: rollout $(q "r['id'], r['state']"), $committed_after committed (had $committed_before)"
fi
for n in "${cut[@]}"; do docker network connect "$net" "$n"; done
docker update --cpus 2 "$run-depot" >/dev/null
completed() { [ "$(q "r['state']")" = completed ]; }
if until_true 600 completed; then
    pass "5.0.0 ($size bytes) committed on all $devices devices in $(since "$t") s, through the cuts and the depot's restart"
else
    fail "5.0.0 everywhere: $(q "r['state'], r['waves']")"
fi
worst=0 resumed=0
for n in "${names[@]}"; do
    line=$(docker logs --since "$since_ts" "$n" 2>&1 | grep 'bundle downloaded' | grep 'version=5.0.0' | tail -1)
    received=$(sed -n 's/.*received=\([0-9]*\).*/\1/p' <<<"$line")
    requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
    again=$(( ${received:-0} - size ))
    [ "$again" -gt "$worst" ] && worst=$again
    # A part cut off and asked for again from the byte where it stopped, in this device's log.
    retries=$(docker logs --since "$since_ts" "$n" 2>&1 | grep -c 'asking again from where it stopped' || true)
    case " ${cut[*]} " in
        *" $n "*)
            info "${n#"$run-"} (cut off): received ${received:-?} bytes in ${requests:-?} requests, $again more than the bundle; $retries parts asked for again"
            [ "$retries" -gt 0 ] && resumed=$((resumed + 1))
            ;;
    esac
done
if [ "$resumed" = "${#cut[@]}" ]; then
    pass "the ${#cut[@]} devices cut off were cut mid-download and resumed from where they stopped"
else
    fail "cut mid-download and resumed: $resumed of ${#cut[@]} devices show a part asked for again"
fi
if [ "$worst" -le $((1 << 20)) ]; then
    pass "no device downloaded more than one 1 MiB chunk again (worst: $worst bytes beyond the bundle, its head read twice included)"
else
    fail "at most one chunk downloaded again: worst $worst bytes"
fi
# 6. A device's report captured on the network and sent again, and the same report signed by
#    another key claiming that device: refused. The device's own key and receipt are read from
#    its container, so that the captured request is exactly the one the device would send.
victim=${names[$((devices - 1))]}
docker cp "$victim:/data/ota/device.key" "$work/victim.key" >/dev/null
docker cp "$victim:/data/ota/receipts" "$work/victim-receipts" >/dev/null
receipt=$(grep -l '"5.0.0"' "$work"/victim-receipts/*committed*.receipt | head -1)
before=$(q "[m['state'] for m in r['members'] if m['device'] == '${id_of[$victim]}']")
answers=$("$load" replay "$(url)" "$work/victim.key" "$receipt" "$rollout" 2>&1 || true)
after=$(q "[m['state'] for m in r['members'] if m['device'] == '${id_of[$victim]}'], r['state']")
if [ "$answers" = "genuine 200 replayed 401 forged 401" ] && [ "$after" = "$before completed" ]; then
    pass "${victim#"$run-"}'s report: sent as the device would, accepted as a retry; captured and sent again, refused (401); signed by another key claiming the device, refused (401); its state stays $before"
else
    fail "a replayed and a forged report: $answers; the device's state and the rollout's: $after (was $before)"
fi

served=$(q "r['bytes_served']")
info "depot: $served bytes in $(q "r['downloads']") responses for 5.0.0 since its restart (its byte counters are in memory; tests/bench/depot.sh measures them in one run)"

info "depot: $(docker stats --no-stream --format '{{.MemUsage}}' "$run-depot" 2>/dev/null || echo '?') memory now"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
