#!/usr/bin/env bash
# TLS at the edge: tollgate's proxy (Pingora + rustls) against nginx (OpenSSL), same ECDSA P-256
# certificate, same pinned core, same upstream, in one run. The TLS companion of
# proxy-vs-nginx.sh (same nginx upstream, same pinning, interleaved reps, medians).
#
#   benches/scripts/tls-vs-nginx.sh [REPS] [SECONDS]      (defaults: 5 reps x 10 s)
#
# Cases, each against both proxies:
#   handshakes  h2load opens CONNS new connections, one HTTP/2 request each (a full TLS 1.3
#               handshake per connection: nginx's session cache and tickets are off; rustls'
#               stateful cache is never hit because h2load does not resume). Reported: new
#               connections per second of the proxy's own CPU (utime+stime from /proc), i.e.
#               handshakes per second per core, and the wall-clock rate.
#   h2          h2load, 64 connections x 10 streams for SECONDS: requests/s and CPU-µs per request.
# The proxy under test is pinned to CPU1, h2load and the upstream to CPU0. Metering is off
# (the money gate's cost is measured by proxy-vs-nginx.sh); HSTS off on both.
# Needs: nginx (Debian nginx-light, with http_v2 and ssl), h2load (nghttp2-client), openssl,
# taskset, a release build of tollgate.
set -euo pipefail
REPS=${1:-5}
SECS=${2:-10}
CONNS=${CONNS:-2000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
[[ -x $BIN ]] || { echo "build first: cargo build --release --bin tollgate" >&2; exit 1; }
for t in nginx h2load openssl taskset; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
[[ $(nproc) -ge 2 ]] || { echo "needs 2 cores" >&2; exit 1; }

W=$(mktemp -d)
OUT=${OUT:-$ROOT/target/bench-tls}
rm -rf "$OUT"; mkdir -p "$OUT"
UP=18181; NGXS=18182; TGP=18183; TGS=18184; TGA=18185
cleanup() {
  [[ -f $W/up/nginx.pid ]] && kill "$(cat "$W/up/nginx.pid")" 2>/dev/null || true
  [[ -f $W/tls/nginx.pid ]] && kill "$(cat "$W/tls/nginx.pid")" 2>/dev/null || true
  [[ -n ${TGPID:-} ]] && kill -INT "$TGPID" 2>/dev/null || true
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/up/tmp" "$W/tls/tmp" "$W/rp/tmp"
# shellcheck source=nginx-confs.sh
source "$ROOT/benches/scripts/nginx-confs.sh"
write_nginx_confs "$W" "$UP" 18199   # the upstream (rp.conf unused here)

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.test -addext "subjectAltName=DNS:*.bench.test" \
  -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null

write_nginx_proxy_conf "$W" tls "$UP" "listen 127.0.0.1:$NGXS ssl http2 reuseport backlog=8192;
    ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
    http2_max_concurrent_streams 128;" 8192
taskset -c 0 nginx -c "$W/up.conf" -p "$W/"
taskset -c 1 nginx -c "$W/tls.conf" -p "$W/"
export TOLLGATE_DATA_DIR="$W/data" TOLLGATE_PUBLIC_MCP_URL=http://mcp.localhost
TOLLGATE_METERING_ENABLED=false TOLLGATE_LOG=warn TOLLGATE_PROXY_WORK_STEALING=false \
  TOLLGATE_TLS_LISTEN=127.0.0.1:$TGS TOLLGATE_TLS_CERT=$W/cert.pem TOLLGATE_TLS_KEY=$W/key.pem \
  taskset -c 1 "$BIN" proxy --listen 127.0.0.1:$TGP --admin-listen 127.0.0.1:$TGA --threads 1 \
  --base-domain bench.test --route h.bench.test=127.0.0.1:$UP >"$W/tg.log" 2>&1 &
TGPID=$!
for p in $NGXS $TGS; do
  for _ in $(seq 100); do
    curl -skf --http2 --resolve "h.bench.test:$p:127.0.0.1" "https://h.bench.test:$p/" >/dev/null && break
    sleep 0.05
  done
done
NGXPID=$(pgrep -P "$(cat "$W/tls/nginx.pid")" | head -1)   # the worker

# CPU seconds (user + system, all threads) of a process.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.4f", ($14+$15)/hz}' "/proc/$1/stat"; }
# CPU seconds of nginx's master + worker.
ngx_cpu() { echo "$(cpu "$(cat "$W/tls/nginx.pid")") $(cpu "$NGXPID")" | awk '{printf "%.4f", $1+$2}'; }
pcpu() { if [[ $1 == nginx ]]; then ngx_cpu; else cpu "$TGPID"; fi; }
port() { if [[ $1 == nginx ]]; then echo $NGXS; else echo $TGS; fi; }

declare -A HS HSW H2 H2CPU
for rep in $(seq "$REPS"); do
  for who in nginx tollgate; do
    p=$(port $who)
    c0=$(pcpu $who)
    taskset -c 0 h2load -t1 -c "$CONNS" -n "$CONNS" -m1 "https://h.bench.test:$p/" \
      --connect-to="127.0.0.1:$p" >"$OUT/hs-$who-$rep.txt" 2>&1 || true
    c1=$(pcpu $who)
    ok=$(awk '/^requests:/ {print $8}' "$OUT/hs-$who-$rep.txt")
    rate=$(awk '/^finished in/ {print $4}' "$OUT/hs-$who-$rep.txt")
    HS[$who]+="$(awk -v n="$ok" -v a="$c0" -v b="$c1" 'BEGIN{printf "%.0f", n/(b-a)}') "
    HSW[$who]+="${rate%.*} "

    c0=$(pcpu $who)
    taskset -c 0 h2load -t1 -c 64 -m 10 -D "$SECS" "https://h.bench.test:$p/" \
      --connect-to="127.0.0.1:$p" >"$OUT/h2-$who-$rep.txt" 2>&1 || true
    c1=$(pcpu $who)
    rps=$(awk '/^finished in/ {gsub(",","",$4); print $4}' "$OUT/h2-$who-$rep.txt")
    done_n=$(awk '/^requests:/ {print $8}' "$OUT/h2-$who-$rep.txt")
    H2[$who]+="$rps "
    H2CPU[$who]+="$(awk -v n="$done_n" -v a="$c0" -v b="$c1" 'BEGIN{printf "%.1f", (b-a)*1e6/n}') "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf "\n%-10s %22s %20s %14s %18s\n" proxy "handshakes/s per core" "handshakes/s wall" "h2 req/s" "h2 CPU-us/req"
for who in nginx tollgate; do
  printf "%-10s %22s %20s %14s %18s\n" $who \
    "$(echo "${HS[$who]}" | median)" "$(echo "${HSW[$who]}" | median)" \
    "$(echo "${H2[$who]}" | median)" "$(echo "${H2CPU[$who]}" | median)"
done
echo
for who in nginx tollgate; do echo "$who handshakes/s per core: ${HS[$who]}"; echo "$who h2 req/s: ${H2[$who]}"; done
hs_ratio=$(awk -v a="$(echo "${HS[tollgate]}" | median)" -v b="$(echo "${HS[nginx]}" | median)" 'BEGIN{printf "%.2f", a/b}')
h2_ratio=$(awk -v a="$(echo "${H2CPU[nginx]}" | median)" -v b="$(echo "${H2CPU[tollgate]}" | median)" 'BEGIN{printf "%.2f", a/b}')
echo "tollgate/nginx: handshakes per core-second ${hs_ratio}x; h2 efficiency (nginx CPU per request / tollgate's) ${h2_ratio}x"
echo "raw outputs: $OUT"
