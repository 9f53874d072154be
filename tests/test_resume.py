"""Preemption without a cluster: SIGUSR1 to a local run saves mid-epoch and exits 75, and the
resumed run continues with exactly the batches it had left."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, cifar_job

pytestmark = pytest.mark.slow

# 600 training images in batches of 40: 15 steps an epoch, 30 in all.
ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "700",
    "--val-size",
    "100",
    "--batch-size",
    "40",
    "--max-epochs",
    "2",
    "--deterministic",
    *FAST,
]
STEPS_PER_EPOCH = 15


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def metrics(run_dir: Path, version: int) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "logs" / f"version_{version}" / "metrics.csv")))


def epoch_value(rows: list[dict[str, str]], key: str, epoch: int) -> float:
    (value,) = [float(r[key]) for r in rows if r["epoch"] == str(epoch) and r.get(key)]
    return value


def interrupt_at(run_dir: Path, step: int) -> subprocess.CompletedProcess[str]:
    """Run training and send SIGUSR1 once it logs `step`, as Slurm would before a limit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [*ARGS, "--run-dir", str(run_dir), "--log-every-n-steps", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if f" step {step}/" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(out) + rest, err)


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    straight = cifar_job(*ARGS, "--run-dir", str(tmp_path / "straight"), "--log-every-n-steps", "1")
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "interrupted"
    stopped = interrupt_at(run_dir, step=5)
    assert stopped.returncode == 75, stopped.stderr  # saved, asking to be requeued
    assert "SIGUSR1: saved" in stopped.stderr
    saved = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    k = saved["global_step"]
    assert 5 <= k < STEPS_PER_EPOCH and saved["epoch"] == 0  # mid-epoch
    assert not (run_dir / "results.json").exists()
    marker = json.loads((run_dir / "preempted.json").read_text())  # for the launcher
    assert marker["step"] == k and marker["signal"] == signal.SIGUSR1

    resumed = cifar_job(*ARGS, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [None, k]
    a, b = weights(tmp_path / "straight"), weights(run_dir)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    # The interrupted epoch's training figures cover all of it: the sums so far travel in
    # the checkpoint. They equal the uninterrupted run's, which equal the mean of its steps'
    # values (equal batches). Without the sums, they would cover only the steps after k.
    after, plain = metrics(run_dir, 1), metrics(tmp_path / "straight", 0)
    for key in ("loss", "acc"):
        steps = [
            float(r[f"train/{key}_step"])
            for r in plain
            if r["epoch"] == "0" and r.get(f"train/{key}_step")
        ]
        assert len(steps) == STEPS_PER_EPOCH
        value = epoch_value(after, f"train/{key}_epoch", 0)
        assert value == pytest.approx(epoch_value(plain, f"train/{key}_epoch", 0), rel=1e-5)
        assert value == pytest.approx(sum(steps) / len(steps), rel=1e-5)
