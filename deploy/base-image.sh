#!/usr/bin/env bash
# Build a local stand-in for the official python slim image, from Debian's own
# packages, for machines that reach no container registry (CI, this project's
# development machines): Debian bookworm, Python 3.11 as both `python3` and
# `python`, venv and pip usable, the CA certificates installed.
#
#   bash deploy/base-image.sh [IMAGE]      # default IMAGE: localhost/gateway-base:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/gateway-base:bookworm -t gateway .
#
# Built once: when IMAGE already exists this does nothing (FORCE=1 rebuilds).
# Needs root, podman and debootstrap (deploy/podman-setup.sh installs them), and
# a reachable Debian mirror (DEBIAN_MIRROR, default deb.debian.org). 35-50 s.
set -euo pipefail

image="${1:-localhost/gateway-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ "${FORCE:-0}" != "1" ] && podman image exists "$image"; then
  echo "base-image: $image already exists"
  exit 0
fi

# One build at a time on a machine (two test sessions starting together).
exec 9>/tmp/gateway-base-image.lock
flock 9
if [ "${FORCE:-0}" != "1" ] && podman image exists "$image"; then
  echo "base-image: $image already exists"
  exit 0
fi

root="$(mktemp -d /var/tmp/gateway-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# PEP 668's marker would make the image's pip refuse to install outside a venv;
# the official python image has no such marker, and neither does the stand-in.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# What the official slim image also leaves out: apt lists and caches, docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*

tar -C "$root" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
echo "base-image: built $image"
