#!/usr/bin/env bash
# `make image`: the CPU component image, built on this machine with podman.
#
#   scripts/image.sh [--tag localhost/flywheel:cpu]
#
# No container registry is reachable here, so the base is made here too: a Debian bookworm root
# filesystem from the Debian archive apt already uses (debootstrap --variant=minbase, with
# python3 and python3-venv), imported as localhost/flywheel-base:bookworm once. The Dockerfile
# then builds on it exactly as it builds on python:3.11-slim-bookworm for a user (CPU_BASE).
# podman reads containers/podman/containers.conf (CONTAINERS_CONF), never the system's file.
# Needs podman, runc and debootstrap: installed with apt-get when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=localhost/flywheel:cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "image.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
BASE=${FLYWHEEL_BASE_IMAGE:-localhost/flywheel-base:bookworm}
export CONTAINERS_CONF="$PWD/containers/podman/containers.conf"

missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "image: installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
  else
    echo "image: ${missing[*]} not installed; as root: apt-get install podman runc debootstrap" >&2
    exit 1
  fi
fi

start=$(date +%s)
if ! podman image exists "$BASE"; then
  # The mirror apt is configured with (deb822 or one-line sources), else Debian's own.
  mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | head -n1 | awk '{print $2}')
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d /tmp/flywheel-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "image: making the base $BASE from $mirror (debootstrap bookworm)" >&2
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$root/rootfs" "$mirror" >"$root/debootstrap.log" 2>&1; then
    echo "image: debootstrap failed (see the last lines below); is $mirror reachable?" >&2
    tail -n 5 "$root/debootstrap.log" >&2
    exit 1
  fi
  rm -rf "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/lib/apt/lists/"*
  tar -C "$root/rootfs" -c . | podman import --quiet - "$BASE" >/dev/null
fi

# This machine's pip settings, for the build's pip: its local wheels (the CPU torch wheel lies
# there; without it pip would pull a CUDA build) and the CA bundle it trusts, mounted read-only.
opts=(--network host --build-arg "CPU_BASE=$BASE")
# `pip config list` shows both the files' settings and PIP_* variables (`:env:.cert`).
pip_setting() {
  python3 -m pip config list 2>/dev/null | sed -nE "s/^[^.]*\.$1='([^' ]+).*'\$/\1/p" | head -n1
}
links=$(pip_setting find-links)
cert=$(pip_setting cert)
if [ -n "$links" ] && [ -d "$links" ]; then
  opts+=(-v "$links:/run/pip-links:ro" --build-arg PIP_FIND_LINKS=/run/pip-links)
fi
if [ -n "$cert" ] && [ -f "$cert" ]; then
  opts+=(-v "$cert:/run/pip-cert.pem:ro" --build-arg PIP_CERT=/run/pip-cert.pem)
fi
# The image records the sources it was built from, so the container tests know it is current.
opts+=(--label "flywheel.source=$(scripts/source_hash.sh)")
ENGINE=podman scripts/build_image.sh --variant cpu --tag "$tag" -- "${opts[@]}"
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "image: $tag built in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB" >&2
