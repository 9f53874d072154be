#!/usr/bin/env bash
# Starts a real two-node Slurm cluster on this one machine, for the tests marked `slurm`:
# Debian's slurmctld, two slurmd "nodes" (n1, n2) on loopback, munge, and 4 fake GPUs per
# node so that --gpus-per-node and --gres schedule (torch still sees none and uses gloo).
# Installs the packages when missing. Idempotent: a running cluster is left as it is.
# Needs root and Debian or Ubuntu. Usage: tests/cluster/start.sh; tests/cluster/stop.sh
set -euo pipefail

CPUS_PER_NODE=${CPUS_PER_NODE:-4}   # more than the machine has: config_overrides allows it
STATE=${SLURM_TEST_STATE:-/var/lib/cifar-job-slurm}
GRACE_TIME=${GRACE_TIME:-10}        # seconds a preempted job in "low" has to save


if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm: installing slurmctld, slurmd, slurm-client and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null
fi

host=$(hostname -s)
for n in n1 n2; do
  grep -qE "^127\.0\.0\.1[[:space:]]+$n\$" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
done
for i in 0 1 2 3; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/log" /var/spool/slurmd /run/munge

conf=$(mktemp)
cat > "$conf" <<CONF
ClusterName=cifarjob
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# AuthInfo cred_expire=10 and a 1-2 s scheduler: a requeued job restarts in ~11 s, not ~160 s.
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=1,sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
MpiDefault=none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS_PER_NODE RealMemory=8000 Gres=gpu:fake:4 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS_PER_NODE RealMemory=8000 Gres=gpu:fake:4 State=UNKNOWN
# Preemption as production clusters set it up: a job in "high" preempts one in "low", which
# gets SIGTERM (not its --signal) and SIGKILL after GraceTime, and Slurm requeues it.
# "debug", the default, is never preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=high Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
# A running cluster with this very configuration is left as it is; any change restarts it.
# Both nodes answer: idle, or running jobs (a "*" suffix would say a node does not respond).
nodes_up() { [ "$(sinfo -h -N -p debug -o %T 2>/dev/null | grep -cxE 'idle|mixed|allocated|completing')" = 2 ]; }
if cmp -s "$conf" /etc/slurm/slurm.conf && nodes_up; then
  rm -f "$conf"; echo "slurm: already running"; exit 0
fi
pkill -x slurmd || true
pkill -x slurmctld || true
# A slurmd may wait on its jobs' last RPCs for seconds; a daemon still stopping would keep
# its replacement from starting below.
for _ in $(seq 80); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.25; done
pkill -9 -x slurmd || true
pkill -9 -x slurmctld || true
# A cluster that starts again starts empty. Jobs saved by a controller that was not stopped
# (a machine image taken mid-run, a crash) would come back RUNNING with no process behind
# them and hold both nodes allocated for ever.
pkill -9 -x slurmstepd || true
rm -rf "${STATE:?}/ctld"/* /var/spool/slurmd/*
mv "$conf" /etc/slurm/slurm.conf
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=n[1-2] Name=gpu Type=fake File=/dev/fakegpu[0-3]
CONF

[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
for n in n1 n2; do
  pgrep -f "slurmd -N $n" >/dev/null || slurmd -N "$n"
done

for _ in $(seq 60); do
  if nodes_up; then
    echo "slurm: 2 nodes up"; exit 0
  fi
  scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurm: nodes did not come up; see $STATE/log/" >&2
sinfo -N >&2 || true
exit 1
