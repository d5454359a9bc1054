#!/usr/bin/env bash
# Two builds of tollgate's proxy against each other (and nginx), in one run, on loopback: the
# way to check that a change does not regress the request path.
#
#   benches/scripts/proxy-ab.sh BIN_A BIN_B [REPS] [SECONDS]     (defaults: 7 reps x 10 s)
#
# Cases, interleaved per repetition (rep 1 of every case, then rep 2, ...) so drift hits every
# case alike: nginx as a reverse proxy; A and B with a static route (metering off); A and B with
# metering on (an owning account, routes and balances in a redis-server this script starts).
# The system under test is pinned to CPU1, wrk and the upstream to CPU0. Medians, spreads and
# each run's B/A ratio are printed: compare B/A within the run, never across runs.
# Needs: nginx (Debian nginx-light), wrk, taskset, redis-server, two release builds.
set -euo pipefail
A=${1:?BIN_A}; B=${2:?BIN_B}
REPS=${3:-7}
SECS=${4:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
for b in "$A" "$B"; do [[ -x $b ]] || { echo "not executable: $b" >&2; exit 1; }; done
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx" >&2; exit 1; }
[[ $(nproc) -ge 2 ]] || { echo "needs 2 cores" >&2; exit 1; }

W=$(mktemp -d)
OUT=${OUT:-$ROOT/target/bench-proxy-ab}
rm -rf "$OUT"; mkdir -p "$OUT"
UP=18181; NGX=18182; RDS=18196
declare -A PORT=([a]=18183 [b]=18184 [am]=18185 [bm]=18186)
declare -A PID=()
cleanup() {
  [[ -f $W/up/nginx.pid ]] && kill "$(cat "$W/up/nginx.pid")" 2>/dev/null || true
  [[ -f $W/rp/nginx.pid ]] && kill "$(cat "$W/rp/nginx.pid")" 2>/dev/null || true
  for p in "${PID[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  [[ -n ${RDSPID:-} ]] && kill "$RDSPID" 2>/dev/null || true
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/up/tmp" "$W/rp/tmp"
# The same nginx as proxy-vs-nginx.sh (it adds a request id, as tollgate does).
# shellcheck source=nginx-confs.sh
source "$ROOT/benches/scripts/nginx-confs.sh"
write_nginx_confs "$W" "$UP" "$NGX"
nginx -c "$W/up.conf" -p "$W/"
nginx -c "$W/rp.conf" -p "$W/"
redis-server --port $RDS --bind 127.0.0.1 --save '' --appendonly no >"$W/redis.log" 2>&1 &
RDSPID=$!
for _ in $(seq 100); do redis-cli -p $RDS ping >/dev/null 2>&1 && break; sleep 0.05; done
REDIS=redis://127.0.0.1:$RDS/
"$A" routes put --redis $REDIS --slug bench --upstream 127.0.0.1:$UP --account-id acct-bench >/dev/null
"$A" accounts credit --redis $REDIS --account acct-bench --usd 9000 --key bench-deposit >/dev/null
export TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=false
# The platform realm (the proxy strips its payment credentials; `tollgate proxy` needs it).
export TOLLGATE_PUBLIC_MCP_URL=http://mcp.localhost
start() { # case bin metered
  local c=$1 bin=$2 admin=$((PORT[$1] + 100))
  mkdir -p "$W/data-$c"
  if [[ $3 == yes ]]; then
    TOLLGATE_DATA_DIR="$W/data-$c" TOLLGATE_NODE_ID="bench-$c" "$bin" proxy --listen 127.0.0.1:${PORT[$c]} \
      --admin-listen 127.0.0.1:$admin --threads 1 --base-domain localhost --redis $REDIS >"$W/$c.log" 2>&1 &
  else
    TOLLGATE_DATA_DIR="$W/data-$c" TOLLGATE_METERING_ENABLED=false "$bin" proxy --listen 127.0.0.1:${PORT[$c]} \
      --admin-listen 127.0.0.1:$admin --threads 1 --route bench.localhost=127.0.0.1:$UP >"$W/$c.log" 2>&1 &
  fi
  PID[$c]=$!
}
start a "$A" no; start b "$B" no; start am "$A" yes; start bm "$B" yes
for p in $UP $NGX "${PORT[@]}"; do
  for _ in $(seq 100); do curl -sf -H 'Host: bench.localhost' "http://127.0.0.1:$p/" >/dev/null && break; sleep 0.05; done
done
UPPID=$(cat "$W/up/nginx.pid"); RPPID=$(cat "$W/rp/nginx.pid")
pin() { taskset -a -pc "$1" "$2" >/dev/null; for c in $(pgrep -P "$2" || true); do taskset -a -pc "$1" "$c" >/dev/null; done; }
run_case() { # name port pid
  pin 0 "$UPPID"; pin 0 "$RPPID"; pin 0 "$RDSPID"
  for p in "${PID[@]}"; do pin 0 "$p"; done
  pin 1 "$3"
  taskset -c 0 wrk -t1 -c64 -d2s -H 'Host: bench.localhost' "http://127.0.0.1:$2/" >/dev/null
  taskset -c 0 wrk -t1 -c64 -d"${SECS}s" --latency -H 'Host: bench.localhost' "http://127.0.0.1:$2/" > "$OUT/$1.$rep.txt"
}
for rep in $(seq "$REPS"); do
  run_case nginx $NGX "$RPPID"
  for c in a b am bm; do run_case "$c" "${PORT[$c]}" "${PID[$c]}"; done
done
python3 "$ROOT/benches/scripts/wrk-summary.py" "$OUT" nginx a b am bm
python3 - "$OUT" "$REPS" <<'PY'
import re, statistics, sys
d, reps = sys.argv[1], int(sys.argv[2])
def rps(case, rep):
    t = open(f"{d}/{case}.{rep}.txt").read()
    return float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
for a, b in (("a", "b"), ("am", "bm")):
    r = [rps(b, i) / rps(a, i) for i in range(1, reps + 1)]
    print(f"{b}/{a} per rep: {', '.join(f'{x:.3f}' for x in r)}; median {statistics.median(r):.3f}")
PY
