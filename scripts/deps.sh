# shellcheck shell=bash
# Installs what a fresh Debian/Ubuntu machine lacks for building and testing tollgate.
# Sourced by scripts/dev and scripts/test; idempotent and quiet when everything is there.
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)               # pingora's zlib-ng build
command -v redis-server >/dev/null 2>&1 || need+=(redis-server) # tests start their own
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)   # `redis-cli --cluster create` for the Redis Cluster tests
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v curl >/dev/null 2>&1 || need+=(curl)                 # the edge tests' HTTP/2 client
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || need+=(python3-yaml) # scripts/check-observability
# initdb and pg_ctl: the book-of-record tests start their own PostgreSQL cluster on a free port.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)       # promtool for scripts/check-observability (the package also enables a Prometheus server on :9090)
if ((${#need[@]})); then
  echo "tollgate: installing ${need[*]} (apt-get)" >&2
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "tollgate: needs Rust (cargo); see rust-toolchain.toml" >&2; exit 1; }
# workerd, esbuild and the curated tenant packages, pinned by runtime/npm/package-lock.json.
# (The code installs them itself when missing; doing it here keeps the test log readable.)
command -v npm >/dev/null 2>&1 || { echo "tollgate: needs Node.js and npm (for workerd and esbuild)" >&2; exit 1; }
if [[ ! -x runtime/npm/node_modules/@cloudflare/workerd-linux-64/bin/workerd || ! -x runtime/npm/node_modules/@esbuild/linux-x64/bin/esbuild ]]; then
  echo "tollgate: installing the pinned JS toolchain (npm ci --ignore-scripts in runtime/npm)" >&2
  (cd runtime/npm && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
# The official MCP TypeScript SDK client the MCP interop tests drive (pinned by its lockfile).
if [[ ! -d mcp/tests/js/node_modules/@modelcontextprotocol/sdk ]]; then
  (cd mcp/tests/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
# The real MPP client (mppx) the payment interop tests drive (pinned by its lockfile).
if [[ ! -d payments/tests/js/node_modules/mppx ]]; then
  (cd payments/tests/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
