#!/usr/bin/env bash
# Starts a Docker engine for the tests marked `container` (Debian's docker.io, started by hand:
# no systemd here) and makes the local base image they build on, since no registry can be
# reached: a Debian bookworm root filesystem with Python 3.11 and what torch.compile needs at
# run time, g++ and Python's headers (debootstrap, ~1 min, once).
# Idempotent. Needs root and Debian or Ubuntu. Prints the base image's name.
set -euo pipefail

DATA_ROOT=${DOCKER_TEST_DATA_ROOT:-/var/lib/cifar-job-docker}
BASE=${DOCKER_TEST_BASE:-cifar-job-test-base:bookworm-3}

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "docker: installing docker.io and debootstrap (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  mkdir -p "$DATA_ROOT"
  setsid dockerd --storage-driver=overlay2 --data-root="$DATA_ROOT" \
    >"$DATA_ROOT.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "docker: dockerd did not start; see $DATA_ROOT.log" >&2; exit 1; }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "docker: building $BASE with debootstrap" >&2
  root=$(mktemp -d)
  # No mirror argument: debootstrap's own default.
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++ bookworm "$root" >/dev/null
  find "$root/usr/lib" -name 'libpython3*.a' -delete   # as the Dockerfile does
  tar -C "$root" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$root"
fi
echo "$BASE"
