#!/usr/bin/env bash
# Writes deploy/compose/.env with fresh secrets for the compose stack (test chain only: the payee
# key receives TEST money). Refuses to overwrite an existing .env (the payee key and the payment
# secret must stay the same across restarts). Other variables compose reads from .env:
# TOLLGATE_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE, TOLLGATE_BIND, TOLLGATE_HTTPS_PORT; TOLLGATE_DOMAIN
# (written here: the domain services answer under).
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/.env"
if [[ -e $out ]]; then
  echo "gen-env.sh: $out exists; remove it first to make new secrets" >&2
  exit 1
fi
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
cat > "$out" <<ENV
# Made by gen-env.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Secrets for the compose stack (test chain).
TOLLGATE_PAYMENTS_SECRET=$(hex 32)
TOLLGATE_PAYEE_KEY=0x$(hex 32)
TOLLGATE_ADMIN_TOKEN=$(hex 24)
ENV
echo "gen-env.sh: wrote $out" >&2

# A local CA and a wildcard certificate for *.$TOLLGATE_DOMAIN (default apps.test), unless
# deploy/compose/tls/ already holds certificates: clients trust tls/ca.pem (curl --cacert,
# NODE_EXTRA_CA_CERTS). Replace tls/wildcard.pem and tls/wildcard.key with a real certificate
# (e.g. from an ACME client) for a public domain; the proxies reload them when they change.
domain="${TOLLGATE_DOMAIN:-apps.test}"
echo "TOLLGATE_DOMAIN=$domain" >> "$out"
tls="$(dirname "$out")/tls"
if [[ ! -e $tls/wildcard.pem ]]; then
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=tollgate compose local CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=*.$domain" -keyout "$tls/wildcard.key" -out "$tls/wildcard.csr" 2>/dev/null
  openssl x509 -req -in "$tls/wildcard.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 397 -out "$tls/wildcard.pem" \
    -extfile <(printf 'subjectAltName=DNS:*.%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' "$domain") 2>/dev/null
  rm -f "$tls/wildcard.csr" "$tls/ca.srl"
  # The proxies run as uid 10001: the key must be readable by them. A test key from a local CA;
  # give a real key to that uid alone (chown 10001, chmod 0400).
  chmod 0755 "$tls"
  chmod 0644 "$tls/wildcard.key" "$tls/wildcard.pem" "$tls/ca.pem"
  echo "gen-env.sh: wrote $tls/wildcard.pem for *.$domain (trust $tls/ca.pem)" >&2
fi
