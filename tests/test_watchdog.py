"""Failures nobody announces, on one machine (tests/test_hangs.py does them on the cluster):
a rank that stops or hangs is found by the others' watchdogs, named, and the start ends with
a decision to requeue; a stop signal ends a process stuck in a collective within its budget;
a second SIGTERM outside Slurm ends it at once; a job whose starts keep failing without a
new checkpoint stops instead of being requeued again.

The faults are injected with CIFAR_JOB_FAULT (watchdog.py): `stop` sends the rank SIGSTOP,
as a stalled node would; `hang` never returns from the step, as a stuck collective."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST

from cifar_job.watchdog import Watchdog

pytestmark = pytest.mark.slow

# 600 training images in global batches of 40: 15 steps an epoch.
ARGS = [
    *("train", "--dataset", "synthetic", "--synthetic-size", "700", "--val-size", "100"),
    *("--batch-size", "40", "--max-epochs", "1", *FAST, "--log-every-n-steps", "1"),
]
DDP = ["--accelerator", "cpu", "--strategy", "ddp", "--devices", "2"]


def start(run_dir: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *ARGS, "--run-dir", str(run_dir), *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; {proc.stderr.read() if proc.stderr else ''}")


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_a_stop_signal_ends_a_process_stuck_in_a_collective_within_its_budget(tmp_path):
    """Rank 1 never returns from step 3; rank 0 is blocked in the next step's all-reduce,
    where its SIGTERM handler cannot run. The watchdog's thread sees the signal and ends the
    process once no progress follows within the stop budget (10 s here), long before the
    hang bound, as after a stop, but without a save."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *DDP, CIFAR_JOB_FAULT="hang:3:1")
    wait_for_line(proc, "CIFAR_JOB_FAULT: rank 1 hangs after step 3")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: rank 0 made no progress" in err and "without a save" in err
    assert took < 10 + 2 + 3  # the budget, a poll of the thread, and slack
    assert not (run_dir / "last.ckpt").exists() or torch.load(
        run_dir / "last.ckpt", weights_only=True
    )
    children = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    assert children.stdout.strip() == ""  # rank 1 went with it


def test_a_healthy_rank_saves_the_last_step_of_a_hang_and_the_rerun_loses_nothing(tmp_path):
    """Rank 1 stops itself (SIGSTOP) in step 6, after step 5, as a stalled node; rank 0
    waits in step 6's gradient all-reduce, its weights still those of step 5. Its watchdog
    names rank 1, saves step 5 from its own thread and ends the start (124). The same command
    then resumes at step 5: no step lost. (tests/test_hangs.py does it on two nodes, and
    checks the weights against an uninterrupted run's.)"""
    hung = tmp_path / "hung"
    once = ["--hang-timeout", "10", "--checkpoint-every", "0"]
    proc = start(hung, *DDP, *once, CIFAR_JOB_FAULT="stop:5:1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err[-3000:]
    assert "cifar-job: hang: rank 1 on " in err and "saved step 5, the last completed one" in err
    record = json.loads((hung / "hang.json").read_text())
    assert record["saved_step"] == 5 and [s["rank"] for s in record["stopped"]] == [1]
    assert json.loads((hung / "decision.json").read_text())["saved"] is True
    saved = torch.load(hung / "last.ckpt", weights_only=True)  # the store's newest, whole
    assert saved["global_step"] == 5 and saved["loops"]["fit_loop"]["epoch_loop.state_dict"]
    left = subprocess.run(["pgrep", "-f", str(hung)], capture_output=True, text=True)
    assert left.stdout.strip() == ""  # the stopped rank went with it

    # The learned bounds (--hang-timeout is free on a resume): 10 s would also bound the
    # start-up, which a loaded 2-core machine can take longer than.
    rerun = start(hung, *DDP, "--checkpoint-every", "0")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    (_, resumed) = [e["step"] for e in events(hung) if e["event"] == "start"]
    assert resumed == 5


def test_a_rank_that_hangs_itself_says_where_its_threads_stopped(tmp_path):
    """A rank whose main thread stops while its watchdog runs (a deadlock, a worker that
    never answers) is the hang's culprit: before the start ends, its log shows where each of
    its threads was, the stuck main thread's frame included, and where its DataLoader
    worker was."""
    loader = ["--data-loader", "torch", "--num-workers", "1"]
    proc = start(tmp_path / "run", "--hang-timeout", "10", *loader, CIFAR_JOB_FAULT="hang:2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err[-3000:]
    dump = err.split("cifar-job: rank 0's threads at the hang:\n")[1]
    assert "Current thread" in dump and "in _watch" in dump  # the watchdog's own
    assert "in inject" in dump and "in on_before_backward" in dump  # where training stopped
    assert "in _worker_loop" in dump  # the worker's, on the SIGQUIT its rank sent it
    assert err.index("threads at the hang") < err.index("cifar-job: hang: rank 0")


def test_a_second_sigterm_outside_slurm_ends_the_process_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, CIFAR_JOB_FAULT="hang:2")
    wait_for_line(proc, "CIFAR_JOB_FAULT: rank 0 hangs after step 2")
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "a second SIGTERM: stopping now" in err
    assert time.monotonic() - sent < 3


def test_the_budget_counts_one_jobs_starts_that_made_no_checkpoint(tmp_path):
    """How check_progress reads events.jsonl (the cluster test, tests/test_hangs.py, runs
    the whole job): stalled starts of this job count, a stop that Slurm announced neither
    counts nor breaks the run of them, a start that saved breaks it, another job's do not."""
    from cifar_job import CifarJobError, events
    from cifar_job.checkpoints import check_progress

    def start(job: str, step: int | None, *ends: dict) -> None:
        events.record(tmp_path, "start", job=job, step=step)
        for end in ends:
            events.record(tmp_path, **end)

    hang = {"event": "hang", "stopped": "rank 1 on n2, after step 7"}
    preempted = {"event": "end", "reason": "stopped", "cause": "sigterm"}
    start("8", None, hang)  # another job's: a resubmission counts anew
    start("9", 5, hang)  # it hung, but saved step 7 first: a start that made progress
    start("9", 7, hang)
    start("9", 7, preempted)  # preempted before it could save: neither counts nor breaks
    start("9", 7, {"event": "end", "reason": "error", "message": "RuntimeError: boom"})
    check_progress(tmp_path, "9", 7, budget=3)  # 2 stalled starts: within the budget
    with pytest.raises(CifarJobError) as refused:
        check_progress(tmp_path, "9", 7, budget=2)
    assert "the last 2 starts of job 9 made no new checkpoint (each resumed from step 7)" in str(
        refused.value
    )
    assert "a hang (rank 1 on n2, after step 7); an error (RuntimeError: boom)" in str(
        refused.value
    )
    check_progress(tmp_path, "10", 7, budget=1)  # a new job
    check_progress(tmp_path, None, 7, budget=1)  # outside Slurm: no budget


@pytest.mark.parametrize(
    ("recent", "section", "stopping", "timeout"),
    [
        ([], "setup", False, 600),  # imports, rendezvous, data: the start-up floor
        ([], "start", False, 600),  # the first step may compile
        ([0.5] * 5, "step", False, 30),  # 10 x 0.5 s is under the floor
        ([0.5, 4.0, 0.5], "step", False, 40),  # 10 x the slowest recent step
        ([0.5, 4.0], "step", True, 12),  # after a stop signal: 3 x, at least 10 s
        ([0.1], "checkpoint", True, 300),  # a save in progress keeps its own floor
    ],
)
def test_the_hang_timeout_is_learned_from_the_slowest_recent_step(
    recent, section, stopping, timeout, tmp_path
):
    watchdog = Watchdog(tmp_path)
    watchdog.recent["step"].extend(recent)
    watchdog.section = section
    assert watchdog.timeout(stopping) == pytest.approx(timeout)
    assert Watchdog(tmp_path, hang_timeout_s=12).timeout() == 12  # --hang-timeout wins


def test_dataloader_workers_end_with_the_run_on_sigterm(tmp_path):
    """With --data-loader torch, the workers are forked copies of the training process: a
    SIGTERM stops the run (saved, 143) and leaves no worker behind, and the workers' own
    signals never reach the watchdog as a second SIGTERM (the run would end unsaved)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--data-loader", "torch", "--num-workers", "2")
    wait_for_line(proc, " step 3/")
    subprocess.run(["pkill", "-TERM", "-f", str(run_dir)])  # the run and its workers, as Slurm does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM: saved" in err, err[-3000:]
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
