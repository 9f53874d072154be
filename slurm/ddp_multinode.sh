#!/usr/bin/env bash
# N nodes x G GPUs, one task per GPU: DDP training that checkpoints and requeues itself.
#
#   sbatch slurm/ddp_multinode.sh                          # from the cifar-job checkout
#   sbatch --time=2:00:00 --partition=gpu slurm/ddp_multinode.sh --max-epochs 100 --arch resnet50
#   RUN_DIR=runs/r34 sbatch slurm/ddp_multinode.sh          # resume (or extend) an earlier run
#   SPARE_NODES=1 sbatch --nodes=3 slurm/ddp_multinode.sh   # train on 2, one spare
#
# A crashed rank, a hang or a lost node costs seconds: the step starts again in this
# allocation, without a lost node (a spare takes its place; MIN_NODES lets it go on with
# fewer). --no-kill keeps the allocation when a node fails; losing the node this script
# runs on still ends it, and Slurm requeues the job.
#
# Scheduler settings: override with sbatch flags (--partition, --account, --time, ...) or
# SBATCH_* variables. Arguments after the script go to `cifar-job train`. Devices and nodes
# are read from the allocation, so changing --ntasks-per-node is enough.
#SBATCH --job-name=cifar-job
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# --signal: 180 s before the limit (Slurm may send it up to 60 s early) to this script, which
# asks every task to save; saving a ResNet34 takes seconds.
set -euo pipefail

# ---- edit these, or set them in the environment of sbatch ----
DATA_DIR=${DATA_DIR:-data}                                 # from `cifar-job download`
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}} # same across requeues
ACCELERATOR=${ACCELERATOR:-gpu}                            # cpu: same job over gloo
CIFAR_JOB=${CIFAR_JOB:-cifar-job}                          # command, e.g. .venv/bin/cifar-job
CIFAR_JOB_HOME=${CIFAR_JOB_HOME:-${SLURM_SUBMIT_DIR}}      # the checkout holding slurm/
export SPARE_NODES=${SPARE_NODES:-0}                       # of --nodes, kept for lost ones
export MIN_NODES=${MIN_NODES:-$((SLURM_JOB_NUM_NODES - SPARE_NODES))} # fewest to go on with
# ----

source "${CIFAR_JOB_HOME}/slurm/requeue.sh" || {
  echo "cifar-job: no slurm/requeue.sh in ${CIFAR_JOB_HOME}; set CIFAR_JOB_HOME" >&2; exit 1; }
# shellcheck disable=SC2086  # CIFAR_JOB may be several words: python -m cifar_job
run_requeueable srun --kill-on-bad-exit=1 ${CIFAR_JOB} train \
  --data-dir "${DATA_DIR}" --run-dir "${RUN_DIR}" --accelerator "${ACCELERATOR}" "$@"
