#!/usr/bin/env bash
# Start a real two-node Slurm cluster on this host, for tests and for trying launch/submit.py:
#
#   bash slurm/local/start.sh [CLUSTER_DIR]        # default /tmp/imnet-slurm; needs root
#
# Everything lives in CLUSTER_DIR (slurm.conf, cgroup.conf, the munge key and socket, state,
# spool, logs, pid files) and in a named network namespace, `imnet-slurm`, whose only interface is
# loopback (127.0.0.1 plus 127.0.0.2: Slurm's name lookups fail with only one loopback address).
# Node names resolve there through /etc/netns/imnet-slurm/hosts, which `ip netns exec` mounts over
# /etc/hosts. Daemons: munged, slurmctld and two slurmd (nodes imnet-node1 and imnet-node2, one
# host, distinct ports). Clients must run inside the namespace with SLURM_CONF set; see the usage
# printed at the end. Stop with slurm/local/stop.sh [CLUSTER_DIR] (kills only what this started).
#
# Debian's slurm-wlm 22.05 here: no cgroup filesystem, so proctrack/linuxproc, task/none and a
# cgroup.conf that names cgroup/v1 without systemd; no accounting (slurm/local/bin/sacct stands in).
set -euo pipefail

DIR=$(realpath -m "${1:-/tmp/imnet-slurm}")
NETNS=${IMNET_SLURM_NETNS:-imnet-slurm}
NODES=(imnet-node1 imnet-node2)
ADDRS=(127.0.0.1 127.0.0.2)
CPUS=${IMNET_SLURM_CPUS:-4}      # per node; slurmd trusts the config (config_overrides), not the hardware
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "start.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (network namespaces and munged/slurmd as root)"
for b in munged mungekey slurmctld slurmd sinfo ip; do
    command -v "$b" >/dev/null || die "$b not found: run 'bash slurm/local/install.sh' first"
done
if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    die "a cluster is already running from $DIR (stop it with: bash $HERE/stop.sh $DIR)"
fi
if ip netns list | grep -qw "^$NETNS"; then
    die "network namespace $NETNS exists: another cluster runs, or one was not stopped (bash $HERE/stop.sh ITS_FOLDER; or: ip netns del $NETNS)"
fi

# from here on, a failure stops whatever this script started
trap 'rc=$?; [ $rc = 0 ] || { echo "start.sh: failed; cleaning up" >&2; bash "$HERE/stop.sh" "$DIR" >&2; }' EXIT

rm -rf "$DIR/state" "$DIR/spool"   # a fresh cluster: no jobs recovered from a previous run
mkdir -p "$DIR"/{munge,state,log} "${NODES[@]/#/$DIR/spool/}"
chmod 700 "$DIR/munge"
HOST=$(hostname -s)

# ---- the network namespace: loopback only, two addresses, node names in its own /etc/hosts ----
ip netns add "$NETNS"
echo "$NETNS" > "$DIR/netns"                    # stop.sh removes only the namespace named here
ip netns exec "$NETNS" ip link set lo up
ip netns exec "$NETNS" ip addr add 127.0.0.2/8 dev lo
mkdir -p "/etc/netns/$NETNS"
{
    grep -v -w -e "${NODES[0]}" -e "${NODES[1]}" /etc/hosts || true
    echo "127.0.0.1 $HOST"
    for i in 0 1; do echo "${ADDRS[$i]} ${NODES[$i]}"; done
} > "/etc/netns/$NETNS/hosts"
in_ns() { ip netns exec "$NETNS" "$@"; }

# ---- configuration ----
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
chmod 600 "$DIR/munge/munge.key"
cat > "$DIR/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
EOF
cat > "$DIR/slurm.conf" <<EOF
# Written by slurm/local/start.sh: a two-node test cluster on one host.
ClusterName=imnet
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1   # test cluster: schedule at once
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
FirstJobId=$(cat "$DIR/next_job_id" 2>/dev/null || echo 1)
InactiveLimit=0
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=${ADDRS[0]} Port=6818 CPUs=$CPUS State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=${ADDRS[1]} Port=6819 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---- daemons (each writes its pid file into DIR; stop.sh kills exactly those) ----
in_ns munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
export SLURM_CONF="$DIR/slurm.conf"
in_ns slurmctld -c -f "$SLURM_CONF"   # -c: a fresh queue; job ids go on from the last run (FirstJobId)
for n in "${NODES[@]}"; do
    in_ns slurmd -f "$SLURM_CONF" -N "$n"
done

# ---- wait until both nodes are idle ----
for _ in $(seq 1 150); do
    idle=$(in_ns sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
    [ "$idle" = 2 ] && break
    sleep 0.2
done
if [ "${idle:-0}" != 2 ]; then
    echo "start.sh: the nodes did not become idle in 30 s; sinfo says:" >&2
    in_ns sinfo -N >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
fi

ROOT=$(cd "$HERE/../.." && pwd)
cat <<EOF
Slurm cluster up: nodes ${NODES[*]} (partition debug, $CPUS CPUs each) in network namespace $NETNS.
  folder   $DIR (slurm.conf, logs in log/)
  use it   ip netns exec $NETNS env SLURM_CONF=$DIR/slurm.conf PATH=$ROOT/slurm/local/bin:\$PATH \\
             GLOO_SOCKET_IFNAME=lo python launch/submit.py --config configs/digits_gn.yaml \\
             --nodes 2 --gpus-per-node 0 --tasks-per-node 1
           (or open a shell there: ip netns exec $NETNS env SLURM_CONF=$DIR/slurm.conf bash)
  stop it  bash $HERE/stop.sh $DIR
EOF
