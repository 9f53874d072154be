# shellcheck shell=bash
# What the batch script does around the training step when a job is stopped. Sourced by the
# sbatch templates (as slurm/requeue.sh) and by the batch script `cifar-job submit` writes,
# so both launch paths follow one policy. It runs on the host, so it works when training
# runs in a container without `scontrol`. The Python side is cifar_job/checkpoints.py.
#
#   time limit: Slurm's --signal (USR1 to this script from the templates, USR2 to the tasks
#   from submit) -> the ranks save last.ckpt at the same step and exit 75 -> `scontrol
#   requeue` here -> the job restarts and resumes.
#
#   preemption, scancel, scontrol requeue, a node going down: SIGTERM to the tasks -> the
#   ranks save and exit 143 -> this script waits until Slurm ends the job, so that Slurm's
#   own decision stands: it requeues a preempted job (PreemptMode=REQUEUE, at the end of
#   GraceTime) and a requeued one, and a cancelled one ends CANCELLED. Under preemption only
#   the tasks are signalled; had this script exited then, Slurm would have recorded the job
#   as FAILED (or COMPLETED, for status 0) and never requeued it. One exception: preempted
#   in a partition whose PreemptMode is REQUEUE, with the save whole, the script requeues the
#   job at once, which is what Slurm would do at the end of GraceTime: the nodes go to the
#   preempting job now instead of idling (CANCEL and SUSPEND keep the wait).
#
#   a hang, a rank killed, a lost peer or node (cifar_job/watchdog.py): a healthy rank saves
#   the last completed step and decides `relaunch` -> the training step starts again in this
#   allocation, within seconds, on the nodes that answer (cifar_job_step: spares, MIN_NODES)
#   -> where too few are left, `scontrol requeue` here, as at a time limit.
#
# Python decides (RUN_DIR/decision.env, read by cifar_job_read_decision). What stays here is
# what only the host can know, or what no Python process is left to decide: a step that
# ended with no decision (a rank killed before rank 0 wrote one: exit 75 still means saved),
# and, after a SIGTERM, Slurm's own view (is it ending the job, and does the partition's
# PreemptMode requeue it), which scontrol gives the host and not a container.
#
# Settings (environment): RUN_DIR, the run directory (required). Each requeue this script
# asks for is a line in RUN_DIR/requeues.log. There is one restart budget, Python's
# --max-stalled-starts (stops.py, checkpoints.check_progress): a start that made no new
# checkpoint counts, whatever ended it but a SIGTERM; a start that made one does not.

CIFAR_JOB_REQUEUE_EXIT=75 # stops.REQUEUE_EXIT
cifar_job_signalled=0     # USR1 reached this script
cifar_job_stopping=0      # SIGTERM reached this script: Slurm is ending the job
# Relaunch inside the allocation (cifar_job_step): a start that ends with a fault another
# start would not meet again (a hang, a lost peer, a rank killed) is followed at once by a
# new training step in this allocation, on the nodes that still answer, instead of a trip
# through the queue. SPARE_NODES of the allocation's nodes are kept out of the first step and
# take a lost node's place; MIN_NODES (default: the nodes it trains on) lets it go on with
# fewer. Losing this script's own node ends the allocation: Slurm requeues the job then.
export CIFAR_JOB_RELAUNCH=0 # relaunches so far in this allocation (slurm.relaunch_count)
cifar_job_step_nodes=""     # the nodes the last step ran on, comma-separated
cifar_job_blind=0           # relaunches in a row after a step that left no decision
cifar_job_back_to_queue=0   # a relaunch found too few nodes: requeue instead

# cifar_job_host_dirs: for the container templates, the directories to mount at their own
# paths, one a line: the submit directory, and DATA_DIR and RUN_DIR where they lie outside it
# (created first: container runtimes mount only directories that exist). Fails, saying which,
# where the job's user cannot create or enter one.
cifar_job_host_dirs() {
  local dir path
  echo "${SLURM_SUBMIT_DIR}"
  for dir in "${DATA_DIR}" "${RUN_DIR}"; do
    if ! mkdir -p "${dir}" || ! path=$(cd "${dir}" && pwd -P); then
      echo "cifar-job: ${dir}: the job's user, $(id -un), cannot create or enter it;" \
        "give it access (the data directory to read, the run directory to write)" >&2
      return 1
    fi
    dir=${path}
    case "${dir}/" in
      "${SLURM_SUBMIT_DIR}"/*) ;;
      *) echo "${dir}" ;;
    esac
  done
}

# cifar_job_read_decision: the decision Python wrote for this start (RUN_DIR/decision.env,
# KEY=value lines: cifar_job/rundir.py's decision_env), into cifar_job_action (none where
# there is none), cifar_job_saved (1 once the save is whole) and cifar_job_exclude. The
# file is read line by line, never sourced. RUN_DIR/decision.json says the same for people.
cifar_job_read_decision() {
  local key value
  cifar_job_action=none cifar_job_saved=0 cifar_job_exclude="" cifar_job_lost=""
  [ -e "${RUN_DIR}/decision.env" ] || return 0
  while IFS='=' read -r key value; do
    case "$key" in
      action) cifar_job_action=$value ;;
      saved) cifar_job_saved=$value ;;
      exclude) cifar_job_exclude=$value ;;
      lost) cifar_job_lost=$value ;;
    esac
  done <"${RUN_DIR}/decision.env"
}

# cifar_job_before_step: the traps, and no decision left by an earlier start.
cifar_job_before_step() {
  : "${RUN_DIR:?cifar-job: set RUN_DIR to the run directory}"
  rm -f "${RUN_DIR}/decision.env" "${RUN_DIR}/decision.json"
  echo "cifar-job: job ${SLURM_JOB_ID} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}"
  # Note it and go on waiting for the step: the tasks got SIGTERM too, and they are saving.
  trap 'cifar_job_stopping=1' TERM
}

# cifar_job_slurm_is_ending_job: whether Slurm is preempting, cancelling or requeueing this job.
cifar_job_slurm_is_ending_job() {
  local info
  info=$(scontrol show job -o "${SLURM_JOB_ID}" 2>/dev/null) || return 1
  case "$info" in
    *"JobState=RUNNING "*) ;;
    *) return 0 ;;
  esac
  case "$info" in
    *"PreemptTime=None"*) return 1 ;;
    *"PreemptTime="*) return 0 ;;
  esac
  return 1
}

# cifar_job_after_step RC: what the job does once the training step ended with status RC.
# Python's decision, in the marker, comes first; the status only where no marker was left.
cifar_job_after_step() {
  local rc=$1 marker="${RUN_DIR}/decision.json" kind=none
  trap - USR1
  cifar_job_read_decision
  case "$cifar_job_action" in
    finished) return 0 ;; # whatever status a trap made `wait` report
    fail)
      echo "cifar-job: the run failed in a way that another start would meet again; no requeue"
      return $((rc == 0 ? 1 : rc))
      ;;
    requeue | relaunch) kind=requeue ;; # a relaunch the allocation could not take
    wait) kind=stop ;;
    *) # no decision: a rank died before rank 0 could write one; only its status is left
      if [ "$rc" -eq "$CIFAR_JOB_REQUEUE_EXIT" ]; then kind=requeue; fi ;;
  esac
  if [ "$cifar_job_back_to_queue" = 1 ]; then kind=requeue; fi
  if [ "$rc" -ne 0 ] && { [ "$kind" = stop ] || [ "$cifar_job_stopping" = 1 ] ||
    cifar_job_slurm_is_ending_job; }; then
    echo "cifar-job: job ${SLURM_JOB_ID} was stopped (preemption, cancel, requeue or SIGTERM)" \
      "$(cifar_job_saved "$marker" "$kind"); waiting for Slurm to end it"
    if cifar_job_wait_for_slurm; then
      return "$rc" # Slurm ends the job and decides whether it runs again
    fi
    # A SIGTERM that Slurm does not follow (scancel --signal=TERM, a health checker): the
    # run saved, and waiting would leave the allocation idle.
    echo "cifar-job: Slurm is not ending job ${SLURM_JOB_ID}; requeueing it to go on"
    cifar_job_requeue
    return
  fi
  if [ "$kind" = none ] && { [ "$cifar_job_signalled" = 0 ] || [ "$rc" -eq 0 ]; }; then
    return "$rc" # finished, or failed on its own: no requeue
  fi
  # Saved for a requeue (exit 75, a hang, or a rank killed while exiting after the save).
  # Signalled but died another way (e.g. before the handlers were in place): the previous
  # checkpoint is still whole, so a requeue loses only the unsaved steps.
  cifar_job_requeue
}

# cifar_job_saved MARKER KIND: how far the stop got, for the log.
cifar_job_saved() {
  local text
  text=$(cat "$1" 2>/dev/null) || text="no marker"
  if [ "$cifar_job_saved" = 1 ]; then
    echo "after the run saved: ${text}"
  elif [ "$2" != none ]; then
    echo "while the run was saving (the save did not finish; the previous checkpoint stands): ${text}"
  else
    echo "before the run could save"
  fi
}

# cifar_job_wait_for_slurm: after a SIGTERM, whether Slurm is ending the job
# (preempting, cancelling or requeueing it). If so, wait for its SIGKILL, at the end of
# GraceTime or KillWait (an hour is only a backstop), unless a preemption that Slurm would
# answer with a requeue can be requeued now (cifar_job_requeue_preempted). Slurm marks the job
# before it signals it; the window (CIFAR_JOB_SLURM_WINDOW, 30 s) leaves room for a slow
# controller.
cifar_job_wait_for_slurm() {
  local waited=0
  while ! cifar_job_slurm_is_ending_job; do
    if [ "$waited" -ge "${CIFAR_JOB_SLURM_WINDOW:-30}" ]; then return 1; fi
    sleep 2
    waited=$((waited + 2))
  done
  if cifar_job_requeue_preempted; then return 0; fi
  for _ in $(seq 1800); do sleep 2; done
  return 0
}

# cifar_job_preempt_mode: the PreemptMode of the partition this job runs in, as Slurm says it
# (REQUEUE, CANCEL, SUSPEND, GANG,SUSPEND, OFF), or nothing.
cifar_job_preempt_mode() {
  scontrol show partition -o "${SLURM_JOB_PARTITION:-}" 2>/dev/null |
    sed -n 's/.* PreemptMode=\([^ ]*\).*/\1/p'
}

# cifar_job_requeue_preempted: requeue the job now if Slurm is preempting it (it still
# runs, with a PreemptTime: not a cancel, not an admin's requeue), its partition's PreemptMode
# is REQUEUE (Slurm would requeue it at the end of GraceTime) and the save is whole.
cifar_job_requeue_preempted() {
  local info mode
  [ "$cifar_job_saved" = 1 ] || return 1
  info=$(scontrol show job -o "${SLURM_JOB_ID}" 2>/dev/null) || return 1
  case "$info" in
    *"JobState=RUNNING "*"PreemptTime=None"*) return 1 ;;
    *"JobState=RUNNING "*"PreemptTime="*) ;;
    *) return 1 ;;
  esac
  mode=$(cifar_job_preempt_mode)
  [ "$mode" = REQUEUE ] || return 1
  echo "cifar-job: preempted, and the save is whole: requeueing job ${SLURM_JOB_ID} now, as" \
    "Slurm would at the end of GraceTime (its partition's PreemptMode=REQUEUE); the nodes are free"
  scontrol requeue "${SLURM_JOB_ID}"
}

# cifar_job_requeue: `scontrol requeue`, away from the nodes that the decision excludes (a
# hang with --exclude-hung-node). The next start stops the job itself once too many starts
# in a row made no new checkpoint (--max-stalled-starts).
cifar_job_requeue() {
  echo "job ${SLURM_JOB_ID} $(date +%FT%T) restart $((${SLURM_RESTART_COUNT:-0} + 1))" >>"${RUN_DIR}/requeues.log"
  echo "cifar-job: requeueing job ${SLURM_JOB_ID} (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
  if [ -n "$cifar_job_exclude" ]; then
    cifar_job_requeue_excluding "$cifar_job_exclude"
  else
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return 0 # the requeue ends this script; exit cleanly if it has not yet
}

# cifar_job_requeue_excluding NODES: requeue this job away from NODES (a hung rank's node,
# with --exclude-hung-node). Slurm changes the excluded nodes of pending jobs only: hold the
# job as it is requeued, add them, release it. The requeue sends SIGTERM to this script and
# its commands, and the two scontrol calls after it must still run: SIGTERM is ignored from
# here on (Slurm's SIGKILL, after KillWait, still ends the script).
cifar_job_requeue_excluding() {
  local nodes=$1 old
  old=$(scontrol show job -o "${SLURM_JOB_ID}" | sed -n 's/.* ExcNodeList=\([^ ]*\).*/\1/p') || true
  if [ "$old" = "(null)" ]; then old=""; fi
  echo "cifar-job: excluding node(s) ${nodes} from job ${SLURM_JOB_ID} (a rank hung there)"
  trap '' TERM
  scontrol requeuehold "${SLURM_JOB_ID}"
  scontrol update JobId="${SLURM_JOB_ID}" ExcNodeList="${old:+${old},}${nodes}"
  scontrol release "${SLURM_JOB_ID}"
}

# cifar_job_list_nodes: the allocation's nodes, one a line, in Slurm's order.
cifar_job_list_nodes() {
  scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null
}

# cifar_job_answering NODE...: those of the NODEs that run a task now, one a line: a
# one-task step on each at once, given CIFAR_JOB_PROBE_S (15 s) to answer. A node whose
# slurmd or network is gone never does. (timeout runs the srun program, never a function.)
cifar_job_answering() {
  local node dir
  dir=$(mktemp -d)
  for node in "$@"; do
    (timeout "${CIFAR_JOB_PROBE_S:-15}" srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap \
      --kill-on-bad-exit=0 --quiet true >/dev/null 2>&1 && : >"${dir}/${node}") &
  done
  wait
  for node in "$@"; do
    if [ -e "${dir}/${node}" ]; then echo "$node"; fi
  done
  rm -rf "$dir"
}

# cifar_job_place FIRST: choose the nodes of the next step, into cifar_job_step_nodes and
# the srun options cifar_job_placement: the allocation less SPARE_NODES for the first step
# (FIRST=1); after a fault, the nodes that answer, less those the decision names as lost or
# hung, the last step's first (after a crash: the same nodes), then the spares. Fails,
# saying why, where fewer than MIN_NODES are left.
cifar_job_place() {
  local first=$1 node total train min per_node chosen=() order=() healthy=() wanted=()
  mapfile -t order < <(cifar_job_list_nodes)
  total=${#order[@]}
  train=$((total - ${SPARE_NODES:-0}))
  min=${MIN_NODES:-$train}
  if [ "$train" -lt 1 ] || [ "$min" -lt 1 ] || [ "$min" -gt "$train" ]; then
    echo "cifar-job: SPARE_NODES=${SPARE_NODES:-0} and MIN_NODES=${MIN_NODES:-} do not fit" \
      "an allocation of ${total} node(s)" >&2
    return 1
  fi
  per_node=${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-$total} / total))}
  if [ "$first" = 1 ]; then
    healthy=("${order[@]}")
  else
    for node in ${cifar_job_step_nodes//,/ } "${order[@]}"; do
      case ",${cifar_job_lost},$(IFS=,; echo "${wanted[*]}")," in
        *",${node},"*) ;;
        *) wanted+=("$node") ;;
      esac
    done
    mapfile -t healthy < <(cifar_job_answering "${wanted[@]}")
  fi
  for node in "${healthy[@]}"; do
    if [ "${#chosen[@]}" -lt "$train" ]; then chosen+=("$node"); fi
  done
  if [ "${#chosen[@]}" -lt "$min" ]; then
    echo "cifar-job: ${#chosen[@]} of the allocation's ${total} node(s) can train" \
      "(answering: ${healthy[*]:-none}; lost: ${cifar_job_lost:-none}) and ${min} are needed" \
      "(MIN_NODES, submit --min-nodes)"
    return 1
  fi
  cifar_job_step_nodes=$(IFS=,; echo "${chosen[*]}")
  cifar_job_placement=(--nodes="${#chosen[@]}" --nodelist="${cifar_job_step_nodes}"
    --ntasks="$((${#chosen[@]} * per_node))" --ntasks-per-node="${per_node}")
  # A step that lost a node stays on Slurm's books, holding its nodes' CPUs, until that
  # node answers or is marked down: the next one shares them (they are idle).
  if [ "$first" = 0 ]; then cifar_job_placement+=(--overlap); fi
}

# cifar_job_end_stuck_step PID: once the step's ranks have decided on a relaunch, give srun
# CIFAR_JOB_STEP_END_S (5 s) to end, then end it: srun waits for every node's word, and a
# lost node never sends it.
cifar_job_end_stuck_step() {
  local waited=0
  while kill -0 "$1" 2>/dev/null; do
    sleep 1
    if grep -qsx 'action=relaunch' "${RUN_DIR}/decision.env"; then
      waited=$((waited + 1))
      if [ "$waited" -ge "${CIFAR_JOB_STEP_END_S:-5}" ]; then
        echo "cifar-job: srun has not ended ${waited} s after the ranks decided (a node that" \
          "does not answer); ending it"
        kill -9 "$1" 2>/dev/null
        return 0
      fi
    fi
  done
}

# cifar_job_minus A B: the nodes of A (comma-separated) that are not in B, comma-separated.
cifar_job_minus() {
  local node out=()
  for node in ${1//,/ }; do
    case ",$2," in *",${node},"*) ;; *) out+=("$node") ;; esac
  done
  (IFS=,; echo "${out[*]}")
}

# cifar_job_spares: the allocation's nodes that the current step does not use.
cifar_job_spares() {
  local spares
  spares=$(cifar_job_minus "$(cifar_job_list_nodes | paste -sd, -)" "$cifar_job_step_nodes")
  echo "${spares:-none}"
}

# cifar_job_relaunchable RC: whether the start that just ended with status RC is followed by
# another in this allocation: its decision says relaunch (a hang, a lost peer), or it left
# none and a task was killed by a signal (the OOM killer, a segfault; once in a row: the
# newest checkpoint stands). Never after a stop that Slurm or a time limit asked for.
cifar_job_relaunchable() {
  local rc=$1
  if [ "$cifar_job_stopping" = 1 ] || [ "$cifar_job_signalled" = 1 ] ||
    [ -z "${SLURM_JOB_ID:-}" ]; then
    return 1
  fi
  cifar_job_read_decision
  case "$cifar_job_action" in
    relaunch) cifar_job_blind=0 ;;
    none)
      if [ "$rc" -le 128 ] || [ "$rc" -eq 143 ] || [ "$cifar_job_blind" = 1 ]; then return 1; fi
      cifar_job_blind=1
      ;;
    *) return 1 ;;
  esac
  ! cifar_job_slurm_is_ending_job
}

# cifar_job_wait PID: wait until PID has really ended, its status into cifar_job_rc. `wait`
# returns early, with 128 + the signal, when a trap runs; a trap that came as the step
# ended leaves its real status still to be read.
cifar_job_wait() {
  local rc again
  while true; do
    wait "$1" && rc=0 || rc=$?
    kill -0 "$1" 2>/dev/null && continue
    if [ "$rc" -gt 128 ]; then
      again=0
      wait "$1" 2>/dev/null || again=$?
      if [ "$again" -ne 127 ]; then rc=$again; fi # 127: rc was its own, and already read
    fi
    break
  done
  cifar_job_rc=$rc
}

# cifar_job_step SRUN_ARGS...: `srun SRUN_ARGS`, started again in this allocation as long as
# cifar_job_relaunchable says, each time on the nodes cifar_job_place chose. Returns the last
# step's status. RUN_DIR/requeues.log has a line per relaunch; the job log says why.
cifar_job_step() {
  local fault chose pid watcher before left_out spare_in job
  cifar_job_placement=()
  cifar_job_step_nodes=$(cifar_job_list_nodes | paste -sd, -)
  if [ "${SPARE_NODES:-0}" -gt 0 ]; then
    cifar_job_place 1 || return 1
    echo "cifar-job: training on ${cifar_job_step_nodes}; spare: $(cifar_job_spares)"
  fi
  while true; do
    rm -f "${RUN_DIR}/decision.env" "${RUN_DIR}/decision.json"
    command srun "${cifar_job_placement[@]}" "$@" &
    pid=$!
    cifar_job_end_stuck_step "$pid" &
    watcher=$!
    cifar_job_wait "$pid"
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    chose=$(date +%s)
    cifar_job_relaunchable "$cifar_job_rc" || return "$cifar_job_rc"
    fault=$(cat "${RUN_DIR}/decision.json" 2>/dev/null) || fault="no decision, status ${cifar_job_rc}"
    before=$cifar_job_step_nodes
    if ! cifar_job_place 0; then
      cifar_job_back_to_queue=1 # too few nodes left: the queue, as at a node failure
      return "$cifar_job_rc"
    fi
    left_out=$(cifar_job_minus "$before" "$cifar_job_step_nodes")
    spare_in=$(cifar_job_minus "$cifar_job_step_nodes" "$before")
    CIFAR_JOB_RELAUNCH=$((CIFAR_JOB_RELAUNCH + 1))
    # The job as slurm.job_id names it (an array's task too): status matches the two.
    job=${SLURM_JOB_ID}
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
    echo "job ${job} $(date +%FT%T) relaunch ${CIFAR_JOB_RELAUNCH}" \
      "nodes=${cifar_job_step_nodes} left_out=${left_out:-none} spare=${spare_in:-none}" \
      >>"${RUN_DIR}/requeues.log"
    echo "cifar-job: relaunching the training step in allocation ${SLURM_JOB_ID}" \
      "(relaunch ${CIFAR_JOB_RELAUNCH}, nodes chosen in $(($(date +%s) - chose)) s) on" \
      "${cifar_job_step_nodes}${left_out:+, without ${left_out}}${spare_in:+ (spare ${spare_in} in)}." \
      "It ended with: ${fault}"
  done
}

# run_requeueable srun SRUN_ARGS... (or another command): the training step (cifar_job_step:
# started again in the allocation after a fault), with a USR1 from Slurm passed on to its
# tasks; then what follows how it ended (cifar_job_after_step).
run_requeueable() {
  cifar_job_before_step
  trap 'cifar_job_signalled=1; echo "cifar-job: time-limit signal; asking the tasks to checkpoint";
        scancel --signal=USR1 "${SLURM_JOB_ID}"' USR1
  if [ "$1" = srun ]; then
    shift
    cifar_job_step "$@" && cifar_job_rc=0 || cifar_job_rc=$?
  else
    "$@" &
    cifar_job_wait "$!"
  fi
  cifar_job_after_step "$cifar_job_rc"
}
