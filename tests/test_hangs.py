"""Failures nobody announces, on the local Slurm cluster: a rank stopped with `kill -STOP`
on a 2-node job is found within the learned bound, the job requeues and finishes, and
nothing is left behind; a job whose starts keep hanging stops after its budget instead of
using up its requeues; --exclude-hung-node requeues the job away from the node that hung."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from slurmjobs import (
    ONE_NODE_TWO_TASKS,
    STEPS_PER_EPOCH,
    TRAIN,
    assert_no_rank_left,
    ckpt_step,
    resumed_steps,
    sbatch,
    wait_done,
    wait_for_step,
    wait_for_text,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def heartbeat(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "heartbeats" / f"rank-{rank:05d}.json").read_text())


def test_a_rank_stopped_on_a_two_node_job_is_found_and_the_job_requeues_and_finishes(tmp_path):
    """kill -STOP of rank 1 (node 2) mid-epoch: rank 0's watchdog names it within the learned
    bound and ends the start; the job requeues, resumes from the last periodic save and
    finishes. The stopped rank is continued late, after the detection: no second save, no
    damaged checkpoint, and no process of the job is left, stopped or otherwise."""
    run_dir = tmp_path / "run"
    template = str(REPO / "slurm/ddp_multinode.sh")
    saves = ["--checkpoint-every", "0.02"]  # 1.2 s: the steps a hang may lose
    one_epoch = [*TRAIN, "--max-epochs", "1", *saves]
    job = sbatch(*TWO_NODES, template, *one_epoch, cwd=tmp_path, RUN_DIR=str(run_dir))
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_step(log.name, tmp_path, 3, after="start 1 on")
    deadline = time.monotonic() + 60
    while not (run_dir / "latest").exists():  # a periodic save, for the next start
        assert time.monotonic() < deadline, "no periodic save"
        time.sleep(0.1)
    stopped = heartbeat(run_dir, 1)
    os.kill(stopped["pid"], signal.SIGSTOP)
    t_stop = time.monotonic()
    wait_for_text(log.name, tmp_path, "cifar-job: hang:", timeout=120)
    took = time.monotonic() - t_stop
    with open(log) as f:
        line = next(x for x in f if "cifar-job: hang:" in x)
    bound = float(re.search(r"\(bound (\d+) s\)", line).group(1))
    assert f"rank 1 on {stopped['node']} (pid {stopped['pid']})" in line, line
    assert bound >= 30  # learned: 10 x the slowest recent step, at least 30 s
    assert took <= bound + 2 * 2 + 3, (took, bound)  # two heartbeats of the thread, and slack
    try:
        os.kill(stopped["pid"], signal.SIGCONT)  # late: the start is already ending
    except ProcessLookupError:
        pass

    assert wait_done(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    (hang,) = [e for e in events(run_dir) if e["event"] == "hang"]
    resumed = resumed_steps(run_dir)[1]
    # Lost: only the steps since the last periodic save before the hang.
    assert resumed is not None and 0 < resumed <= hang["step"], (resumed, hang)
    assert text.count("cifar-job: hang:") == 1 and "requeueing job" in text
    assert ckpt_step(run_dir) == STEPS_PER_EPOCH
    torch.load(run_dir / "last.ckpt", weights_only=True)  # whole
    assert_no_rank_left(run_dir)


def test_a_job_that_hangs_on_every_start_stops_after_its_budget(tmp_path):
    """The same hang on every start: after --max-stalled-starts (2) starts without a new
    checkpoint the next start stops with one message, long before MAX_REQUEUES (10)."""
    run_dir = tmp_path / "run"
    template = str(REPO / "slurm/ddp_4gpu.sh")
    args = [*TRAIN, "--max-epochs", "1", "--checkpoint-every", "0", "--hang-timeout", "10"]
    args += ["--max-stalled-starts", "2"]
    env = {"RUN_DIR": str(run_dir), "CIFAR_JOB_FAULT": "stop:3:1"}
    job = sbatch(*ONE_NODE_TWO_TASKS, template, *args, cwd=tmp_path, **env)
    assert wait_done(job, timeout=300) == "FAILED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert f"the last 2 starts of job {job} made no new checkpoint" in text, text[-3000:]
    assert "each ended with a hang (rank 1 on " in text and "after step 3)" in text
    assert len((run_dir / "requeues.log").read_text().splitlines()) == 2
    assert [e["event"] for e in events(run_dir)].count("start") == 2  # the third refused
    assert_no_rank_left(run_dir)


def test_exclude_hung_node_requeues_the_job_away_from_the_node_that_hung(tmp_path):
    run_dir = tmp_path / "run"
    template = str(REPO / "slurm/ddp_4gpu.sh")
    args = [*TRAIN, "--max-epochs", "1", "--hang-timeout", "10", "--exclude-hung-node"]
    env = {"RUN_DIR": str(run_dir), "CIFAR_JOB_FAULT": "stop:3:1:1"}  # in the first start
    job = sbatch(*ONE_NODE_TWO_TASKS, template, *args, cwd=tmp_path, **env)
    assert wait_done(job, timeout=300) == "COMPLETED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    first, second = [e["node"] for e in events(run_dir) if e["event"] == "start"]
    assert first != second, text[-3000:]
    assert f"excluding node(s) {first} from job {job}" in text
    assert ckpt_step(run_dir) == STEPS_PER_EPOCH
