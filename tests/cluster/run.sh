#!/usr/bin/env bash
# The classroom's k3s lessons, proven without k3s: PostgreSQL and three quote-service
# containers from the cluster's OCI images on a private Docker network (no route out), and the
# behaviour a Deployment on a real cluster must show. Prints PASS/FAIL per step; exits 1 if any
# step failed.
#
#   tests/cluster/run.sh          (as root, with a docker daemon; builds the images if needed)
#
# Builds quote-edge/quote-service (image/oci/build.sh) and quote-edge/postgres
# (image/oci/build-postgres.sh, cached by its inputs) for this host's architecture. Everything
# it creates is named qe-cluster-$$ and removed on exit. Waits poll a condition against a
# deadline (there is no event to wait on across containers); the deadlines are generous, and
# the times measured are printed, not judged: image/MEASUREMENTS.md keeps them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
# shellcheck source=image/lib/need.sh
source image/lib/need.sh
need curl:curl python3:python3
command -v docker >/dev/null || { echo "docker is missing" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "the docker daemon does not answer (docker info failed)" >&2; exit 1; }

arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
app=quote-edge/quote-service:$version
pg=quote-edge/postgres:15
if [ "${QUOTE_EDGE_CLUSTER_SKIP_BUILD:-0}" != 1 ]; then
    image/oci/build-postgres.sh "$arch"
    image/oci/build.sh "$arch"
fi

run=qe-cluster-$$
net=$run
secrets=$(mktemp -d)
failed=0
t0=$(date +%s.%N)
cleanup() {
    docker rm -f "$run-pg" "$run-q1" "$run-q2" "$run-q3" "$run-oom" >/dev/null 2>&1 || true
    docker volume rm "$run-pgdata" >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
    rm -rf "$secrets"
}
trap cleanup EXIT
# Stopped from outside (CI stops the whole job when another pass fails): clean up, then go.
trap 'exit 143' TERM INT
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failed=1; }
info() { printf '      %s\n' "$*"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
# until_true DEADLINE_S CMD...: polls CMD every 0.1 s until it succeeds or the deadline passes.
until_true() {
    local deadline=$1
    shift
    local end
    end=$(python3 -c "import sys; print(float(sys.argv[1]) + float(sys.argv[2]))" "$(now)" "$deadline")
    until "$@"; do
        python3 -c "import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]))" "$(now)" "$end" || return 1
        sleep 0.1
    done
}
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
status() { curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$(ip_of "$1"):8080$2" || true; }
is_status() { [ "$(status "$1" "$2")" = "$3" ]; }
state() { docker inspect -f "$2" "$1"; }
replicas=("$run-q1" "$run-q2" "$run-q3")
all_status() {
    local path=$1 want=$2 r
    for r in "${replicas[@]}"; do is_status "$r" "$path" "$want" || return 1; done
}
psql_q() { docker exec -e PGPASSWORD="$(cat "$secrets/db-password")" "$run-pg" psql -h 127.0.0.1 -U quote -d quotes -At -c "$1"; }

# The Secrets a cluster would mount: files readable by the containers' users, never env values.
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$secrets/db-password"
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$secrets/admin-token"
chmod 0444 "$secrets"/*
chmod 0755 "$secrets"

# --internal: the network has no route out, as the pod network of an air-gapped cluster.
docker network create --internal "$net" >/dev/null
docker volume create "$run-pgdata" >/dev/null
docker run -d --name "$run-pg" --network "$net" --network-alias postgres \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -v "$run-pgdata:/var/lib/postgresql/data" \
    -v "$secrets/db-password:/run/secrets/db-password:ro" \
    -e POSTGRES_PASSWORD_FILE=/run/secrets/db-password "$pg" >/dev/null
until_true 60 docker exec "$run-pg" pg_isready -q -h 127.0.0.1 ||
    { docker logs "$run-pg" 2>&1 | tail -20; echo "PostgreSQL did not start" >&2; exit 1; }

# Three replicas at once on the empty database, each as the Deployment runs them: read-only
# root, uid 65532, no capability, restarted by the engine when they die.
start_replica() {
    docker run -d --name "$1" --hostname "$1" --network "$net" \
        --read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges \
        --restart on-failure --memory 64m --cpus 0.5 --pids-limit 64 \
        -v "$secrets/db-password:/run/secrets/db-password:ro" \
        -v "$secrets/admin-token:/run/secrets/admin-token:ro" \
        -e QUOTE_DB=postgres://quote@postgres:5432/quotes \
        -e QUOTE_DB_PASSWORD_FILE=/run/secrets/db-password \
        -e QUOTE_ADMIN_TOKEN_FILE=/run/secrets/admin-token \
        -e QUOTE_INSTANCE="$1" "$app" >/dev/null
}
started=$(now)
pids=()
for r in "${replicas[@]}"; do start_replica "$r" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || { echo "docker run of a replica failed" >&2; exit 1; }; done
if until_true 60 all_status /readyz 200; then
    pass "3 replicas started at once (read-only, uid 65532, no capabilities) are ready in $(since "$started") s"
else
    fail "3 replicas ready: /readyz is $(for r in "${replicas[@]}"; do status "$r" /readyz; done)"
    for r in "${replicas[@]}"; do docker logs "$r" 2>&1 | tail -5; done
fi

# Exactly one replica applied the migrations; the others found them done.
migrations=$(psql_q 'SELECT count(*) FROM schema_migrations')
migrators=0
for r in "${replicas[@]}"; do
    [ "$(docker logs "$r" 2>&1 | grep -c 'applied=\[[0-9]')" = 0 ] || migrators=$((migrators + 1))
done
seeded=$(psql_q 'SELECT count(*) FROM quotes')
if [ "$migrators" = 1 ] && [ "$migrations" -ge 1 ]; then
    pass "the empty database was migrated once: 1 of 3 replicas applied $migrations migration(s), $seeded seed quotes"
else
    fail "migrated once: $migrators replicas logged applied migrations; schema_migrations has $migrations rows"
fi

# Scaling: a quote written through replica 1 is read through replicas 2 and 3.
token=$(cat "$secrets/admin-token")
body=$(curl -s -m 5 -D "$secrets/headers" -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"text":"The data stays while the replicas change.","author":"quote-edge cluster test"}' \
    "http://$(ip_of "$run-q1"):8080/quotes" || true)
touch "$secrets/headers"
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$body" 2>/dev/null || echo "")
read_ok=1
for r in "$run-q2" "$run-q3"; do
    got=$(curl -s -m 5 -D "$secrets/h-$r" "http://$(ip_of "$r"):8080/quotes/$id" || true)
    served=$(tr -d '\r' <"$secrets/h-$r" | sed -n 's/^x-served-by: //Ip')
    grep -qF 'The data stays while the replicas change.' <<<"$got" && [ "$served" = "$r" ] || read_ok=0
done
if [ -n "$id" ] && grep -qi "^x-served-by: $run-q1" "$secrets/headers" && [ "$read_ok" = 1 ]; then
    pass "quote $id written through replica 1 is read through replicas 2 and 3 (X-Served-By names each)"
else
    fail "write through 1, read through 2 and 3: POST answered '$body'"
fi
unauth=$(curl -s -o /dev/null -m 5 -w '%{http_code}' -H 'content-type: application/json' \
    -d '{"text":"x","author":"y"}' "http://$(ip_of "$run-q2"):8080/quotes" || true)
[ "$unauth" = 401 ] && pass "a write without the admin token is refused (401)" || fail "a write without the token answered $unauth, not 401"

# Readiness, not liveness: PostgreSQL stopped takes every replica out of rotation, restarts none.
pids_before=$(for r in "${replicas[@]}"; do state "$r" '{{.State.Pid}}/{{.RestartCount}}'; done)
stopped=$(now)
docker stop "$run-pg" >/dev/null
if until_true 30 all_status /readyz 503; then
    detected=$(since "$stopped")
    if all_status /healthz 200; then
        pass "PostgreSQL stopped: every replica's /readyz is 503 after ${detected} s (aim 5 s), /healthz stays 200"
    else
        fail "PostgreSQL stopped: /healthz is $(for r in "${replicas[@]}"; do status "$r" /healthz; done), not 200"
    fi
else
    fail "PostgreSQL stopped: /readyz is $(for r in "${replicas[@]}"; do status "$r" /readyz; done) after 30 s"
fi
# Hold the outage for longer than a liveness window (3 failures x 10 s would be 30 s on a
# cluster; the replicas answer /healthz throughout, checked every second for 5 s here).
steady=1
for _ in 1 2 3 4 5; do
    all_status /healthz 200 || steady=0
    sleep 1
done
restarted=$(now)
docker start "$run-pg" >/dev/null
if until_true 60 all_status /readyz 200; then
    back=$(since "$restarted")
    pids_after=$(for r in "${replicas[@]}"; do state "$r" '{{.State.Pid}}/{{.RestartCount}}'; done)
    if [ "$pids_before" = "$pids_after" ] && [ "$steady" = 1 ]; then
        pass "PostgreSQL back: all ready again ${back} s after its start, same processes, 0 restarts"
    else
        fail "PostgreSQL back: processes/restarts were '$pids_before', now '$pids_after'; healthz steady=$steady"
    fi
else
    fail "PostgreSQL back: /readyz is $(for r in "${replicas[@]}"; do status "$r" /readyz; done) after 60 s"
fi
metric=$(curl -s -m 5 "http://$(ip_of "$run-q1"):8080/metrics" | awk '$1 == "quote_db_unreachable_total" {print $2}' || true)
if [ -n "$metric" ] && [ "${metric%.*}" -gt 0 ]; then
    pass "replica 1 counted the outage in /metrics: quote_db_unreachable_total $metric"
else
    fail "replica 1's /metrics has no outage counted: quote_db_unreachable_total '${metric}'"
fi

# Self-healing: a replica whose process dies is restarted by the engine and is ready again.
victim=$run-q2
old_pid=$(state "$victim" '{{.State.Pid}}')
killed=$(now)
kill -KILL "$old_pid"
healed() { [ "$(state "$victim" '{{.RestartCount}}')" -ge 1 ] && [ "$(state "$victim" '{{.State.Pid}}')" != "$old_pid" ] && is_status "$victim" /readyz 200; }
still_there() { is_status "$victim" "/quotes/$id" 200; }
if until_true 60 healed && still_there; then
    pass "replica 2 killed (SIGKILL): restarted by the restart policy and ready after $(since "$killed") s; quote $id read through it (200)"
else
    fail "replica 2 killed: restart count $(state "$victim" '{{.RestartCount}}'), /readyz $(status "$victim" /readyz)"
fi

# Requests vs limits: a container that outgrows its memory limit is OOM-killed and reported.
docker run --name "$run-oom" --network "$net" --memory 32m --memory-swap 32m --entrypoint sh "$pg" \
    -c 'head -c 300M /dev/zero | tail' >/dev/null 2>&1 || true
oom=$(state "$run-oom" '{{.State.OOMKilled}} {{.State.ExitCode}}')
if [ "$oom" = "true 137" ]; then
    pass "a container over its 32 MiB memory limit is OOM-killed (OOMKilled=true, exit 137)"
else
    fail "memory limit: the container ended with OOMKilled/exit '$oom', not 'true 137'"
fi

info "images: $(docker image inspect --format '{{.Size}}' "$app") bytes $app, $(docker image inspect --format '{{.Size}}' "$pg") bytes $pg"
info "replica memory: $(docker stats --no-stream --format '{{.Name}} {{.MemUsage}}' "${replicas[@]}" | tr '\n' ';')"
[ "$failed" = 0 ] && echo "cluster checks: all passed in $(since "$t0") s" || { echo "cluster checks: some FAILED"; exit 1; }
