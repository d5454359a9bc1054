#!/usr/bin/env bash
# Prepares deploy/compose for `docker-compose up`:
# - .env with fresh secrets for the compose stack (test chain only: the payee key receives TEST
#   money), unless it exists: the payee key and the payment secret must stay the same across
#   restarts, so an existing .env is kept as it is;
# - tls/wildcard.pem and tls/wildcard.key for *.$TOLLGATE_DOMAIN (default apps.test), unless
#   tls/wildcard.pem exists, signed by a local CA kept in ca/ (outside what the proxies mount):
#   clients trust ca/ca.pem (curl --cacert, NODE_EXTRA_CA_CERTS). For a public domain, put a
#   real certificate and key in tls/ instead (copies, not symlinks: the directory is mounted
#   alone), readable by the proxies' uid; they reload them when the files change.
# Other variables compose reads from .env: TOLLGATE_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE,
# TOLLGATE_BIND, TOLLGATE_HTTPS_PORT.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/.env"
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
if [[ -e $out ]]; then
  echo "gen-env.sh: keeping $out (its secrets must not change)" >&2
  domain="$(sed -n 's/^TOLLGATE_DOMAIN=//p' "$out" | tail -n 1)"
  domain="${domain:-${TOLLGATE_DOMAIN:-apps.test}}"
else
  domain="${TOLLGATE_DOMAIN:-apps.test}"
  (
    umask 077
    cat > "$out" <<ENV
# Made by gen-env.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Secrets for the compose stack (test chain).
TOLLGATE_PAYMENTS_SECRET=$(hex 32)
TOLLGATE_PAYEE_KEY=0x$(hex 32)
TOLLGATE_ADMIN_TOKEN=$(hex 24)
# Services answer at https://<slug>.$domain
TOLLGATE_DOMAIN=$domain
ENV
  )
  echo "gen-env.sh: wrote $out" >&2
fi

tls="$here/tls"
ca="$here/ca"
if [[ -e $tls/wildcard.pem ]]; then
  echo "gen-env.sh: keeping $tls/wildcard.pem ($(openssl x509 -in "$tls/wildcard.pem" -noout -ext subjectAltName 2>/dev/null | tail -n 1 | tr -d ' '); services at *.$domain)" >&2
  exit 0
fi
mkdir -p "$tls" "$ca"
chmod 0700 "$ca"
chmod 0755 "$tls"
if [[ ! -e $ca/ca.pem ]]; then
  (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=tollgate compose local CA" -keyout "$ca/ca.key" -out "$ca/ca.pem")
  chmod 0644 "$ca/ca.pem"
fi
csr="$(mktemp)"
trap 'rm -f "$csr"' EXIT
(umask 022; openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=*.$domain" -keyout "$tls/wildcard.key" -out "$csr")
openssl x509 -req -in "$csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial \
  -CAserial "$ca/ca.srl" -days 397 -out "$tls/wildcard.pem" \
  -extfile <(printf 'subjectAltName=DNS:*.%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' "$domain")
# The proxies run as uid 10001 and must read the key. A test key from a local CA; give a real
# key to that uid alone (chown 10001, chmod 0400; under rootless podman, the uid it maps to).
chmod 0644 "$tls/wildcard.key" "$tls/wildcard.pem"
echo "gen-env.sh: wrote $tls/wildcard.pem for *.$domain (clients trust $ca/ca.pem)" >&2
