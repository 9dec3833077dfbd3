#!/usr/bin/env bash
# quote-service on PostgreSQL vs on SQLite, same wrk load, one run; pgbench -S on the same
# PostgreSQL server as the floor.
#
#   tests/bench/quote-service-pg.sh [DURATION] [CONNECTIONS]     (defaults: 10s, 16)
#
# One release quote-service per backend on loopback (they run side by side, measured one at a
# time): GET /quotes/random and POST /quotes with wrk --latency; then `pgbench -S` (select-only,
# scale 1) with the same client count. PostgreSQL is Debian's server, a throwaway cluster in a
# temporary directory run as nobody on 127.0.0.1, default durability (fsync on, synchronous_commit
# on), as SQLite runs with synchronous=FULL. Reports req/s, p50, p99 and the ratios
# PostgreSQL/SQLite. Needs: wrk, curl, postgresql. Numbers only, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-10s}
conns=${2:-16}
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
require_tools wrk curl
pgbin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] && [ -x "$pgbin/initdb" ] || { echo "needs PostgreSQL (apt-get install postgresql)" >&2; exit 1; }

cargo build --release --locked -p quote-service --bin quote-service >&2
bin=${CARGO_TARGET_DIR:-target}/release/quote-service
work=$(mktemp -d)
pids=()
as_owner=()
[ "$(id -u)" != 0 ] || { chown nobody "$work"; as_owner=(setpriv --reuid=nobody --regid=nogroup --clear-groups); }
pgport=18095
pg() { "${as_owner[@]}" "$pgbin/$1" "${@:2}"; }
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pg pg_ctl stop -D "$work/data" -m fast >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

pg initdb -D "$work/data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
# -w waits for the server's own "ready" answer.
pg pg_ctl start -w -D "$work/data" -l "$work/postgres.log" \
    -o "-p $pgport -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work/data -c max_connections=100" >/dev/null
psql_() { "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -X -q "$@"; }
psql_ -d postgres -c "CREATE DATABASE quotes" -c "CREATE DATABASE pgbench"

on_pg=127.0.0.1:18092
on_sqlite=127.0.0.1:18093
QUOTE_LOG=warn "$bin" --listen "$on_pg" --db "postgres://postgres@127.0.0.1:$pgport/quotes" --instance bench-pg &
pids+=($!)
QUOTE_LOG=warn "$bin" --listen "$on_sqlite" --db "$work/quotes.db" --instance bench-sqlite &
pids+=($!)
for _ in $(seq 200); do
    curl -sf "http://$on_pg/readyz" >/dev/null && curl -sf "http://$on_sqlite/readyz" >/dev/null && break
    sleep 0.05
done
for addr in "$on_pg" "$on_sqlite"; do
    curl -sf "http://$addr/readyz" >/dev/null || { echo "quote-service on $addr never became ready" >&2; exit 1; }
done

echo "quote-service on PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') vs SQLite: wrk -t2 -c$conns -d$duration on $(nproc) cores, $(date -u +%FT%TZ)"
printf '%-28s %12s %10s %10s\n' "endpoint" "req/s" "p50" "p99"
wrk_run sqlite-random "SQLite GET /quotes/random" "http://$on_sqlite/quotes/random"
wrk_run pg-random "PG GET /quotes/random" "http://$on_pg/quotes/random"
wrk_run sqlite-insert "SQLite POST /quotes" "http://$on_sqlite/quotes" -s tests/bench/post.lua
wrk_run pg-insert "PG POST /quotes" "http://$on_pg/quotes" -s tests/bench/post.lua

pg_threads=$(( conns < 2 ? 1 : 2 ))
"$pgbin/pgbench" -h 127.0.0.1 -p "$pgport" -U postgres -i -q -s 1 pgbench >/dev/null 2>&1
pgb=$("$pgbin/pgbench" -h 127.0.0.1 -p "$pgport" -U postgres -S -n -c "$conns" -j "$pg_threads" -T "${duration%s}" pgbench 2>&1)
pgb_tps=$(awk '/^tps/ {print $3; exit}' <<<"$pgb")
pgb_lat=$(awk '/^latency average/ {print $4 " " $5}' <<<"$pgb")
printf '%-28s %12s %10s\n' "pgbench -S (select-only)" "$pgb_tps" "avg $pgb_lat"
echo "$pgb_tps" >"$work/rps-pgbench"

echo
echo "PostgreSQL / SQLite: random req/s $(ratio pg-random sqlite-random), p99 $(p99_ratio pg-random sqlite-random); insert req/s $(ratio pg-insert sqlite-insert), p99 $(p99_ratio pg-insert sqlite-insert)"
echo "GET /quotes/random on PostgreSQL / pgbench -S tps (the floor): $(ratio pg-random pgbench)"
