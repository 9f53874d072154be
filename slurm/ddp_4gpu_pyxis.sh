#!/usr/bin/env bash
# One node, 4 GPUs, in the cifar-job container through enroot/pyxis (srun --container-image).
#
#   enroot import dockerd://cifar-job:latest          # once: cifar-job+latest.sqsh
#   IMAGE=$PWD/cifar-job+latest.sqsh sbatch slurm/ddp_4gpu_pyxis.sh --max-epochs 100
#   IMAGE=dockerd://cifar-job:latest sbatch ...      # or straight from the node's Docker engine
#   IMAGE=registry.example.org#group/cifar-job:1.0 sbatch ...   # or from a registry
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
IMAGE=${IMAGE:-cifar-job:latest}                           # a .sqsh, or docker://REGISTRY#IMAGE
DATA_DIR=${DATA_DIR:-data}                                 # relative to the submit directory
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}} # same across requeues
ACCELERATOR=${ACCELERATOR:-gpu}
CIFAR_JOB_HOME=${CIFAR_JOB_HOME:-${SLURM_SUBMIT_DIR}}      # the checkout holding slurm/
# ----

source "${CIFAR_JOB_HOME}/slurm/requeue.sh" || {
  echo "cifar-job: no slurm/requeue.sh in ${CIFAR_JOB_HOME}; set CIFAR_JOB_HOME" >&2; exit 1; }
# The tasks check that they run in the image, never on the host (cifar-job stops otherwise).
export CIFAR_JOB_CONTAINER="${IMAGE}"
# The submit, data and run directories are mounted each at its own path, so relative and
# absolute DATA_DIR and RUN_DIR mean the same inside and out.
mounts=$(cifar_job_host_dirs | sed 's/.*/&:&/' | paste -sd, -)
# enroot runs the job as your user, not the image's (1000): the run directory's files are yours.
run_requeueable srun --kill-on-bad-exit=1 --container-image="${IMAGE}" \
  --container-mounts="${mounts}" --container-workdir="${SLURM_SUBMIT_DIR}" \
  cifar-job train --data-dir "${DATA_DIR}" --run-dir "${RUN_DIR}" --accelerator "${ACCELERATOR}" "$@"
