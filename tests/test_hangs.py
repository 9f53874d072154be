"""Failures nobody announces, on the local Slurm cluster: a rank stopped with `kill -STOP`
on a 2-node job is found within the learned bound, the healthy rank saves the last step,
the job requeues and finishes with no step lost, and nothing is left behind; a job whose
starts keep hanging stops after its budget instead of using up its requeues;
--exclude-hung-node requeues the job away from the node that hung."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from slurmjobs import (
    MULTINODE,
    ONE_NODE_TWO_TASKS,
    RUN,
    TEMPLATE,
    TOTAL,
    TRAIN,
    TWO_NODES,
    assert_ledger_agrees_with_sacct,
    assert_no_rank_left,
    assert_same_weights,
    ckpt_step,
    resumed_steps,
    sbatch,
    tcp_peers,
    wait_done,
    wait_for_step,
    wait_for_text,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


# One short epoch: 320 training images in global batches of 40, 8 steps.
SHORT = [*TRAIN, "--synthetic-size", "520", "--max-epochs", "1"]
NODE_ADDRESS = {"n1": "10.77.0.11", "n2": "10.77.0.12"}  # tests/cluster/start.sh


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def heartbeat(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "heartbeats" / f"rank-{rank:05d}.json").read_text())


def test_a_rank_stopped_on_a_two_node_job_is_found_and_the_job_loses_no_step(
    reference_two_nodes, tmp_path
):
    """kill -STOP of rank 1 (node 2) mid-epoch, at whatever point of its step: rank 0's
    watchdog names it within the learned bound, saves the last completed step from its own
    thread and ends the start; the job requeues, resumes at that step and ends with the
    weights of an uninterrupted run. The stopped rank is continued late, after the
    detection: no second save, no damaged checkpoint, and no process of the job is left,
    stopped or otherwise. No periodic saves: without the hang's, the job would restart."""
    run_dir = tmp_path / "run"
    job = sbatch(*TWO_NODES, MULTINODE, *RUN, cwd=tmp_path, RUN_DIR=str(run_dir))
    log = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_step(log.name, tmp_path, 5, after="start 1 on")
    stopped = heartbeat(run_dir, 1)
    # Each node has its own address: rank 1 (n2) talks to rank 0 on n1's, as on a site (a
    # MASTER_ADDR or a gloo interface of loopback would not reach across).
    peers = tcp_peers(stopped["pid"])
    assert (NODE_ADDRESS["n2"], NODE_ADDRESS["n1"]) in peers, peers
    assert stopped["node"] == "n2"
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
    wait_for_text(log.name, tmp_path, "requeueing job", timeout=60)
    held = time.monotonic() - t_stop
    print(f"\nhang: found in {took:.1f} s (bound {bound:.0f} s); 2 nodes held {held:.1f} s")

    assert wait_done(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    (hang,) = [e for e in events(run_dir) if e["event"] == "hang"]
    assert hang["saved"] is not None and f"saved step {hang['saved']}" in line, line
    assert resumed_steps(run_dir)[1] == hang["saved"] >= 5  # no step lost
    assert text.count("cifar-job: hang:") == 1 and "requeueing job" in text
    assert ckpt_step(run_dir) == TOTAL
    assert_same_weights(run_dir, reference_two_nodes)
    assert_no_rank_left(run_dir)
    # Its hours: the hang, from the last progress to the nodes given back, and nothing
    # trained again.
    found = assert_ledger_agrees_with_sacct(run_dir, job)
    first, second = found["starts"]
    assert (took - 5) * 2 <= first["node_seconds"]["hang"] <= (held + 15) * 2, (first, took, held)
    assert second["recomputed_steps"] == 0 and second["node_seconds"]["hang"] == 0


def test_a_job_that_hangs_on_every_start_stops_after_its_budget(tmp_path):
    """The same hang on every start, in step 4: the first start saves step 3 as it ends, the
    second resumes there and hangs again with nothing new to save. With
    --max-stalled-starts 1, the one restart budget, the third start stops with one message."""
    run_dir = tmp_path / "run"
    args = [*SHORT, "--checkpoint-every", "0", "--hang-timeout", "10", "--max-stalled-starts", "1"]
    env = {"RUN_DIR": str(run_dir), "CIFAR_JOB_FAULT": "stop:3:1"}
    job = sbatch(*ONE_NODE_TWO_TASKS, TEMPLATE, *args, cwd=tmp_path, **env)
    assert wait_done(job, timeout=300) == "FAILED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert f"the last start of job {job} made no new checkpoint (it resumed from step 3)" in (
        text
    ), text[-3000:]
    assert "it ended with a hang (rank 1 on " in text and "after step 3)" in text
    assert len((run_dir / "requeues.log").read_text().splitlines()) == 2
    assert [e["event"] for e in events(run_dir)].count("start") == 2  # the third refused
    assert_no_rank_left(run_dir)


def test_exclude_hung_node_requeues_the_job_away_from_the_node_that_hung(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT, "--hang-timeout", "10", "--exclude-hung-node"]
    env = {"RUN_DIR": str(run_dir), "CIFAR_JOB_FAULT": "stop:3:1:1"}  # in the first start
    job = sbatch(*ONE_NODE_TWO_TASKS, TEMPLATE, *args, cwd=tmp_path, **env)
    assert wait_done(job, timeout=300) == "COMPLETED"
    text = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    first, second = [e["node"] for e in events(run_dir) if e["event"] == "start"]
    assert first != second, text[-3000:]
    assert f"excluding node(s) {first} from job {job}" in text
    assert ckpt_step(run_dir) == 8
