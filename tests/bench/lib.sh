# Shared by the benchmark scripts (sourced, not run). Needs $work, $conns, $duration.

# wrk_run KEY NAME URL [wrk args...]: prints "name req/s p50 p99 errors"; keeps req/s in
# $work/rps-KEY and the error count (non-2xx/3xx + socket errors) in $work/errors-KEY.
wrk_run() {
    local key=$1 name=$2 url=$3; shift 3
    local out rps p50 p99 non2xx sock
    out=$(wrk -t2 -c"$conns" -d"$duration" --latency "$@" "$url")
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' <<<"$out")
    sock=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
    local errors=$(( ${non2xx:-0} + ${sock:-0} ))
    local total
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    printf '%-28s %12s %10s %10s  %s errors in %s requests\n' "$name" "$rps" "$p50" "$p99" "$errors" "$total"
    echo "$rps" >"$work/rps-$key"
    echo "$errors" >"$work/errors-$key"
}

# ratio KEY_A KEY_B: req/s of A divided by req/s of B.
ratio() {
    awk -v a="$(cat "$work/rps-$1")" -v b="$(cat "$work/rps-$2")" 'BEGIN {printf "%.3f", a / b}'
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
