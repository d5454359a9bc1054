# shellcheck shell=bash
# Installs what a fresh Debian/Ubuntu machine lacks for building and testing tollgate.
# Sourced by scripts/dev and scripts/test; idempotent and quiet when everything is there.
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)               # pingora's zlib-ng build
command -v redis-server >/dev/null 2>&1 || need+=(redis-server) # tests start their own
command -v cc >/dev/null 2>&1 || need+=(build-essential)
if ((${#need[@]})); then
  echo "tollgate: installing ${need[*]} (apt-get)" >&2
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "tollgate: needs Rust (cargo); see rust-toolchain.toml" >&2; exit 1; }
