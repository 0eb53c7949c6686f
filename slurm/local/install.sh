#!/usr/bin/env bash
# Install what slurm/local/start.sh needs (Debian/Ubuntu: slurm-wlm and munge), only when missing:
#
#   bash slurm/local/install.sh
#
# Idempotent: a second run prints "already installed" and changes nothing. Needs root (or sudo)
# when something is missing. start.sh runs its own daemons with their own key, socket and config in
# a network namespace: whatever services the packages start (or fail to start, in containers
# without systemd) are not used.
set -euo pipefail

need=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null && command -v mungekey >/dev/null || need+=(munge)
command -v ip >/dev/null || need+=(iproute2)      # ip netns
command -v ps >/dev/null || need+=(procps)        # stop.sh
command -v strace >/dev/null || need+=(strace)   # tests: the sockets an offline W&B run opens

if [ ${#need[@]} -eq 0 ]; then
    echo "install.sh: slurm-wlm and munge already installed ($(slurmctld -V 2>/dev/null), munge $(munged -V 2>/dev/null | awk '{print $1}' | sed 's/munge-//'))"
    exit 0
fi
command -v apt-get >/dev/null || { echo "install.sh: error: no apt-get; install ${need[*]} with your package manager" >&2; exit 1; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "install.sh: installing ${need[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install.sh: installed ${need[*]} ($(slurmctld -V))"
