#!/usr/bin/env bash
# One node, 4 GPUs, in the cifar-job image through Apptainer (apptainer exec --nv).
#
#   apptainer build cifar-job.sif docker-daemon://cifar-job:latest    # once
#   SIF=$PWD/cifar-job.sif sbatch slurm/ddp_4gpu_apptainer.sh --max-epochs 100
#
# The batch script runs on the host, so the requeue works although the image has no scontrol.
# Scheduler settings: sbatch flags or SBATCH_* variables; trailing arguments go to train.
#SBATCH --job-name=cifar-job
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# ---- edit these, or set them in the environment of sbatch ----
SIF=${SIF:-cifar-job.sif}                                  # from `apptainer build`
APPTAINER_ARGS=${APPTAINER_ARGS:---nv}                     # --nv: the host's NVIDIA driver
DATA_DIR=${DATA_DIR:-data}                                 # relative to the submit directory
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}} # same across requeues
ACCELERATOR=${ACCELERATOR:-gpu}
CIFAR_JOB_HOME=${CIFAR_JOB_HOME:-${SLURM_SUBMIT_DIR}}      # the checkout holding slurm/
# ----

source "${CIFAR_JOB_HOME}/slurm/requeue.sh" || {
  echo "cifar-job: no slurm/requeue.sh in ${CIFAR_JOB_HOME}; set CIFAR_JOB_HOME" >&2; exit 1; }
# The tasks check that they run in the image, never on the host (cifar-job stops otherwise).
export CIFAR_JOB_CONTAINER="${SIF}"
# The submit, data and run directories are bound each at its own path, so relative and
# absolute DATA_DIR and RUN_DIR mean the same inside and out.
binds=$(cifar_job_host_dirs | paste -sd, -)
# apptainer exec passes signals on to cifar-job, so USR1 reaches the training process.
# shellcheck disable=SC2086  # APPTAINER_ARGS is a list of flags
run_requeueable srun --kill-on-bad-exit=1 apptainer exec ${APPTAINER_ARGS} \
  --bind "${binds}" --pwd "${SLURM_SUBMIT_DIR}" "${SIF}" \
  cifar-job train --data-dir "${DATA_DIR}" --run-dir "${RUN_DIR}" --accelerator "${ACCELERATOR}" "$@"
