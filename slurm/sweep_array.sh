#!/usr/bin/env bash
# A sweep as a job array: each array task trains one element of RUN_DIR/sweep.json in its own
# run directory, checkpoints, and requeues itself like a single run.
#
#   cifar-job submit --dry-run --sweep lr=0.1,0.05 --seeds 3 --run-dir runs/lr-sweep
#       # prints the table of runs and writes the plan runs/lr-sweep/sweep.json
#   sbatch --array=0-5%4 slurm/sweep_array.sh runs/lr-sweep     # 6 elements, 4 at a time
#   sbatch --array=2 slurm/sweep_array.sh runs/lr-sweep         # rerun element 2 alone
#
# Scheduler settings: sbatch flags or SBATCH_* variables, as for ddp_4gpu.sh; one element
# per array task, here one GPU. Arguments after the sweep directory go to `cifar-job train`
# and apply to every element (e.g. --num-workers 4); the element's own settings come from
# sweep.json. `cifar-job status runs/lr-sweep` and `cifar-job compare runs/lr-sweep` follow it.
#SBATCH --job-name=cifar-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

SWEEP_DIR=${1:?usage: sbatch --array=0-N slurm/sweep_array.sh SWEEP_DIR [train options]}
shift
INDEX=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=...}

# ---- edit these, or set them in the environment of sbatch ----
DATA_DIR=${DATA_DIR:-}                                # default: the plan's --data-dir
ACCELERATOR=${ACCELERATOR:-}                          # default: the plan's; cpu: gloo
CIFAR_JOB=${CIFAR_JOB:-cifar-job}                     # command, e.g. .venv/bin/cifar-job
PYTHON=${PYTHON:-python3}                             # reads sweep.json
CIFAR_JOB_HOME=${CIFAR_JOB_HOME:-${SLURM_SUBMIT_DIR}} # the checkout holding slurm/
# ----

# The element's run directory, and its full config as a --config file beside it.
RUN_DIR=$("$PYTHON" - "${SWEEP_DIR}/sweep.json" "$INDEX" <<'EOF'
import json, pathlib, sys
elements = json.load(open(sys.argv[1]))["elements"]
index = int(sys.argv[2])
if index >= len(elements):
    sys.exit(f"cifar-job: array index {index}, but the sweep has {len(elements)} elements")
element = elements[index]
run_dir = pathlib.Path(element["run_dir"])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "sweep-element.json").write_text(json.dumps(element["config"]))
print(run_dir)
EOF
)
export RUN_DIR

source "${CIFAR_JOB_HOME}/slurm/requeue.sh" || {
  echo "cifar-job: no slurm/requeue.sh in ${CIFAR_JOB_HOME}; set CIFAR_JOB_HOME" >&2; exit 1; }
# shellcheck disable=SC2086  # CIFAR_JOB may be several words: python -m cifar_job
run_requeueable srun --kill-on-bad-exit=1 ${CIFAR_JOB} train \
  --config "${RUN_DIR}/sweep-element.json" \
  ${DATA_DIR:+--data-dir "${DATA_DIR}"} ${ACCELERATOR:+--accelerator "${ACCELERATOR}"} "$@"
