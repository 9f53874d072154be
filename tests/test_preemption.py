"""Every way a real cluster stops a job, done for real on the local Slurm cluster, which is set
up as production clusters are (tests/cluster/start.sh): preemption by a higher partition
(SIGTERM, GraceTime, a requeue), an admin's `scontrol requeue`, `scancel`, and a node going
down. Each run is compared with one uninterrupted run of the same training by the same
template: it must end at the same step with bitwise-identical weights. The uninterrupted
runs are the templates' own tests too (one trained run each, shared)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_each_step_once_as_in_csv, cifar_job
from slurmjobs import (
    MULTINODE,
    ONE_NODE_TWO_TASKS,
    RUN,
    STEPS_PER_EPOCH,
    SUBMIT_TWO_NODES,
    TEMPLATE,
    TOTAL,
    TWO_NODES,
    assert_ledger_agrees_with_sacct,
    assert_no_rank_left,
    assert_owned_by_user,
    assert_same_weights,
    ckpt_step,
    job_state,
    last_step_of_start,
    ledger,
    preempt,
    resumed_steps,
    run_as_user,
    saved_steps,
    sbatch,
    seconds_to_start,
    task_pid,
    wait_done,
    wait_for_step,
    wait_for_text,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

GRACE_TIME = 10  # seconds, the `low` partition's (tests/cluster/start.sh)


def random_steps(count: int, gap: int) -> list[int]:
    """`count` random steps of the run, at least `gap` apart, none in the first 3 or the last
    20: a preemption lands 3-5 s (up to 15 steps here) after the `high` job is submitted,
    and must land before the run ends."""
    while True:
        steps = sorted(random.sample(range(3, TOTAL - 20), count))
        if all(b - a >= gap for a, b in zip(steps, steps[1:])):
            return steps


def submit_template(
    tmp_path: Path,
    run_dir: Path,
    *sbatch_args: str,
    train: tuple[str, ...] = (),
    as_ordinary_user: bool = False,
) -> tuple[str, Path]:
    """The one-node template on 2 tasks, as a user submits it; its job id and log."""
    job = sbatch(
        *sbatch_args,
        *ONE_NODE_TWO_TASKS,
        TEMPLATE,
        *RUN,
        *train,
        cwd=tmp_path,
        as_ordinary_user=as_ordinary_user,
        RUN_DIR=str(run_dir),
    )
    return job, tmp_path / f"slurm-cifar-job-{job}.out"


def test_sbatch_ddp_4gpu_template_runs_one_node_two_tasks(reference):
    assert ": 2 process(es) on 1 node(s) x 2 cpu" in reference.log
    assert "test/acc " in reference.log  # global batch 40 split over 2 ranks: TOTAL steps
    assert "test/acc" in json.loads((reference.run_dir / "results.json").read_text())
    assert_no_rank_left(reference.run_dir)
    # Its hours: no faults, so nothing trained again, no stop, no wait, no hang; goodput is
    # its training time over its allocation.
    found = assert_ledger_agrees_with_sacct(reference.run_dir, reference.job)
    (start,) = found["starts"]
    assert start["resumed_at"] == 0 and start["reached"] == TOTAL
    assert start["recomputed_steps"] == 0
    spent = found["node_seconds"]
    assert spent["recomputed"] == spent["stop"] == spent["queue"] == spent["hang"] == 0
    assert spent["kept"] > 0 and spent["startup"] > 0 and spent["evaluation"] > 0
    assert found["goodput"] == pytest.approx(spent["kept"] / found["node_seconds_total"], abs=1e-3)


def test_sbatch_multinode_template_runs_two_nodes(reference_two_nodes):
    log = reference_two_nodes.log
    assert "on n[1-2]" in log and ": 2 process(es) on 2 node(s) x 1 cpu" in log
    # --cpus-per-task=1: one thread a task, not one per core of the node.
    assert "device(s), 1 CPU thread(s) each" in log
    assert "test/acc " in log
    assert_no_rank_left(reference_two_nodes.run_dir)


def test_template_job_preempted_twice_ends_like_an_uninterrupted_run(
    reference, mlflow_server, tmp_path
):
    """Submitted by an ordinary user, as on a site: its job requeues itself, and every file
    it writes is the user's, within the user's umask. Also tracked on the MLflow server: one
    MLflow run whatever the requeues."""
    run_dir = tmp_path / "run"
    tracking = ("--tracker", "mlflow", "--tracking-uri", mlflow_server.uri)
    tracking += ("--experiment", "preempted-twice")
    job, log = submit_template(
        tmp_path, run_dir, "-p", "low", train=tracking, as_ordinary_user=True
    )
    at, preemptors = random_steps(2, gap=8), []
    for start, step in enumerate(at, 1):
        # Logs are appended across requeues: only this start's lines count.
        wait_for_step(log.name, tmp_path, step, after=f"start {start} on")
        preemptors.append(preempt(tmp_path))
    assert wait_done(job, timeout=400) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    saved = saved_steps(text)
    assert len(saved) == 2 and all(s >= a for s, a in zip(saved, at)), (at, saved)
    # Each start resumed from exactly the step the stop saved: no step lost, none redone.
    assert resumed_steps(run_dir) == [None, *saved], text[-3000:]
    assert ckpt_step(run_dir) == TOTAL
    assert_same_weights(run_dir, reference)
    # PreemptMode=REQUEUE: once the save was whole the script requeued the job as Slurm
    # would have at the end of GraceTime, so the preempting job had the nodes well before.
    assert text.count("waiting for Slurm to end it") == 2
    assert text.count("preempted, and the save is whole: requeueing job") == 2
    assert "of at most" not in text and not (run_dir / "requeues.log").exists()
    waits = [seconds_to_start(j) for j in preemptors]
    print(f"preemption to nodes free: {waits} s (GraceTime {GRACE_TIME} s)")
    assert all(w < GRACE_TIME for w in waits), waits
    assert_no_rank_left(run_dir)
    assert_owned_by_user(run_dir)
    # Its hours: each preemption's stop, from SIGTERM to the nodes given back, well within
    # GraceTime; a queue wait before each later start, as sacct has it; nothing trained again.
    found = assert_ledger_agrees_with_sacct(run_dir, job)
    stops = [s["node_seconds"]["stop"] / s["nodes"] for s in found["starts"]]
    assert all(0 < s < GRACE_TIME for s in stops[:2]) and stops[2] == 0, stops
    assert [s["recomputed_steps"] for s in found["starts"]] == [0, 0, 0]
    assert all(s["node_seconds"]["queue"] > 0 for s in found["starts"][1:])
    print("\n" + cifar_job("hours", str(run_dir)).stdout)

    # One MLflow run for the three starts, each step once with the CSV's values; its status
    # history: killed twice by the preemptions, then finished.
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("preempted-twice")
    runs = client.search_runs([experiment.experiment_id])
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    ended = [tags[f"cifar_job.start.{n:03d}"].split("; ended ")[1] for n in (1, 2, 3)]
    assert [e.split()[0] for e in ended] == ["KILLED", "KILLED", "FINISHED"], ended
    assert len(set(tags["slurm.job_ids"].split(","))) == 1 == len({job, tags["slurm.job_id"]})
    assert_each_step_once_as_in_csv(client, run_id, run_dir)


def test_submitted_two_node_job_preempted_twice_ends_like_an_uninterrupted_run(
    reference_two_nodes, tmp_path
):
    """`cifar-job submit` by an ordinary user, as on a site."""
    run_dir = tmp_path / "run"
    result = run_as_user(
        *(sys.executable, "-m", "cifar_job", *SUBMIT_TWO_NODES, "--partition", "low"),
        *("--accelerator", "cpu", *RUN, "--run-dir", str(run_dir)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.split("submitted job ")[1].split()[0]
    log = f"submitit/{job}_0_log.out"
    for start, step in enumerate(random_steps(2, gap=8), 1):
        wait_for_step(log, run_dir, step, after=f"start {start} on")
        preempt(tmp_path)
    assert wait_done(job, timeout=400) == "COMPLETED"
    text = (run_dir / log).read_text()
    saved = saved_steps(text)
    assert len(saved) == 2 and resumed_steps(run_dir) == [None, *saved], text[-3000:]
    assert ckpt_step(run_dir) == TOTAL
    assert_same_weights(run_dir, reference_two_nodes)
    assert text.count("preempted, and the save is whole: requeueing job") == 2
    assert "of at most" not in text  # no requeue of the script's own (a time limit's)
    assert_no_rank_left(run_dir)
    assert_owned_by_user(run_dir)
    info = json.loads(cifar_job("status", str(run_dir), "--json").stdout)
    assert info["state"] == "finished" and info["restarts"] == 2


def test_admin_requeue_then_cancel_resume_to_identical_weights(reference, tmp_path):
    """An admin's `scontrol requeue` (SIGTERM, then KillWait): the job saves and Slurm
    requeues it. In its second start `scancel` (SIGTERM): it saves again and ends CANCELLED,
    and a resubmission resumes. The run ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    job, log = submit_template(tmp_path, run_dir)
    first, second = random_steps(2, gap=8)
    wait_for_text(log.name, tmp_path, f" step {first}/{TOTAL}")
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM, then KillWait
    wait_for_step(log.name, tmp_path, second, after="start 2 on")
    subprocess.run(["scancel", job], check=True)
    assert wait_done(job) == "CANCELLED", log.read_text()[-3000:]
    text = log.read_text()
    saved = saved_steps(text)
    assert len(saved) == 2 and saved[0] >= first and saved[1] >= second, (saved, first, second)
    assert "requeueing job" not in text  # Slurm's requeue, not a second one from the script
    assert ckpt_step(run_dir) == saved[1]  # saved within KillWait (5 s here)
    marker = json.loads((run_dir / "decision.json").read_text())
    assert marker == {"action": "wait", "step": saved[1], "signal": "SIGTERM", "saved": True}
    assert not (run_dir / "results.json").exists()
    assert_no_rank_left(run_dir)

    again, _ = submit_template(tmp_path, run_dir)
    assert wait_done(again) == "COMPLETED"
    assert resumed_steps(run_dir) == [None, *saved]
    assert_same_weights(run_dir, reference)


def test_a_node_slurm_marks_down_with_none_to_take_its_place_requeues_the_job(
    reference_two_nodes, tmp_path
):
    """Slurm itself sees the node fail (an admin, or SlurmdTimeout, marks it DOWN): it kills
    the step's tasks on every node, so nobody saves, and without a spare or MIN_NODES the
    step cannot start again in the allocation: the job goes back through the queue and
    resumes from the newest periodic save (tests/test_relaunch.py: a node lost before Slurm
    notices, with a spare and with MIN_NODES)."""
    run_dir = tmp_path / "run"
    every = ["--checkpoint-every", "0.05"]  # 3 s of training
    job = sbatch(*TWO_NODES, MULTINODE, *RUN, *every, cwd=tmp_path, RUN_DIR=str(run_dir))
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    # A few steps after the first periodic save (about 3 s in, mid-epoch 1), lose the node.
    deadline = time.monotonic() + 120
    while not (run_dir / "latest").exists():
        assert time.monotonic() < deadline, "no periodic save"
        time.sleep(0.1)
    wait_for_text(log.name, tmp_path, f" step {ckpt_step(run_dir) + random.randint(1, 4)}/")
    try:
        # n2 dies: Slurm marks it DOWN, and its rank is gone before it can save anything.
        last_saved = ckpt_step(run_dir)  # the newest checkpoint when the node is lost
        rank_1 = task_pid(job, rank=1)
        subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=test"])
        with contextlib.suppress(ProcessLookupError):  # Slurm may have ended it already
            os.kill(rank_1, signal.SIGKILL)
        reached = max(int(s) for s in re.findall(r" step (\d+)/", log.read_text()))
        deadline = time.monotonic() + 60
        while job_state(job) == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job_state(job) != "RUNNING"
    finally:
        # Not checked: with ReturnToService=2 a DOWN node whose slurmd still answers may be
        # back already, and resuming a node that is not down is an error.
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"])
    assert wait_done(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    starts = resumed_steps(run_dir)
    # Resumed from the newest whole checkpoint, a periodic one mid-epoch: it lost the steps
    # after that save (at most 3 s of training), never the epoch or the run.
    assert len(starts) == 2 and starts[1] >= last_saved > 0, (starts, last_saved, reached)
    assert starts[1] % STEPS_PER_EPOCH, starts  # mid-epoch: not an epoch-end checkpoint
    print(f"lost node: reached step {reached}, resumed from {starts[1]}")
    # The ledger counts exactly the steps between the last save and the loss as trained again.
    # (Not against sacct: Slurm 22.05 records a --no-kill job that lost a node and was then
    # requeued as one RESIZING record and one more, without the requeue's.)
    assert "requeueing job" in log.read_text()
    found = ledger(run_dir)
    lost = last_step_of_start(log.read_text(), 1) - starts[1]
    assert [s["recomputed_steps"] for s in found["starts"]] == [0, lost], found["starts"]
    assert ckpt_step(run_dir) == TOTAL
    assert_same_weights(run_dir, reference_two_nodes)
    assert_no_rank_left(run_dir)
