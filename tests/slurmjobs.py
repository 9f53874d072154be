"""Helpers for tests on the local Slurm cluster (tests/cluster/start.sh): submit as a user
would, wait for jobs and log lines, read checkpoints, check that nothing is left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import REPO

# 1,000 training images in global batches of 40: 25 optimizer steps per epoch on any layout.
TRAIN = [
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "1200",
    "--val-size",
    "200",
    "--arch",
    "resnet18",
    "--stem",
    "imagenet",
    "--num-workers",
    "0",
    "--batch-size",
    "40",
    "--lr",
    "0.05",
    "--log-every-n-steps",
    "1",
]
STEPS_PER_EPOCH = 25
ONE_NODE_TWO_TASKS = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
# `cifar-job submit` of a 2-node job, one CPU task per node, for 10 minutes at most.
SUBMIT_TWO_NODES = [
    *("submit", "--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1"),
    *("--time", "10"),
]


def job_env(**extra: str) -> dict[str, str]:
    """What a user's login shell has: the venv's cifar-job on PATH (sbatch exports it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {
        **os.environ,
        "PATH": path,
        "PYTHONUNBUFFERED": "1",
        "CIFAR_JOB_HOME": str(REPO),
        "ACCELERATOR": "cpu",
        **extra,
    }


def sbatch(*args: str, cwd: Path, **env: str) -> str:
    """Submit as a user would, from cwd; returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=cwd,
        env=job_env(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return out.stdout.split("JobState=")[1].split()[0] if "JobState=" in out.stdout else "GONE"


def wait_done(job_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout} s")


def wait_for_text(path_glob: str, base: Path, text: str, timeout: float = 180) -> None:
    wait_for_log(path_glob, base, lambda log: text in log, repr(text), timeout)


def wait_for_step(path_glob: str, base: Path, step: int, after: str, timeout: float = 180) -> None:
    """Wait until a log shows training at `step` or later, past the last line holding `after`
    (a start that resumed beyond `step` counts as soon as it trains)."""

    def reached(log: str) -> bool:
        log = log[log.rindex(after) :] if after in log else ""
        return any(int(n) >= step for n in re.findall(r" step (\d+)/", log))

    wait_for_log(path_glob, base, reached, f"step {step} after {after!r}", timeout)


def wait_for_log(
    path_glob: str, base: Path, found: Callable[[str], bool], what: str, timeout: float
) -> None:
    """Poll the logs matching path_glob until one satisfies `found`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(found(p.read_text(errors="replace")) for p in base.glob(path_glob)):
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} never appeared in {base}/{path_glob}")


def ckpt_step(run_dir: Path) -> int:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def assert_no_rank_left(run_dir: Path) -> None:
    """No process of the run survives its job (Slurm reaps a finished step within seconds)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"processes still running for {run_dir}: {out.stdout}")


def preempt(cwd: Path) -> str:
    """A job in the `high` partition that needs both nodes whole: Slurm preempts `low`.
    Returns its job id."""
    return sbatch(
        "-p", "high", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1", cwd=cwd
    )


def seconds_to_start(job_id: str) -> int:
    """How long the job waited from its submission to its start (whole seconds, as Slurm
    keeps them): for a `preempt` job, the time until the preempted job gave its nodes up."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    times = dict(re.findall(r"(SubmitTime|StartTime)=(\S+)", out.stdout))
    submit, start = (
        time.mktime(time.strptime(times[k], "%Y-%m-%dT%H:%M:%S"))
        for k in ("SubmitTime", "StartTime")
    )
    return int(start - submit)


def saved_steps(log: str) -> list[int]:
    """The steps the ranks saved at on each stop, in order (every rank reports the same)."""
    steps = [int(s) for s in re.findall(r"SIGTERM: saved \S+last\.ckpt at step (\d+)", log)]
    return sorted(set(steps))


def manifest_starts(run_dir: Path) -> list[dict]:
    """What manifest.json records of each start of the run."""
    return json.loads((run_dir / "manifest.json").read_text())["starts"]


def resumed_steps(run_dir: Path) -> list[int | None]:
    return [s["step"] for s in manifest_starts(run_dir)]
