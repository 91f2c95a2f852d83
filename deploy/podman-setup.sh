#!/usr/bin/env bash
# Make podman usable on a CI or development machine (Debian/Ubuntu, as root):
# install podman, runc, debootstrap and catatonit (the pause process of the
# infra container `podman kube play` starts for each pod) when missing, and
# write the engine settings this kind of machine needs when
# /etc/containers/containers.conf is absent (crun fails here on the cgroup
# layout and on rlimits, so runc with cgroupfs; host networking, since there
# is no bridge/CNI setup to rely on). .ci/run calls it before the tests.
#
# Idempotent: a second run changes nothing. Never touches an existing
# containers.conf. Exits 0 without doing anything when not root (the image
# tests then skip, saying why).
set -euo pipefail

if [ "$(id -u)" != "0" ]; then
  echo "podman-setup: not root; leaving the system alone" >&2
  exit 0
fi

missing=()
for tool in podman runc debootstrap catatonit; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends podman runc debootstrap catatonit >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends podman runc debootstrap catatonit >/dev/null; }
fi

conf=/etc/containers/containers.conf
if [ ! -e "$conf" ]; then
  mkdir -p /etc/containers
  cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
fi

podman --version
