#!/usr/bin/env bash
# Adds NVIDIA's enroot and its Slurm plugin pyxis to the test cluster (start.sh), so that
# `srun --container-image=...` runs steps in a container, as on a production GPU cluster.
#
# Builds both from the sources in shared/vendor/ beside the checkout (or $PYXIS_VENDOR) when
# they are missing, with Debian's packages (about a minute, once), with a fix that lets a
# preempted step save (see HOLD below). Idempotent: a cluster that already has this setup is
# left as it is. Needs root, Debian or Ubuntu, and the kernel's user
# namespaces, overlay, squashfs and FUSE. Jobs then run containers as their own users.
#
# pyxis is loaded as `required`, as on sites: a container that cannot start fails the step.
# Settings, for a cluster whose nodes share one disk (here: two slurmd on one host):
#   use_squashfuse=1        start each step straight from a squashfs file, no unpacking
#   importer=import-cache   import each Docker image once (by image ID, under a lock) into
#                           $STATE/cache and hand every later step that file (~0.5 s a step)
#
# Exit status: 0 ready; 3 something this machine lacks (the message says what), so the
# container tests skip; anything else is a failure.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENDOR=${PYXIS_VENDOR:-$REPO/../shared/vendor}
STATE=${ENROOT_TEST_STATE:-/var/lib/cifar-job-enroot}
PREFIX=/usr/local
PLUGIN=$PREFIX/lib/slurm/spank_pyxis.so
PLUGSTACK=/etc/slurm/plugstack.conf.d/pyxis.conf

lacks() { echo "pyxis: $*" >&2; exit 3; }

# ---- what the machine must have
[ "$(id -u)" = 0 ] || lacks "needs root (it installs packages and configures slurmd)"
command -v apt-get >/dev/null || lacks "needs apt-get (Debian or Ubuntu)"
command -v slurmd >/dev/null || lacks "no Slurm here: run tests/cluster/start.sh first"
for f in enroot-8ea147d pyxis-v0.24.0 musl-0784374 kernel-headers-c79004a makeself-5742be6; do
  [ -s "$VENDOR/$f.tar.gz" ] || lacks "no $VENDOR/$f.tar.gz (the enroot and pyxis sources)"
done
unshare --user --map-root-user true 2>/dev/null || lacks "the kernel allows no user namespaces"
for fs in overlay squashfs; do
  grep -qw "$fs" /proc/filesystems || modprobe "$fs" 2>/dev/null \
    || lacks "the kernel has no $fs file system"
done
[ -c /dev/fuse ] || lacks "no /dev/fuse (squashfuse needs FUSE)"

# ---- packages, then enroot and pyxis from source
packages=(gawk squashfs-tools parallel fuse-overlayfs pigz squashfuse libtool automake
  libmd-dev libslurm-dev build-essential jq curl libcap2-bin zstd)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "pyxis: installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-upgrade: leave the Slurm that pyxis is built against as it is.
  apt-get install -y -qq --no-install-recommends --no-upgrade "${missing[@]}" >/dev/null
fi

# With use_squashfuse=1, pyxis 0.24 and enroot start each step from the squashfs through a
# squashfuse process, which lives as long as two stopped shells: pyxis's container holder
# (`kill -STOP $$; exit 0`) and enroot's "fuse shim" (`kill -STOP $$; exit 0`, then SIGKILL to
# its process group, squashfuse included). Slurm signals every process of a step, and
# preemption and scancel send SIGCONT and SIGTERM: both shells went on to exit, the image
# vanished under the running ranks, and they died of SIGBUS ("Stale file handle") while they
# saved. Both shells are patched to stop again when continued and to ignore SIGTERM; the mount
# still ends with the step (Slurm's SIGKILL, or SIGHUP to the orphaned shim). squashfuse
# itself unmounts on SIGTERM: see its wrapper below.
HOLD="trap '' TERM; while :; do kill -STOP \$\$; done"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
if ! command -v enroot >/dev/null || ! grep -qF "$HOLD" $PREFIX/lib/enroot/runtime.sh; then
  echo "pyxis: building enroot"
  tar -xzf "$VENDOR/enroot-8ea147d.tar.gz" -C "$build"
  sed -i "s|^    kill -STOP [$][$]\$|    ${HOLD}|" "$build/enroot/src/runtime.sh"
  grep -qF "$HOLD" "$build/enroot/src/runtime.sh" || { echo "pyxis: enroot's shim moved" >&2; exit 1; }
  # Its git submodules come as separate archives.
  for dep in musl:musl-0784374 linux-headers:kernel-headers-c79004a makeself:makeself-5742be6; do
    mkdir -p "$build/enroot/deps/${dep%%:*}"
    tar -xzf "$VENDOR/${dep#*:}.tar.gz" --strip-components=1 -C "$build/enroot/deps/${dep%%:*}"
  done
  if ! { make -C "$build/enroot" -j"$(nproc)" && make -C "$build/enroot" install \
         && make -C "$build/enroot" setcap; } >"$build/enroot.log" 2>&1; then
    tail -30 "$build/enroot.log" >&2; exit 1
  fi
fi
if ! grep -qaF "$HOLD" "$PLUGIN" 2>/dev/null; then
  echo "pyxis: building pyxis"
  tar -xzf "$VENDOR/pyxis-v0.24.0.tar.gz" -C "$build"
  sed -i "s|\"kill -STOP [$][$] ; exit 0\"|\"${HOLD}\"|" "$build/pyxis/pyxis_slurmstepd.c"
  grep -qF "$HOLD" "$build/pyxis/pyxis_slurmstepd.c" \
    || { echo "pyxis: pyxis's container holder moved" >&2; exit 1; }
  # Built against libslurm-dev, whose version is the slurmd's: else "Incompatible plugin version".
  if ! { make -C "$build/pyxis" && make -C "$build/pyxis" install; } >"$build/pyxis.log" 2>&1; then
    tail -30 "$build/pyxis.log" >&2; exit 1
  fi
fi

# ---- enroot for every user, as sites set it up: state under one directory, a directory of
# each user's own in it (enroot makes them, mode 0700, in parents anyone may write to, as
# /tmp), since jobs run as their users and their HOME may not be writable; the image's PATH
# kept. And /dev/fuse open to all (as udev makes it on Debian and Ubuntu): squashfuse mounts
# the image as the job's user.
mkdir -p "$STATE"/{runtime,cache,data,tmp,pyxis,images} $PREFIX/etc/enroot/{enroot.conf.d,environ.d}
chmod 1777 "$STATE"/{runtime,cache,data,tmp}
chmod 0666 /dev/fuse
cat > $PREFIX/etc/enroot/enroot.conf.d/cifar-job-test.conf <<CONF
ENROOT_RUNTIME_PATH $STATE/runtime/user-\$(id -u)
ENROOT_CACHE_PATH $STATE/cache/group-\$(id -g)
ENROOT_DATA_PATH $STATE/data/user-\$(id -u)
ENROOT_TEMP_PATH $STATE/tmp
# A login shell would source /etc/profile, which resets PATH: the image's venv would drop out.
ENROOT_LOGIN_SHELL no
CONF
# No GPUs here: CUDA images set NVIDIA_VISIBLE_DEVICES, which would call nvidia-container-cli.
echo "NVIDIA_VISIBLE_DEVICES=void" > $PREFIX/etc/enroot/environ.d/50-cifar-job-test.env

# squashfuse, like every process of the step, gets Slurm's SIGTERM, on which libfuse unmounts
# the image. Started with SIGTERM ignored (libfuse keeps an inherited SIG_IGN), it lasts until
# the shim ends it. Ahead of it on PATH:
squashfuse=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v squashfuse)
cat > $PREFIX/bin/squashfuse <<WRAPPER
#!/bin/sh
# Installed by cifar-job's tests/cluster/pyxis.sh: squashfuse, deaf to Slurm's SIGTERM.
trap '' TERM
exec $squashfuse "\$@"
WRAPPER
chmod 0755 $PREFIX/bin/squashfuse

install -m 0755 "$REPO/tests/cluster/import-cache.sh" "$STATE/import-cache"
# required, as sites load it: a step whose container cannot start fails. With optional, srun
# logs an error and runs the command on the host instead.
conf="required $PLUGIN runtime_path=$STATE/pyxis use_squashfuse=1 importer=$STATE/import-cache"
if [ "$(cat "$PLUGSTACK" 2>/dev/null)" != "$conf" ]; then
  mkdir -p "$(dirname "$PLUGSTACK")"
  echo "$conf" > "$PLUGSTACK"
  # srun and slurmstepd read plugstack.conf for every step; slurmd only when it starts.
  "$REPO/tests/cluster/stop.sh" >/dev/null
  "$REPO/tests/cluster/start.sh"
fi
echo "pyxis: ready ($(enroot version), $(basename "$PLUGIN"))"
