"""Recovery inside the allocation, on the local cluster: a rank killed (kill -9, as the OOM
killer or a segfault would) or a node lost for real costs seconds, not a trip through the
queue. The job keeps its id with no requeue (Restarts=0, one allocation in Slurm's
accounting), loses no step (the healthy rank saves the last completed one), ends with the
uninterrupted run's weights where its ranks are the same (the same nodes, or a spare), and
leaves no process behind. A crash that comes back at the same step stops after the budget;
an error of ours is never relaunched. All share one uninterrupted reference run
(conftest.reference_two_nodes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cifar_job
from slurmjobs import (
    MULTINODE,
    RUN,
    SUBMIT_TWO_NODES,
    TOTAL,
    TWO_NODES,
    assert_no_rank_left,
    assert_same_weights,
    ckpt_step,
    resumed_steps,
    run_as_user,
    sacct_allocations,
    sbatch,
    task_pid,
    wait_done,
    wait_for_text,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cluster")]


def restarts(job: str) -> int:
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return int(re.search(r"Restarts=(\d+)", info.stdout).group(1))


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def assert_recovered_in_the_allocation(job: str, run_dir: Path, text: str) -> int:
    """One allocation, no requeue, the second start at the step the first one reached;
    returns that step."""
    assert restarts(job) == 0, text[-3000:]
    # Slurm's accounting: one record, or, where Slurm marked a lost node down in a --no-kill
    # job, a RESIZING record and then the job's own, with no gap: never a requeue.
    assert len(sacct_allocations(job)) == 1  # RESIZING records joined to the one after
    states = subprocess.run(
        ["sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "State"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert set(states[:-1]) <= {"RESIZING"} and "REQUEUED" not in states, states
    assert "requeueing job" not in text and "relaunching the training step" in text
    first, second = resumed_steps(run_dir)
    reached = max(int(s) for s in re.findall(r" step (\d+)/", text.split("relaunching")[0]))
    assert first is None and second == reached, (resumed_steps(run_dir), reached)
    return reached


def seconds_to_train_again(run_dir: Path, since: float) -> float:
    """From `since` (the fault) to the next start's first trained step, as the run recorded."""
    first = [e for e in events(run_dir) if e["event"] == "first_step" and e["time"] > since]
    return first[0]["time"] - since


def test_a_killed_rank_is_relaunched_in_the_allocation_and_loses_no_step(
    reference_two_nodes, tmp_path
):
    run_dir = tmp_path / "run"
    job = sbatch(*TWO_NODES, MULTINODE, *RUN, cwd=tmp_path, RUN_DIR=str(run_dir))
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_text(log.name, tmp_path, f" step 12/{TOTAL}")  # mid-epoch 1
    killed = time.time()
    os.kill(task_pid(job, rank=1), signal.SIGKILL)  # on n2
    assert wait_done(job, timeout=400) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    reached = assert_recovered_in_the_allocation(job, run_dir, text)
    assert "a peer is lost: rank 0 on n1" in text and f"saved step {reached}" in text
    took = seconds_to_train_again(run_dir, killed)
    print(f"kill -9 of rank 1 to the next trained step: {took:.1f} s (at step {reached})")
    assert took < 60, took  # the goal is 30 s; CI machines are slower than that
    assert ckpt_step(run_dir) == TOTAL
    assert_same_weights(run_dir, reference_two_nodes)
    assert_no_rank_left(run_dir)


def test_a_crash_that_comes_back_at_the_same_step_stops_after_the_budget(tmp_path):
    run_dir = tmp_path / "run"
    budget = ("--max-stalled-starts", "2")
    job = sbatch(
        *TWO_NODES,
        MULTINODE,
        *RUN,
        *budget,
        cwd=tmp_path,
        RUN_DIR=str(run_dir),
        CIFAR_JOB_FAULT="kill:5:1",  # every start: rank 1 dies in the step after step 5
    )
    assert wait_done(job, timeout=400) == "FAILED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert restarts(job) == 0 and "requeueing job" not in text, text[-3000:]
    # Start 1 saved step 5 as its peer died; starts 2 and 3 resumed there and died again.
    assert text.count("relaunching the training step") == 3, text[-3000:]
    assert "the last 2 starts of job" in text and "made no new checkpoint" in text
    assert "a lost peer" in text  # named, not "no word"
    assert resumed_steps(run_dir) == [None, 5, 5]  # the 4th start stopped before it counted
    assert_no_rank_left(run_dir)


def test_an_error_of_ours_on_one_rank_is_never_relaunched(tmp_path):
    """Rank 1 fails with a Python error (a bug); rank 0 then sees its peer go. The job fails
    once, saying so, and is neither relaunched nor requeued."""
    run_dir = tmp_path / "run"
    job = sbatch(
        *TWO_NODES,
        MULTINODE,
        *RUN,
        cwd=tmp_path,
        RUN_DIR=str(run_dir),
        CIFAR_JOB_FAULT="error:5:1",
    )
    assert wait_done(job, timeout=300) == "FAILED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert "a bug of ours on rank 1" in text, text[-3000:]
    assert "relaunching" not in text and "requeueing" not in text, text[-3000:]
    assert "another start would meet again; no requeue" in text
    assert restarts(job) == 0 and resumed_steps(run_dir) == [None]
    assert_no_rank_left(run_dir)


def test_submit_two_nodes_recovers_a_killed_rank_the_same_way(reference_two_nodes, tmp_path):
    run_dir = tmp_path / "run"
    result = run_as_user(
        *(sys.executable, "-m", "cifar_job", *SUBMIT_TWO_NODES),
        *("--accelerator", "cpu", *RUN, "--run-dir", str(run_dir)),
        cwd=tmp_path,
        CIFAR_JOB_FAULT="kill:9:1:1",  # rank 1, first start only
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.split("submitted job ")[1].split()[0]
    assert wait_done(job, timeout=400) == "COMPLETED"
    logs = run_dir / "submitit"
    text = (logs / f"{job}_0_log.out").read_text()  # the batch script's, and rank 0's
    assert (
        "CIFAR_JOB_FAULT: rank 1 is killed after step 9" in (logs / f"{job}_1_log.out").read_text()
    )
    assert assert_recovered_in_the_allocation(job, run_dir, text) == 9
    fault = next(e for e in events(run_dir) if e["event"] == "fault")
    took = seconds_to_train_again(run_dir, fault["time"])
    print(f"submit: killed rank to the next trained step: {took:.1f} s")
    assert_same_weights(run_dir, reference_two_nodes)
    assert_no_rank_left(run_dir)
    info = json.loads(cifar_job("status", str(run_dir), "--json").stdout)
    assert info["state"] == "finished" and info["restarts"] == 0, info
    (relaunch,) = info["relaunches"]
    assert relaunch["fault"] == "fault" and relaunch["step"] == 9 and relaunch["seconds"] < 60, info
    (relaunch,) = info["relaunches"]
    assert relaunch["fault"] == "fault" and relaunch["step"] == 9 and relaunch["seconds"] < 60


NODE = str(Path(__file__).parent / "cluster" / "node.sh")
SPARE_PARTITION = "--partition=spare"  # n1, n2 and n3 (tests/cluster/start.sh)


def run_losing_n2(tmp_path: Path, *layout: str, **env: str) -> tuple[str, Path, str, float]:
    """The multi-node template's job, which loses n2 for real mid-epoch 1 (its link cut, its
    slurmd and every process in its namespace killed). Once the job goes on without it, n2
    is marked down, as Slurm itself would after SlurmdTimeout (until then the job cannot
    end: the step that lost n2 waits for its word), and repaired. Returns the job, the run
    directory, the job log and when n2 was lost."""
    run_dir = tmp_path / "run"
    hang = ("--hang-timeout", "15")
    job = sbatch(*layout, MULTINODE, *RUN, *hang, cwd=tmp_path, RUN_DIR=str(run_dir), **env)
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_text(log.name, tmp_path, f" step 12/{TOTAL}")
    lost = time.time()
    subprocess.run([NODE, "down", "n2"], check=True)
    wait_for_text(log.name, tmp_path, "relaunching the training step", timeout=240)
    down = ["scontrol", "update", "nodename=n2", "state=down", "reason=lost in a test"]
    subprocess.run(down, check=True)
    subprocess.run([NODE, "up", "n2"], check=True)
    assert wait_done(job, timeout=400) == "COMPLETED", log.read_text()[-3000:]
    return job, run_dir, log.read_text(), lost


@pytest.fixture
def node_back():
    """Whatever a test lost comes back: its link, its slurmd, and Slurm's view of it."""
    yield
    subprocess.run([NODE, "up", "n2"], check=True)
    for _ in range(60):
        state = subprocess.run(
            ["sinfo", "-h", "-n", "n2", "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True)
        time.sleep(1)
    raise AssertionError(f"n2 did not come back: {state}")


def test_a_lost_node_is_replaced_by_a_spare_in_the_allocation(
    reference_two_nodes, node_back, tmp_path
):
    three = ["--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
    job, run_dir, text, lost = run_losing_n2(tmp_path, SPARE_PARTITION, *three, SPARE_NODES="1")
    assert "training on n1,n2; spare: n3" in text
    assert "on n1,n3, without n2 (spare n3 in)" in text, text[-3000:]
    reached = assert_recovered_in_the_allocation(job, run_dir, text)
    took = seconds_to_train_again(run_dir, lost)
    print(f"lost node n2, spare n3 in its place: {took:.1f} s to the next trained step")
    assert took < 15 + 60, took  # the hang's bound (--hang-timeout 15), then the relaunch
    assert ckpt_step(run_dir) == TOTAL and reached > 0
    assert_same_weights(run_dir, reference_two_nodes)  # 2 ranks, as before the loss
    assert_no_rank_left(run_dir)


def test_with_min_nodes_a_lost_node_leaves_the_job_on_the_nodes_it_has(
    reference_two_nodes, node_back, tmp_path
):
    job, run_dir, text, _ = run_losing_n2(tmp_path, *TWO_NODES, MIN_NODES="1")
    assert "on n1, without n2" in text, text[-3000:]
    assert_recovered_in_the_allocation(job, run_dir, text)
    assert ": 1 process(es) on 1 node(s)" in text.split("relaunching")[1]
    assert ckpt_step(run_dir) == TOTAL  # the same global batch: the same steps
    ours = json.loads((run_dir / "results.json").read_text())["test/acc"]
    theirs = json.loads((reference_two_nodes.run_dir / "results.json").read_text())["test/acc"]
    assert abs(ours - theirs) < 0.1, (ours, theirs)
    assert_no_rank_left(run_dir)
