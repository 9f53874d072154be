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
    job = Job(tmp_path, state=state, preempt_mode="REQUEUE")
    rc, out = job.run(f"{job.marker(rule.action, saved=True, step=3)}; exit {rule.exit_code}")
    if rule.action == "finished":
        assert rc == 0 and not job.requeued(), out
    elif rule.action == "fail":
        assert rc == rule.exit_code != 0 and not job.requeued(), out
        assert "no requeue" in out
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


def test_an_error_of_a_collective_is_a_lost_peer_and_anything_else_ours():
    import torch.distributed as dist

    assert stops.cause_of_error(dist.DistBackendError("Connection reset by peer")) == "peer-lost"
    assert stops.cause_of_error(dist.DistNetworkError("Read error")) == "peer-lost"
    assert stops.cause_of_error(ValueError("bad")) == "error"
    assert stops.decide("peer-lost").action == "requeue" and stops.decide("error").action == "fail"


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
