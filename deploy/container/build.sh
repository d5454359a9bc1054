#!/usr/bin/env bash
# Builds the tollgate container image from a small staged build context (docs/packaging.md).
#
#   deploy/container/build.sh [--binary PATH | --from-source] [--tag IMAGE] [--features F] [-- ARGS]
#
#   --binary PATH   put this prebuilt binary in the image (target `prebuilt`). Default:
#                   target/release/tollgate if it exists. Build it on Debian 12 (glibc 2.36) or
#                   older, e.g. `cargo build --release --locked --bin tollgate`.
#   --from-source   compile in the official Rust image instead (target `from-source`; needs a
#                   registry that serves RUST_IMAGE).
#   --features F    cargo features for --from-source, e.g. dev-chain (the local test chain that
#                   the compose stack's `chain` service runs; NO REAL MONEY).
#   --tag IMAGE     default localhost/tollgate:latest
#   -- ARGS         passed on to `ENGINE build`
#
# Environment:
#   ENGINE          podman (default when installed) or docker (BuildKit)
#   DEBIAN_IMAGE    base image (default docker.io/library/debian:bookworm-slim)
#   RUST_IMAGE      builder image (default docker.io/library/rust:1.95-bookworm)
#   EXTRA_CA_CERT   a PEM file npm must trust in the toolchain stage (a TLS-inspecting proxy);
#                   it does not reach the runtime image
#   STRIP=1         strip the staged copy of a prebuilt binary (a debug build is ~10x larger)
#   KEEP_CONTEXT=1  keep the staged context and print where it is
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

mode=""
binary=""
tag="localhost/tollgate:latest"
features=""
extra=()
while (($#)); do
  case "$1" in
    --binary) mode=prebuilt; binary=$2; shift 2 ;;
    --from-source) mode=from-source; shift ;;
    --tag) tag=$2; shift 2 ;;
    --features) features=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z $mode ]]; then
  if [[ -x $repo/target/release/tollgate ]]; then
    mode=prebuilt; binary=$repo/target/release/tollgate
  else
    echo "build.sh: no target/release/tollgate; pass --binary PATH or --from-source" >&2
    exit 2
  fi
fi
if [[ -z ${ENGINE:-} ]]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-image.XXXXXX")
cleanup() { if [[ ${KEEP_CONTEXT:-0} == 1 ]]; then echo "build.sh: context kept in $ctx" >&2; else rm -rf "$ctx"; fi; }
trap cleanup EXIT

mkdir -p "$ctx/npm"
cp "$repo/runtime/npm/package.json" "$repo/runtime/npm/package-lock.json" "$ctx/npm/"
cp "$here/tollgate.toml" "$ctx/tollgate.toml"
if [[ -n ${EXTRA_CA_CERT:-} ]]; then cp "$EXTRA_CA_CERT" "$ctx/extra-ca.pem"; else : > "$ctx/extra-ca.pem"; fi

revision=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
args=(--target "$mode" --tag "$tag"
      --build-arg "DEBIAN_IMAGE=${DEBIAN_IMAGE:-docker.io/library/debian:bookworm-slim}"
      --label "org.opencontainers.image.revision=$revision"
      --label "org.opencontainers.image.source=tollgate")
if [[ $mode == prebuilt ]]; then
  [[ -x $binary ]] || { echo "build.sh: $binary is not an executable file" >&2; exit 2; }
  [[ -z $features ]] || echo "build.sh: --features applies to --from-source only; ignored" >&2
  mkdir -p "$ctx/bin"
  if [[ ${STRIP:-0} == 1 ]]; then
    objcopy --strip-debug "$binary" "$ctx/bin/tollgate"
  else
    cp "$binary" "$ctx/bin/tollgate"
  fi
  chmod 0755 "$ctx/bin/tollgate"
else
  # The repository's tracked and new (not ignored) files, as they are in the work tree: no
  # target/, no node_modules, no .git.
  mkdir -p "$ctx/source"
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -c --null --no-recursion --ignore-failed-read -C "$repo" -f - --files-from=- \
    | tar -x -C "$ctx/source"
  args+=(--build-arg "RUST_IMAGE=${RUST_IMAGE:-docker.io/library/rust:1.95-bookworm}"
         --build-arg "CARGO_FEATURES=$features"
         --build-arg "TOLLGATE_REVISION=$revision")
fi
# The docker image format keeps HEALTHCHECK (podman's default OCI format drops it).
[[ $ENGINE == podman ]] && args+=(--format docker)

echo "build.sh: $ENGINE build (target $mode, context $(du -sh "$ctx" | cut -f1)) -> $tag" >&2
"$ENGINE" build "${args[@]}" "${extra[@]}" -f "$here/Containerfile" "$ctx"
