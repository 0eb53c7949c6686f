#!/usr/bin/env bash
# Stop the cluster that slurm/local/start.sh started from CLUSTER_DIR (default /tmp/imnet-slurm):
#
#   bash slurm/local/stop.sh [CLUSTER_DIR]
#
# Kills only what start.sh started: the daemons named by the pid files in CLUSTER_DIR (a pid is
# killed only while it still runs the expected program), then the step daemons of this cluster
# and the job tasks under them (found by the SLURM_CONF they inherited), then munged; removes the
# network namespace recorded in CLUSTER_DIR/netns and its /etc/netns/<name> folder.
# Idempotent: a second call finds nothing to do.
set -uo pipefail

DIR=$(realpath -m "${1:-/tmp/imnet-slurm}")
CONF="$DIR/slurm.conf"

# the pid in FILE if that process still runs the program NAME (guards against a recycled pid)
live_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2"* ]] || return 1
    echo "$pid"
}

descendants() {  # every process below a pid
    local p
    for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$p"
        descendants "$p"
    done
}

# TERM them all at once (each takes ~2 s to shut down), then KILL what is left after 5 s.
# The program a pid file names is in its file name: slurmd-<node>.pid, slurmctld.pid, munged.pid.
stop_all() {  # PIDFILE...
    local f name pid pids=() names=() i
    for f in "$@"; do
        name=$(basename "$f" .pid)
        name=${name%%-*}
        pid=$(live_pid "$f" "$name") && pids+=("$pid") && names+=("$name") && kill -TERM "$pid" 2>/dev/null
        rm -f "$f"
    done
    for i in $(seq 1 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        kill -KILL "${pids[$i]}" 2>/dev/null
        echo "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}

# job ids go on after a restart (start.sh sets FirstJobId), so submitit's per-job files never clash
if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && [ -f "$DIR/netns" ]; then
    next=$(SLURM_CONF="$CONF" ip netns exec "$(cat "$DIR/netns")" scontrol show config 2>/dev/null |
           awk '$1 == "NEXT_JOB_ID" {print $3}')
    [[ "$next" =~ ^[0-9]+$ ]] && echo "$next" > "$DIR/next_job_id"
fi

shopt -s nullglob
stop_all "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"

# step daemons (and the job tasks under them) are not children of slurmd: find this cluster's by
# the SLURM_CONF they inherited from its slurmd
for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || continue
    if { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
        for k in $(descendants "$pid") "$pid"; do kill -KILL "$k" 2>/dev/null; done
        echo "killed a leftover step daemon (pid $pid) and its tasks"
    fi
done

stop_all "$DIR/munged.pid"

if [ -f "$DIR/netns" ]; then
    ns=$(cat "$DIR/netns")
    if [ -n "$ns" ] && ip netns list | grep -qw "^$ns"; then
        ip netns del "$ns" && echo "removed network namespace $ns"
    fi
    [ -n "$ns" ] && rm -rf "/etc/netns/$ns"
    rm -f "$DIR/netns"
fi
exit 0
