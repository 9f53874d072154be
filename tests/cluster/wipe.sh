#!/usr/bin/env bash
# Takes the test harness back to the state of a new machine, so that the next run of the
# container and cluster tests starts from nothing, as CI on a fresh machine does: stops the
# Slurm cluster and the Docker engine, then deletes their state (the accounting database
# too), enroot's and pyxis's state with the image cache, every Docker image (the debootstrap
# base included), and the wheelhouse and dist/ of the image build. Installed packages and the enroot and pyxis
# builds stay (a fresh machine installs those in about a minute).
# Usage: tests/cluster/wipe.sh, or `make test-containers-fresh`. Needs root.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SLURM_STATE=${SLURM_TEST_STATE:-/var/lib/cifar-job-slurm}
ENROOT_STATE=${ENROOT_TEST_STATE:-/var/lib/cifar-job-enroot}
DOCKER_ROOT=${DOCKER_TEST_DATA_ROOT:-/var/lib/cifar-job-docker}
[ "$(id -u)" = 0 ] || { echo "wipe: needs root" >&2; exit 1; }

# unmount_under DIR: what is still mounted below DIR (squashfuse images, overlay layers).
unmount_under() {
  awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# stop NAME: end every process called NAME, and wait until they are gone.
stop() {
  pkill -x "$1" 2>/dev/null || return 0
  for _ in $(seq 60); do pgrep -x "$1" >/dev/null || return 0; sleep 0.25; done
  pkill -9 -x "$1" 2>/dev/null || true
}

if command -v sinfo >/dev/null; then "$REPO/tests/cluster/stop.sh" >/dev/null 2>&1 || true; fi
stop slurmd
stop slurmctld
stop slurmdbd
if mysqladmin ping >/dev/null 2>&1; then mysql -e "DROP DATABASE IF EXISTS cifar_job_slurm_acct"; fi
stop squashfuse
unmount_under "$ENROOT_STATE"
rm -rf "$SLURM_STATE" "$ENROOT_STATE" /var/spool/slurmd
for n in n1 n2 n3; do ip netns del "cifar-job-$n" 2>/dev/null || true; done
ip link del cifarjob0 2>/dev/null || true
iptables -D FORWARD -i cifarjob0 -o cifarjob0 -j ACCEPT 2>/dev/null || true
rm -f /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm/gres.conf /etc/slurm/plugstack.conf.d/pyxis.conf

if docker info >/dev/null 2>&1; then
  docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1 || true
fi
stop dockerd
pkill -f "containerd.*$DOCKER_ROOT" 2>/dev/null || true # the engine's own, if it outlived it
unmount_under "$DOCKER_ROOT"
rm -rf "$DOCKER_ROOT" "$DOCKER_ROOT.log"
rm -rf "$REPO/wheels" "$REPO/dist"
echo "wipe: the test cluster, enroot and Docker state are gone; the next run starts from nothing"
