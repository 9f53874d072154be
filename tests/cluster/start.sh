#!/usr/bin/env bash
# Starts a real Slurm cluster (two nodes, and a spare) on this one machine, for the tests marked `slurm`:
# Debian's slurmctld, three slurmd "nodes" (n1, n2, and n3, a spare that only the "spare"
# partition uses), munge, 4 fake GPUs per node so that
# --gpus-per-node and --gres schedule (torch still sees none and uses gloo), and accounting
# as sites keep it: slurmdbd on a MariaDB database, which `sacct` reads.
# Each node is a network namespace of its own, with its own address and host name on a
# private test network that only this machine has (10.77.0.0/24, on a bridge with the
# controller at 10.77.0.1): a wrong MASTER_ADDR, a host name that resolves on one node only,
# or gloo on the wrong interface fail here as they would on a site. Tasks are bound to the
# CPUs Slurm gives them (task/affinity), as sites bind them; each node has this machine's
# cores, n2 numbering them the other way round, so that a 2-node job's first tasks run on
# different cores, as on two machines. And an ordinary user, cifarjob, for the tests that
# submit as a site's users do.
# Installs the packages when missing. Idempotent: a running cluster is left as it is.
# Needs root and Debian or Ubuntu. Usage: tests/cluster/start.sh; tests/cluster/stop.sh
set -euo pipefail

CPUS_PER_NODE=$(nproc)              # bound tasks run on real CPUs: no more than there are
STATE=${SLURM_TEST_STATE:-/var/lib/cifar-job-slurm}
GRACE_TIME=${GRACE_TIME:-10}        # seconds a preempted job in "low" has to save


DB=cifar_job_slurm_acct             # the accounting database, on the machine's MariaDB
DB_USER=cifar_job_slurmdbd

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null ||
   ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  echo "slurm: installing slurmctld, slurmd, slurmdbd, slurm-client, munge and mariadb-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    slurmd slurmctld slurmdbd slurm-client munge mariadb-server >/dev/null
fi

# An ordinary user for the jobs that run as on a site: not root, and a home directory that
# does not exist, so nothing a job does may depend on writing there.
id cifarjob >/dev/null 2>&1 ||
  useradd --system --no-create-home --home-dir /nonexistent --shell /bin/bash cifarjob

host=$(hostname -s)
NET=10.77.0        # the test network: the controller at .1, node nI at .1I
BRIDGE=cifarjob0
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip addr show dev "$BRIDGE" | grep -q "inet $NET.1/24" || ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in 1 2 3; do
  ns=cifar-job-n$i
  ip netns list | grep -qw "$ns" || ip netns add "$ns"
  # Checked from inside: a namespace deleted a moment ago (wipe.sh) can leave its host end,
  # cjnI, behind for a while, and a new namespace would then get no link at all.
  if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    ip link del "cjn$i" 2>/dev/null || true
    ip link add "cjn$i" type veth peer name eth0 netns "$ns"
    ip link set "cjn$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$NET.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # No route beyond the test network: nothing a node does leaves this machine, and a name
    # server it cannot reach fails at once (with a route, each of c10d's reverse look-ups
    # waited 10 s for one).
  fi
  sed -i "/[[:space:]]n$i\$/d" /etc/hosts
  echo "$NET.1$i n$i" >> /etc/hosts
done
# Where Docker has set the FORWARD policy to DROP, node-to-node traffic across the bridge
# would be dropped with it.
if command -v iptables >/dev/null; then
  iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null ||
    iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
fi
for i in 0 1 2 3; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/log" /var/spool/slurmd /run/munge

conf=$(mktemp)
cat > "$conf" <<CONF
ClusterName=cifarjob
SlurmctldHost=$host($NET.1)
SlurmUser=root
AuthType=auth/munge
# AuthInfo cred_expire=5 (its least) and a 1-2 s scheduler: a requeued job restarts in ~7 s,
# not ~160 s.
AuthInfo=cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
MpiDefault=none
NodeName=n1 NodeHostname=n1 NodeAddr=$NET.11 Port=17001 CPUs=$CPUS_PER_NODE RealMemory=8000 Gres=gpu:fake:4 State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=$NET.12 Port=17002 CPUs=$CPUS_PER_NODE RealMemory=8000 Gres=gpu:fake:4 State=UNKNOWN
NodeName=n3 NodeHostname=n3 NodeAddr=$NET.13 Port=17003 CPUs=$CPUS_PER_NODE RealMemory=8000 Gres=gpu:fake:4 State=UNKNOWN
# Preemption as production clusters set it up: a job in "high" preempts one in "low", which
# gets SIGTERM (not its --signal) and SIGKILL after GraceTime, and Slurm requeues it.
# "debug", the default, is never preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=high Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
# Spare nodes (tests/test_relaunch.py): n3 only here, so the partitions above keep two nodes.
PartitionName=spare Nodes=n1,n2,n3 MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
CONF
chmod 644 "$conf"  # every user's sbatch and srun read it (mktemp made it 0600)
[ ! -e /etc/slurm/slurm.conf ] || chmod 644 /etc/slurm/slurm.conf
# A running cluster with this very configuration is left as it is; any change restarts it.
# Both nodes answer: idle, or running jobs (a "*" suffix would say a node does not respond).
nodes_up() { [ "$(sinfo -h -N -p spare -o %T 2>/dev/null | grep -cxE 'idle|mixed|allocated|completing')" = 3 ]; }
if cmp -s "$conf" /etc/slurm/slurm.conf && nodes_up && pgrep -x slurmdbd >/dev/null; then
  rm -f "$conf"; echo "slurm: already running"; exit 0
fi
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x slurmdbd || true
# A slurmd may wait on its jobs' last RPCs for seconds; a daemon still stopping would keep
# its replacement from starting below.
for _ in $(seq 80); do { pgrep -x slurmd || pgrep -x slurmctld || pgrep -x slurmdbd; } >/dev/null || break; sleep 0.25; done
pkill -9 -x slurmd || true
pkill -9 -x slurmctld || true
pkill -9 -x slurmdbd || true
# A cluster that starts again starts empty. Jobs saved by a controller that was not stopped
# (a machine image taken mid-run, a crash) would come back RUNNING with no process behind
# them and hold both nodes allocated for ever.
pkill -9 -x slurmstepd || true
rm -rf "${STATE:?}/ctld"/* /var/spool/slurmd/*
mv "$conf" /etc/slurm/slurm.conf

# The accounting database, new with the cluster's job ids (they start again at 1).
if ! mysqladmin ping >/dev/null 2>&1; then
  if [ -x /etc/init.d/mariadb ]; then /etc/init.d/mariadb start >/dev/null
  else mkdir -p /run/mysqld && chown mysql /run/mysqld && (mysqld_safe >/dev/null 2>&1 &); fi
  for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
DB_PASS=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mysql <<SQL
DROP DATABASE IF EXISTS $DB;
CREATE DATABASE $DB;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB.* TO '$DB_USER'@'localhost';
SQL
install -m 600 /dev/stdin /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB
LogFile=$STATE/log/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=n[1-3] Name=gpu Type=fake File=/dev/fakegpu[0-3]
CONF

[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
slurmdbd
for _ in $(seq 60); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.25; done
sacctmgr -i add cluster cifarjob >/dev/null
pgrep -x slurmctld >/dev/null || slurmctld
start_node() {  # NODE: tests/cluster/node.sh, which n2's and n3's topology reaches
  CIFAR_JOB_SLURM_STATE="$STATE" "$(dirname "$0")/node.sh" up "$1"
}
start_node n1
# n2 reads the topology n1 found (slurmd writes it at start) with its CPUs numbered the
# other way round: task/affinity binds a node's first task to its first core, which is then
# machine CPU 0 on n1 and the last one on n2.
topology=/var/spool/slurmd/n1/hwloc_topo_whole.xml
for _ in $(seq 100); do grep -qs '</topology>' "$topology" && break; sleep 0.1; done
if grep -qs '</topology>' "$topology"; then
  awk 'NR == FNR { if (match($0, /type="PU" os_index="[0-9]+"/)) {
                     id = substr($0, RSTART, RLENGTH); gsub(/[^0-9]/, "", id); ids[n++] = id }
                   next }
       /type="PU" os_index="/ { sub(/os_index="[0-9]+"/, "os_index=\"" ids[--n] "\"") } 1' \
    "$topology" "$topology" > "$STATE/n2-topology.xml"
else  # a slurmd without hwloc writes none: n2 numbers its cores as n1 does
  echo "slurm: no topology from n1 ($topology): 2-node jobs share their nodes' first cores" >&2
fi
start_node n2
start_node n3  # numbered as n2: a spare that takes n2's place keeps the job's layout

for _ in $(seq 60); do
  if nodes_up; then
    echo "slurm: 3 nodes up"; exit 0
  fi
  scontrol update nodename=n1,n2,n3 state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurm: nodes did not come up; see $STATE/log/" >&2
sinfo -N >&2 || true
exit 1
