#!/usr/bin/env bash
# Stops the test cluster that start.sh started (jobs, slurmd, slurmctld, slurmdbd; munged and
# MariaDB stay).
set -euo pipefail
scancel --full --quiet "$(squeue -h -o %i | tr '\n' ' ')" 2>/dev/null || true
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x slurmdbd || true
echo "slurm: stopped"
