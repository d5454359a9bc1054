#!/usr/bin/env bash
# Throughput of tollgate's proxy against nginx as a reverse proxy, in the same run, on loopback.
#
#   benches/scripts/proxy-vs-nginx.sh [REPS] [SECONDS]      (defaults: 5 reps x 10 s)
#   BODY=10k|1m benches/scripts/proxy-vs-nginx.sh …          (a 10 KiB or 1 MiB response instead
#                                                            of "hello": the copy costs)
#
# Cases: (1) wrk -> upstream directly, (2) wrk -> nginx reverse proxy -> upstream,
# (3) wrk -> `tollgate proxy --threads 1` -> upstream, (4) the same with work stealing on,
# (5) the same as (3) with metering on: the route has an owning account (routes and balances in a
# redis-server this script starts), so every request goes through the money gate, (6) the same
# as (5) with the access log on (JSON lines to a file; its writer thread on the same core). The system under test is pinned to CPU1;
# wrk (and the upstream, when a proxy is under test) to CPU0. Reps are interleaved (rep 1 of
# every case, then rep 2, ...) so drift hits every case alike; medians are reported, and each
# proxy's own CPU per request (utime + stime of all its threads, from /proc, over the run).
# SCALE=2: two cores for the system under test (nginx with 2 workers, tollgate --threads 2)
# against wrk -t2 -c128 (cases nginx, tollgate, tollgate_metered). On a 2-core machine wrk and the
# upstream then share the cores with it: compare CPU per request, not requests per second.
# Needs: nginx (Debian nginx-light), wrk, taskset, a release build of tollgate.
set -euo pipefail
REPS=${1:-5}
SECS=${2:-10}
SCALE=${SCALE:-1}
case $SCALE in
  1) SUTCPU=1; LOADCPU=0; CASES="direct nginx tollgate tollgate_steal tollgate_metered tollgate_logged" ;;
  2) SUTCPU=0-1; LOADCPU=0-1; CASES="nginx tollgate tollgate_metered" ;;
  *) echo "SCALE is 1 or 2" >&2; exit 2 ;;
esac
export NGINX_WORKERS=$SCALE
case ${BODY:-} in
  "") URLPATH=/ ;; 10k) URLPATH=/10k ;; 1m) URLPATH=/1m ;;
  *) echo "BODY is 10k or 1m" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
[[ -x $BIN ]] || { echo "build first: cargo build --release --bin tollgate" >&2; exit 1; }
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx" >&2; exit 1; }
[[ $(nproc) -ge 2 ]] || { echo "needs 2 cores" >&2; exit 1; }

W=$(mktemp -d)
OUT=${OUT:-$ROOT/target/bench-proxy}   # raw wrk outputs are kept here
rm -rf "$OUT"; mkdir -p "$OUT"
UP=18081; NGX=18082; TG=18083; TGA=18093; TG2=18084; TGA2=18094; TGM=18085; TGMA=18095; RDS=18096
TGL=18086; TGLA=18097
cleanup() {
  [[ -f $W/up/nginx.pid ]] && kill "$(cat "$W/up/nginx.pid")" 2>/dev/null || true
  [[ -f $W/rp/nginx.pid ]] && kill "$(cat "$W/rp/nginx.pid")" 2>/dev/null || true
  [[ -n ${TGPID:-} ]] && kill -INT "$TGPID" 2>/dev/null || true
  [[ -n ${TG2PID:-} ]] && kill -INT "$TG2PID" 2>/dev/null || true
  [[ -n ${TGMPID:-} ]] && kill -INT "$TGMPID" 2>/dev/null || true
  [[ -n ${TGLPID:-} ]] && kill -INT "$TGLPID" 2>/dev/null || true
  [[ -n ${RDSPID:-} ]] && kill "$RDSPID" 2>/dev/null || true
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/up/tmp" "$W/rp/tmp"
# shellcheck source=nginx-confs.sh
source "$ROOT/benches/scripts/nginx-confs.sh"
write_nginx_confs "$W" "$UP" "$NGX"
nginx -c "$W/up.conf" -p "$W/"
nginx -c "$W/rp.conf" -p "$W/"
export TOLLGATE_DATA_DIR="$W/data"
# The platform realm (the proxy strips its payment credentials; `tollgate proxy` needs it).
export TOLLGATE_PUBLIC_MCP_URL=http://mcp.localhost
TOLLGATE_METERING_ENABLED=false TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=false "$BIN" proxy --listen 127.0.0.1:$TG --admin-listen 127.0.0.1:$TGA --threads $SCALE \
  --route bench.localhost=127.0.0.1:$UP >"$W/tg.log" 2>&1 &
TGPID=$!
TOLLGATE_METERING_ENABLED=false TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=true "$BIN" proxy --listen 127.0.0.1:$TG2 \
  --admin-listen 127.0.0.1:$TGA2 --threads $SCALE --route bench.localhost=127.0.0.1:$UP >"$W/tg2.log" 2>&1 &
TG2PID=$!
redis-server --port $RDS --bind 127.0.0.1 --save '' --appendonly no >"$W/redis.log" 2>&1 &
RDSPID=$!
for _ in $(seq 100); do redis-cli -p $RDS ping >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN" routes put --redis redis://127.0.0.1:$RDS/ --slug bench --upstream 127.0.0.1:$UP --account-id acct-bench >/dev/null
"$BIN" accounts credit --redis redis://127.0.0.1:$RDS/ --account acct-bench --usd 9000 --key bench-deposit >/dev/null
TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=false TOLLGATE_NODE_ID=bench-metered "$BIN" proxy --listen 127.0.0.1:$TGM \
  --admin-listen 127.0.0.1:$TGMA --threads $SCALE --base-domain localhost --redis redis://127.0.0.1:$RDS/ >"$W/tgm.log" 2>&1 &
TGMPID=$!
printf '[access_log]\nmode = "on"\nformat = "json"\npath = "%s"\n' "$W/access.log" > "$W/access.toml"
TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=false TOLLGATE_NODE_ID=bench-logged \
  "$BIN" proxy --config "$W/access.toml" --listen 127.0.0.1:$TGL \
  --admin-listen 127.0.0.1:$TGLA --threads $SCALE --base-domain localhost --redis redis://127.0.0.1:$RDS/ >"$W/tgl.log" 2>&1 &
TGLPID=$!
for p in $UP $NGX $TG $TG2 $TGM $TGL; do
  for _ in $(seq 100); do curl -sf -H 'Host: bench.localhost' "http://127.0.0.1:$p/" >/dev/null && break; sleep 0.05; done
done
UPPID=$(cat "$W/up/nginx.pid"); RPPID=$(cat "$W/rp/nginx.pid")
pin() { taskset -a -pc "$1" "$2" >/dev/null; for c in $(pgrep -P "$2" || true); do taskset -a -pc "$1" "$c" >/dev/null; done; }

# utime + stime of every thread of the given processes, in clock ticks.
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }

run_case() { # name port
  local name=$1 port=$2
  if [[ $name == direct ]]; then pin $SUTCPU "$UPPID"; else pin $LOADCPU "$UPPID"; fi
  # Only the system under test gets CPU1 (SCALE=2: both); every idle server waits on CPU0.
  pin 0 "$RPPID"; pin 0 "$TGPID"; pin 0 "$TG2PID"; pin 0 "$TGMPID"; pin 0 "$TGLPID"; pin 0 "$RDSPID"
  case $name in
    nginx) pin $SUTCPU "$RPPID" ;;
    tollgate) pin $SUTCPU "$TGPID" ;;
    tollgate_steal) pin $SUTCPU "$TG2PID" ;;
    tollgate_metered) pin $SUTCPU "$TGMPID"; if [[ $SCALE == 2 ]]; then pin $SUTCPU "$RDSPID"; fi ;;
    tollgate_logged) pin $SUTCPU "$TGLPID" ;;
  esac
  local load=(taskset -c $LOADCPU wrk -t"$SCALE" -c$((64 * SCALE)) -H 'Host: bench.localhost')
  "${load[@]}" -d2s "http://127.0.0.1:$port$URLPATH" >/dev/null
  local sut=()
  case $name in
    nginx) mapfile -t sut < <(pgrep -P "$RPPID") ;;  # its workers
    tollgate) sut=("$TGPID") ;; tollgate_steal) sut=("$TG2PID") ;;
    tollgate_metered) sut=("$TGMPID") ;; tollgate_logged) sut=("$TGLPID") ;;
  esac
  local t0=0; if ((${#sut[@]})); then t0=$(cpu_ticks "${sut[@]}"); fi
  "${load[@]}" -d"${SECS}s" --latency "http://127.0.0.1:$port$URLPATH" > "$OUT/$name.$rep.txt"
  # The processes' own CPU (every thread, user + system) over the measured run.
  if ((${#sut[@]})); then echo $(( $(cpu_ticks "${sut[@]}") - t0 )) > "$OUT/$name.$rep.cpu"; fi
  true
}
declare -A PORT=([direct]=$UP [nginx]=$NGX [tollgate]=$TG [tollgate_steal]=$TG2 [tollgate_metered]=$TGM [tollgate_logged]=$TGL)
for rep in $(seq "$REPS"); do
  for c in $CASES; do run_case "$c" "${PORT[$c]}"; done
done

# shellcheck disable=SC2086
CLK_TCK=$(getconf CLK_TCK) python3 "$ROOT/benches/scripts/wrk-summary.py" "$OUT" $CASES
echo "access log lines written: $(wc -l < "$W/access.log")"
# Every metered request was paid: the ledger shows it once the node has settled.
sleep 0.5
"$BIN" accounts show --redis redis://127.0.0.1:$RDS/ acct-bench
