"""Stops without a cluster: SIGUSR1 (a time limit coming) or SIGTERM (`docker stop`, a
preemption) to a local run saves mid-epoch and exits 75 or 143; SIGKILL at random moments
loses at most the steps since the last periodic save. Every resumed run continues with
exactly the batches it had left, to the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
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


def start(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [*ARGS, "--run-dir", str(run_dir), "--log-every-n-steps", "1", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = cifar_job(*ARGS, "--run-dir", str(run_dir), "--log-every-n-steps", "1")
    assert result.returncode == 0, result.stderr
    return run_dir


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def interrupt_at(
    run_dir: Path, step: int, sig: int = signal.SIGUSR1
) -> subprocess.CompletedProcess[str]:
    """Run training and send `sig` once it logs `step`, as Slurm or Docker would."""
    args = [*ARGS, "--run-dir", str(run_dir), "--log-every-n-steps", "1"]
    proc = start(run_dir)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if f" step {step}/" in line:
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(out) + rest, err)


@pytest.mark.parametrize(
    "sig, status, requeue",
    [(signal.SIGUSR1, 75, True), (signal.SIGTERM, 143, False)],
    ids=["usr1-time-limit", "sigterm-stop"],
)
def test_interrupted_run_resumes_to_identical_weights(straight, tmp_path, sig, status, requeue):
    run_dir = tmp_path / "interrupted"
    stopped = interrupt_at(run_dir, step=5, sig=sig)
    # Saved either way; 75 asks the launcher for a requeue, 143 says "stopped from outside".
    # Never 0: Lightning's own SIGTERM handling ended unsaved with 0, a "completed" job.
    assert stopped.returncode == status, stopped.stderr
    assert f"{sig.name}: saved" in stopped.stderr
    saved = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    k = saved["global_step"]
    assert 5 <= k < STEPS_PER_EPOCH and saved["epoch"] == 0  # mid-epoch
    assert not (run_dir / "results.json").exists()
    marker = json.loads((run_dir / "decision.json").read_text())  # for the launcher
    action = "requeue" if requeue else "wait"
    assert marker == {"action": action, "step": k, "signal": sig.name, "saved": True}
    # what the batch script reads
    assert (run_dir / "decision.env").read_text() == f"action={action}\nsaved=1\nstep={k}\n"

    resumed = cifar_job(*ARGS, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [None, k]
    assert_same_weights(run_dir, straight)
    # The resumed start took the stop's decision over; the finished run left its own.
    assert json.loads((run_dir / "decision.json").read_text())["action"] == "finished"

    # The interrupted epoch's training figures cover all of it: the sums so far travel in
    # the checkpoint. They equal the uninterrupted run's, which equal the mean of its steps'
    # values (equal batches). Without the sums, they would cover only the steps after k.
    after, plain = metrics(run_dir, 1), metrics(straight, 0)
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


def test_sigkill_at_random_moments_loses_only_the_steps_since_the_last_save(straight, tmp_path):
    """kill -9 six times, two of them in the middle of a save, rerunning the same command
    each time: every rerun starts from the newest whole checkpoint and the run ends exactly
    as the uninterrupted one did."""
    run_dir, every = tmp_path / "killed", ["--checkpoint-every", "0.01"]  # 0.6 s of training
    rng, during_save, resumed_at = random.Random(), 0, []

    def newest() -> str:
        return (run_dir / "latest").read_text() if (run_dir / "latest").exists() else ""

    for kill in range(6):
        before = newest()
        proc = start(run_dir, *every)
        assert proc.stdout is not None
        for line in proc.stdout:  # let it train
            if " step " in line:
                break
        deadline = time.monotonic() + 30
        if kill % 3 == 0:  # in the middle of writing a checkpoint
            while not any(run_dir.glob(".*.ckpt.*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.002)
            during_save += any(run_dir.glob(".*.ckpt.*.tmp"))
        else:  # at a random moment after this start's first save: each such start progresses
            while newest() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 1.2))
        proc.kill()
        proc.communicate(timeout=60)
        if (run_dir / "manifest.json").exists():
            resumed_at.append(json.loads((run_dir / "manifest.json").read_text())["starts"][-1])
    assert during_save >= 2, "no kill landed during a save"
    steps = [s["step"] or 0 for s in resumed_at]
    assert steps == sorted(steps) and steps[-1] > 0, steps  # never back to an older state

    final = cifar_job(*ARGS, *every, "--run-dir", str(run_dir))
    assert final.returncode == 0, final.stderr
    assert weights(run_dir).keys() and not list(run_dir.glob(".*.tmp"))  # leftovers cleared
    assert (
        torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH
    )
    assert_same_weights(run_dir, straight)


def test_a_run_whose_checkpoints_all_fail_to_load_stops_instead_of_starting_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(b"half a checkpoint")
    (run_dir / "best-epoch003.ckpt").write_bytes(b"")
    result = cifar_job(*ARGS, "--run-dir", str(run_dir))
    assert result.returncode == 1
    assert "holds checkpoints, but none loads (best-epoch003.ckpt, last.ckpt)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "last.ckpt").read_bytes() == b"half a checkpoint"  # nothing overwritten


def test_a_run_stopped_on_two_ranks_resumes_on_one(tmp_path):
    """A job requeued onto fewer GPUs: stopped mid-epoch under DDP on 2 ranks, resumed on 1.
    The position is kept in samples, so the one rank finishes the epoch with exactly the
    batches the two had left (test_data.py checks the samples), then trains on as usual."""
    run_dir = tmp_path / "ranks"
    ddp = ["--accelerator", "cpu", "--strategy", "ddp"]
    proc = start(run_dir, *ddp, "--devices", "2")
    assert proc.stdout is not None
    for line in proc.stdout:
        if " step 5/" in line:
            proc.send_signal(signal.SIGUSR1)  # to rank 0; the ranks agree at the next step
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    k = torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= k < STEPS_PER_EPOCH

    resumed = cifar_job(*ARGS, *ddp, "--devices", "1", "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    last = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    epochs = [r["epoch"] for r in metrics(run_dir, 1) if r.get("val/acc")]
    assert epochs == ["0", "1"]  # the resumed epoch ended where an epoch ends
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert [s["config"]["devices"] for s in starts] == ["2", "1"] and starts[1]["step"] == k


def test_a_stop_during_validation_tests_the_checkpoint_an_uninterrupted_run_tests(tmp_path):
    """SIGTERM at the only epoch's last step, or while it validates. The stop used to come
    before that epoch's best checkpoint was tracked (or, at its last step, before it was
    validated at all): the rerun then had no best and tested other weights."""
    args = [
        *("train", "--dataset", "synthetic", "--synthetic-size", "800", "--val-size", "600"),
        *("--batch-size", "40", "--max-epochs", "1", "--deterministic", *FAST),
        *("--log-every-n-steps", "1"),
    ]
    whole = cifar_job(*args, "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    run_dir = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *args, "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if " step 5/5 " in line:  # the epoch's last step: 15 validation batches follow
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: saved" in err, err[-2000:]
    rerun = cifar_job(*args, "--run-dir", str(run_dir))
    assert rerun.returncode == 0, rerun.stderr
    expected = json.loads((tmp_path / "whole" / "results.json").read_text())
    got = json.loads((run_dir / "results.json").read_text())
    assert Path(got["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name
    assert got["test/acc"] == expected["test/acc"] and got["test/loss"] == expected["test/loss"]
