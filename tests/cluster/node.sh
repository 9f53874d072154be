#!/usr/bin/env bash
# One node of the test cluster (start.sh): `node.sh up NODE` starts its slurmd in its network
# namespace, with its host name (and, for n2 and n3, n1's topology with the CPUs numbered the
# other way round, as start.sh writes it); `node.sh down NODE` loses it as a machine is lost:
# its link cut, then its slurmd and every process in its namespace killed. Needs root.
set -euo pipefail
STATE=${CIFAR_JOB_SLURM_STATE:-/var/lib/cifar-job-slurm}
action=$1 node=$2
ns=cifar-job-$node
case "$action" in
  up)
    ip link set "cj$node" up 2>/dev/null || true
    topology=""
    if [ "$node" != n1 ] && [ -s "$STATE/n2-topology.xml" ]; then topology=$STATE/n2-topology.xml; fi
    # nsenter, not `ip netns exec`, which mounts a /sys without the cgroup tree slurmd needs.
    pgrep -f "slurmd -N $node\$" >/dev/null ||
      nsenter --net="/run/netns/$ns" unshare --uts \
        env ${topology:+HWLOC_XMLFILE=$topology HWLOC_THISSYSTEM=1} \
        sh -c "hostname $node && exec slurmd -N $node"
    ;;
  down)
    ip link set "cj$node" down
    pkill -9 -f "slurmd -N $node\$" || true
    # Its tasks: every process whose network is the node's (slurmstepd and what it runs).
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
    ;;
  *)
    echo "usage: $0 up|down NODE" >&2
    exit 2
    ;;
esac
