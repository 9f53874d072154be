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
from conftest import FAST, cifar_job

from cifar_job.watchdog import HANG_EXIT, Watchdog

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


def test_a_stopped_rank_is_named_and_the_start_ends_to_be_requeued(tmp_path):
    """Rank 1 stops itself (SIGSTOP) after step 3; rank 0 waits in the next collective.
    Rank 0's watchdog names rank 1 from the heartbeats, records the decision, ends the
    start with HANG_EXIT and takes the stopped rank with it. A rerun resumes and finishes."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *DDP, "--hang-timeout", "10", CIFAR_JOB_FAULT="stop:3:1")
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == HANG_EXIT, err[-3000:]
    assert "cifar-job: hang: rank 1 on " in err and "no heartbeat for" in err
    assert err.count("cifar-job: hang:") == 1  # one line, from one rank
    hang = json.loads((run_dir / "hang.json").read_text())
    assert [b["rank"] for b in hang["stopped"]] == [1] and hang["stopped"][0]["step"] <= 3
    stopped_pid = hang["stopped"][0]["pid"]
    assert not alive(stopped_pid)  # nothing left behind, stopped or otherwise
    marker = json.loads((run_dir / "decision.json").read_text())
    assert marker["signal"] == "hang" and marker["requeue"] is True and marker["saved"] is False
    assert [e["event"] for e in events(run_dir)][-1] == "hang"
    assert time.monotonic() - t0 < 120

    rerun = cifar_job(*ARGS, "--run-dir", str(run_dir), *DDP)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (run_dir / "hang.json").exists()
    assert json.loads((run_dir / "decision.json").read_text())["action"] == "finished"


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


def test_a_job_that_fails_the_same_way_on_every_start_stops_after_the_budget(tmp_path):
    """The starts of one Slurm job (its id kept across requeues) that each hang before a new
    checkpoint: after --max-stalled-starts of them the next start stops with one message
    that names the failure, instead of costing another start."""
    run_dir = tmp_path / "run"
    job = {"SLURM_JOB_ID": "4242", "CIFAR_JOB_FAULT": "hang:2"}
    budget = ["--max-stalled-starts", "2", "--hang-timeout", "10", "--checkpoint-every", "0"]
    for _ in range(2):
        hung = cifar_job(*ARGS, "--run-dir", str(run_dir), *budget, env=job)
        assert hung.returncode == HANG_EXIT, hung.stderr[-3000:]
    refused = cifar_job(*ARGS, "--run-dir", str(run_dir), *budget, env=job)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "the last 2 starts of job 4242 made no new checkpoint" in refused.stderr
    assert "each ended with a hang (rank 0 on " in refused.stderr
    assert "Traceback" not in refused.stderr

    # A new job (a resubmission after the fix) counts anew.
    fixed = cifar_job(*ARGS, "--run-dir", str(run_dir), *budget, env={"SLURM_JOB_ID": "4243"})
    assert fixed.returncode == 0, fixed.stderr[-3000:]


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
