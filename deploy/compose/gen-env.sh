#!/usr/bin/env bash
# Writes deploy/compose/.env with fresh secrets for the compose stack (test chain only: the payee
# key receives TEST money). Refuses to overwrite an existing .env (the payee key and the payment
# secret must stay the same across restarts). Other variables compose reads from .env:
# TOLLGATE_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE, TOLLGATE_BIND.
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
