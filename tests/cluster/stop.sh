#!/usr/bin/env bash
# Stops the test cluster that start.sh started (jobs, slurmd, slurmctld; munged stays).
set -euo pipefail
scancel --full --quiet "$(squeue -h -o %i | tr '\n' ' ')" 2>/dev/null || true
pkill -x slurmd || true
pkill -x slurmctld || true
echo "slurm: stopped"
