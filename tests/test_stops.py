"""The stop rules, stops.RULES, row by row: for each way a start ends, the decision Python
writes is carried out by the real batch script (requeue.sh, with Slurm stood in for as in
test_requeue_sh.py) as the row says, and the progress budget counts the rows it says."""

from __future__ import annotations

import pytest
from test_requeue_sh import PREEMPTED, RUNNING, Job

from cifar_job import stops

ROWS = sorted(stops.RULES)


@pytest.mark.parametrize("cause", ROWS)
def test_each_rule_is_carried_out_by_the_batch_script(cause, tmp_path):
    rule = stops.decide(cause)
    # A "wait" meets Slurm preempting the job in a partition that requeues (so the script
    # requeues it at once); the other rows a job that Slurm lets run.
    state = PREEMPTED if rule.action == "wait" else RUNNING
    job = Job(tmp_path, state=state, preempt_mode="REQUEUE", nodes="n1,n2")
    step = f"{job.marker(rule.action, saved=True, step=3)}; exit {rule.exit_code}"
    if rule.action == "relaunch":  # the first launch ends so; the one after it finishes
        step = f'if [ "$CIFAR_JOB_RELAUNCH" = 0 ]; then {step}; fi'
    rc, out = job.run(step, srun=True)
    if rule.action == "finished":
        assert rc == 0 and not job.requeued(), out
    elif rule.action == "fail":
        assert rc == rule.exit_code != 0 and not job.requeued(), out
        assert "no requeue" in out
    elif rule.action == "relaunch":
        assert rc == 0 and not job.requeued() and len(job.steps()) == 2, out
        assert "relaunching the training step in allocation 7" in out
    elif rule.action == "requeue":
        assert rc == 0 and job.requeued(), out
        assert "requeueing job 7" in out
    else:  # wait: Slurm decides; here it preempts in a REQUEUE partition, so at once
        assert rule.action == "wait"
        assert "waiting for Slurm to end it" in out and job.requeued(), out
        assert "preempted, and the save is whole" in out


@pytest.mark.parametrize("cause", ROWS)
def test_the_budget_counts_the_rows_that_say_so(cause, tmp_path):
    from cifar_job import CifarJobError, events
    from cifar_job.checkpoints import check_progress

    for _ in range(2):  # two starts of job 9, each resumed at step 4 and ended by `cause`
        events.record(tmp_path, "start", job="9", step=4)
        events.record(tmp_path, "end", reason="x", cause=cause, message="m")
    if stops.decide(cause).counts:
        with pytest.raises(CifarJobError, match="the last 2 starts of job 9 made no new"):
            check_progress(tmp_path, "9", 4, budget=2)
    else:
        check_progress(tmp_path, "9", 4, budget=2)


# What gloo, NCCL and c10d said when a peer went, as torch raises it (the gloo one as rank 0
# of a 2-node job saw it when rank 1 was killed with kill -9).
PEER_GONE = [
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
    "[10.77.0.12]:36485: Connection reset by peer",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
    "[10.77.0.12]:46127",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms "
    "for recv operation to complete",
    "NCCL communicator was aborted on rank 1.",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
    "error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error "
    "or a remote process exiting prematurely.",
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
    "OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.",
    "Connection refused",
]


@pytest.mark.parametrize("message", PEER_GONE)
def test_an_error_of_a_collective_is_a_lost_peer(message):
    import torch.distributed as dist

    assert stops.cause_of_error(RuntimeError(message)) == "peer-lost"
    assert stops.cause_of_error(dist.DistBackendError(message)) == "peer-lost"
    try:  # Lightning and DDP may wrap it
        try:
            raise RuntimeError(message)
        except RuntimeError as e:
            raise ValueError("while reducing gradients") from e
    except ValueError as wrapped:
        assert stops.cause_of_error(wrapped) == "peer-lost"


def test_anything_else_is_ours_and_not_relaunched():
    assert stops.cause_of_error(ValueError("bad")) == "error"
    assert stops.cause_of_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == (
        "error"
    )
    assert stops.cause_of_error(KeyError("read error")) == "error"  # words alone are not enough
    assert stops.decide("peer-lost").action == "relaunch"
    assert stops.decide("hang").action == "relaunch" and stops.decide("error").action == "fail"


@pytest.mark.parametrize(
    ("requeue", "time_up", "stuck", "cause"),
    [
        (True, False, False, "time-limit"),
        (False, True, False, "max-time"),
        (False, False, False, "sigterm"),
        (True, False, True, "stuck-after-time-limit"),
        (False, False, True, "stuck-after-sigterm"),
    ],
)
def test_a_stop_s_cause(requeue, time_up, stuck, cause):
    assert stops.cause_of_stop(requeue, time_up, stuck) == cause
