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
  # As compose reads it: the environment wins over .env.
  domain="${TOLLGATE_DOMAIN:-$(sed -n 's/^TOLLGATE_DOMAIN=//p' "$out" | tail -n 1 | tr -d '"\r')}"
  domain="${domain:-apps.test}"
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
if [[ -s $tls/wildcard.pem ]] && openssl x509 -in "$tls/wildcard.pem" -noout 2>/dev/null; then
  names="$(openssl x509 -in "$tls/wildcard.pem" -noout -ext subjectAltName 2>/dev/null | tail -n 1 | tr -d ' ')"
  echo "gen-env.sh: keeping $tls/wildcard.pem ($names)" >&2
  if [[ $names != *"DNS:*.$domain"* ]]; then
    echo "gen-env.sh: WARNING: it does not cover *.$domain; remove tls/wildcard.pem and tls/wildcard.key to make one, or put the right certificate there" >&2
  fi
  exit 0
fi
if [[ -e $tls/wildcard.key && ! -e $tls/wildcard.pem ]]; then
  echo "gen-env.sh: $tls/wildcard.key exists without its certificate; put wildcard.pem beside it, or remove the key to make a new pair" >&2
  exit 1
fi
mkdir -p "$tls" "$ca"
chmod 0700 "$ca"
chmod 0755 "$tls"
if [[ ! -e $ca/ca.pem ]]; then
  (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=tollgate compose local CA" -keyout "$ca/ca.key" -out "$ca/ca.pem")
  chmod 0644 "$ca/ca.pem"
fi
# Made aside and moved into place only once both are whole: a failed step leaves nothing
# that a later run would keep.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(umask 022; openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=*.$domain" -keyout "$work/wildcard.key" -out "$work/wildcard.csr")
openssl x509 -req -in "$work/wildcard.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial \
  -CAserial "$ca/ca.srl" -days 397 -out "$work/wildcard.pem" \
  -extfile <(printf 'subjectAltName=DNS:*.%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' "$domain")
openssl verify -CAfile "$ca/ca.pem" "$work/wildcard.pem" >/dev/null
# The proxies run as uid 10001 and must read the key. A test key from a local CA; give a real
# key to that uid alone (chown 10001, chmod 0400; under rootless podman, the uid it maps to).
chmod 0644 "$work/wildcard.key" "$work/wildcard.pem"
mv "$work/wildcard.key" "$tls/wildcard.key"
mv "$work/wildcard.pem" "$tls/wildcard.pem"
echo "gen-env.sh: wrote $tls/wildcard.pem for *.$domain (clients trust $ca/ca.pem)" >&2
