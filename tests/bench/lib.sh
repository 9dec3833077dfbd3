# Shared by the benchmark scripts (sourced, not run). Needs $work, $conns, $duration.

# require_tools TOOL...: exits saying which Debian package to install when one is missing.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install $tool)" >&2; exit 1; }
    done
}

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
    echo "$p99" >"$work/p99-$key"
}

# p99_ratio KEY_A KEY_B: p99 latency of A divided by that of B (wrk prints us, ms or s).
p99_ratio() {
    awk -v a="$(cat "$work/p99-$1")" -v b="$(cat "$work/p99-$2")" '
        function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /m$/) return v * 60e6; return v * 1e6 }
        BEGIN { printf "%.3f", us(a) / us(b) }'
}

# ratio KEY_A KEY_B: req/s of A divided by req/s of B.
ratio() {
    awk -v a="$(cat "$work/rps-$1")" -v b="$(cat "$work/rps-$2")" 'BEGIN {printf "%.3f", a / b}'
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# haproxy_cfg BIND PORT...: the HAProxy the router is compared with, on stdout: 2 threads,
# round robin over 127.0.0.1:PORT..., server connections reused (`http-reuse always`).
haproxy_cfg() {
    local bind=$1 i=0 port; shift
    printf 'global\n    nbthread 2\n    maxconn 4096\ndefaults\n    mode http\n'
    printf '    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n    http-reuse always\n'
    printf 'frontend quote\n    bind %s\n    default_backend replicas\n' "$bind"
    printf 'backend replicas\n    balance roundrobin\n'
    for port in "$@"; do echo "    server r$i 127.0.0.1:$port"; i=$((i + 1)); done
}
