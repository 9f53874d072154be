# shellcheck shell=bash
# Sourced by the sbatch templates: runs the training step so that a preempted or timed-out
# job checkpoints and requeues itself, from this batch script on the host. That works even
# when training runs in a container without `scontrol`.
#
#   Slurm --signal=B:USR1@N  ->  trap below  ->  USR1 to every task of the step
#   -> the ranks agree at the next step, save last.ckpt together and exit 75
#   -> `scontrol requeue` here -> the job restarts with the same id and run directory,
#      and `cifar-job train` resumes from last.ckpt.
#
# Settings (environment): MAX_REQUEUES (default 10); RUN_DIR, the run directory.

REQUEUE_EXIT=75

# run_requeueable CMD...: run CMD (an srun line) in the background, forward a preemption
# signal to its tasks, and requeue the job if it saved for a requeue.
run_requeueable() {
  local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-10} signalled=0 rc=0 pid
  echo "cifar-job: job ${SLURM_JOB_ID} start $((restarts + 1)) on ${SLURM_JOB_NODELIST}"
  trap 'signalled=1; echo "cifar-job: preemption signal; asking the tasks to checkpoint";
        scancel --signal=USR1 "${SLURM_JOB_ID}"' USR1
  "$@" &
  pid=$!
  # `wait` returns early when the trap runs; wait again until the step has really ended.
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1
  # The ranks write RUN_DIR/preempted.json before they save for a requeue.
  saved=0
  if [ "$rc" -eq "$REQUEUE_EXIT" ] || [ -e "${RUN_DIR:-.}/preempted.json" ]; then saved=1; fi
  if [ "$saved" -eq 0 ] && { [ "$signalled" -eq 0 ] || [ "$rc" -eq 0 ]; }; then
    return "$rc"  # finished, or failed on its own: no requeue
  fi
  # Saved (exit 75, or a rank killed while exiting after the save). Signalled but died
  # another way (e.g. before the handlers were in place): the previous checkpoint is still
  # whole, so a requeue loses only the unsaved steps.
  if [ "$restarts" -ge "$max" ]; then
    echo "cifar-job: requeued ${restarts} times already (MAX_REQUEUES=${max}); stopping" >&2
    return 1
  fi
  echo "cifar-job: requeueing job ${SLURM_JOB_ID} (restart $((restarts + 1)) of at most ${max})"
  scontrol requeue "${SLURM_JOB_ID}"
  # The requeue ends this script; exit cleanly if it has not yet.
  return 0
}
