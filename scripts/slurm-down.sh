#!/usr/bin/env bash
# Stop the one-node Slurm started by scripts/slurm-up.sh (by the PIDs it wrote).
set -uo pipefail
STATE=${CJEPA_SLURM_STATE:-/var/tmp/cjepa-slurm}
[ -f "$STATE/pids" ] || { echo "slurm-down: nothing to stop ($STATE/pids is missing)" >&2; exit 0; }
# reverse order: slurmd, slurmctld, munged
tac "$STATE/pids" | while read -r name pid; do
    # only our daemon: after a reboot or a container restart the PID may belong to another process
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        echo "slurm-down: stopped $name ($pid)" >&2
    fi
done
rm -f "$STATE/pids"
