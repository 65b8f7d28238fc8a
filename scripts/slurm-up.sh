#!/usr/bin/env bash
# Start a one-node Slurm on 127.0.0.1 for the Slurm executor's tests (tests/it/slurm.rs).
#
# Installs the Debian packages slurm-wlm and munge when they are missing, writes
# /etc/slurm/slurm.conf for this host (its real CPUs and memory), starts munged, slurmctld and
# slurmd as root in the background, waits until `sinfo` shows the node idle, and writes their
# PIDs to $CJEPA_SLURM_STATE/pids (default /var/tmp/cjepa-slurm). `scripts/slurm-down.sh` stops them.
# Idempotent: when the three daemons of an earlier call still run, it only checks the node.
# Needs root (CI and the development machines run as root).
set -euo pipefail

STATE=${CJEPA_SLURM_STATE:-/var/tmp/cjepa-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by cjepa scripts/slurm-up.sh"
PARTITION=${CJEPA_SLURM_PARTITION:-debug}

say() { echo "slurm-up: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts the Slurm daemons)"

wait_idle() {
    # until the node answers idle (or mixed/allocated: jobs of an earlier test may still run)
    local i
    for i in $(seq 1 60); do
        local st
        st=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        case "$st" in
            idle|mixed|allocated|completing) say "node is $st after ${i}x0.5 s"; return 0 ;;
        esac
        sleep 0.5
    done
    say "sinfo says: $(sinfo -N 2>&1 | tail -n +2)"
    return 1
}

# --- already up? -----------------------------------------------------------------------------
if [ -f "$STATE/pids" ]; then
    up=1
    while read -r name pid; do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || up=0
    done < "$STATE/pids"
    if [ "$up" = 1 ] && wait_idle; then
        say "already running (pids in $STATE/pids)"
        exit 0
    fi
    say "stale $STATE/pids: restarting"
    "$(dirname "$0")/slurm-down.sh" || true
fi

# --- install ---------------------------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
    say "installing slurm-wlm munge (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # package scripts must not try to start services (no init system here): policy-rc.d says no
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# --- munge -----------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge "$STATE"
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

# --- slurm.conf ------------------------------------------------------------------------------
host=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away or set up Slurm by hand"
fi
cat > "$CONF" <<CONF
$MARK: a one-node cluster on 127.0.0.1 for tests
ClusterName=cjepa-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

# --- start -----------------------------------------------------------------------------------
: > "$STATE/pids"
# setpriv execs (no fork), so $! is munged itself
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground >>"$STATE/munged.out" 2>&1 &
echo "munged $!" >> "$STATE/pids"
for i in $(seq 1 50); do
    [ -S /run/munge/munge.socket.2 ] && break
    sleep 0.1
done
munge -n >/dev/null || die "munged does not answer (see $STATE/munged.out)"
# -i: ignore state saved by an earlier run (jobs of a previous cluster life)
slurmctld -D -i >>"$STATE/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$STATE/pids"
slurmd -D -N "$host" >>"$STATE/slurmd.out" 2>&1 &
echo "slurmd $!" >> "$STATE/pids"

# a node that went away with an earlier cluster life (daemons killed) may come back down
sleep 1
case "$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)" in
    down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME || true ;;
esac
if ! wait_idle; then
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "the node did not come up idle"
fi
say "up: partition $PARTITION, node $host with $cpus CPUs and $mem_mb MB (pids in $STATE/pids)"
