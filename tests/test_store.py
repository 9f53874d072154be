"""The run directory's checkpoint store: immutable step-numbered files, a `latest` pointer
(with `last.ckpt` linked to the same file), retention of the newest --keep-checkpoints and
the best, resume that reads the pointer and falls back to the newest file that loads, the
settings checked against the checkpoint resumed, and checkpoints copied in by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, cifar_job

pytestmark = pytest.mark.slow

# 300 training images in batches of 40: 7 steps an epoch.
ARGS = [
    *("train", "--dataset", "synthetic", "--synthetic-size", "400", "--val-size", "100"),
    *("--batch-size", "40", *FAST),
]
STEPS = 7


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def files(run_dir: Path) -> list[str]:
    """The checkpoint files proper (last.ckpt is a link to one of them)."""
    return sorted(p.name for p in run_dir.glob("*.ckpt") if not p.is_symlink())


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with a save every 0.3 s: many saves, few files."""
    run_dir = tmp_path_factory.mktemp("store") / "run"
    done = cifar_job(
        *ARGS, "--max-epochs", "1", "--checkpoint-every", "0.005", "--run-dir", str(run_dir)
    )
    assert done.returncode == 0, done.stderr
    return run_dir


def copy(run_dir: Path, tmp_path: Path) -> Path:
    to = tmp_path / "run"
    shutil.copytree(run_dir, to, symlinks=True)
    (to / "results.json").unlink()  # not finished: the reruns train on
    return to


def test_frequent_saves_keep_the_newest_two_and_the_best(one_epoch):
    kept = files(one_epoch)
    steps = [n for n in kept if n.startswith("step-")]
    assert len(kept) <= 2 + 1 and len(steps) == 2, kept
    assert [n for n in kept if n.startswith("best-")] == ["best-epoch000.ckpt"]
    assert (one_epoch / "latest").read_text().strip() == f"step-{STEPS:08d}.ckpt"
    assert (one_epoch / "last.ckpt").resolve() == one_epoch / f"step-{STEPS:08d}.ckpt"
    assert step_of(one_epoch / "last.ckpt") == STEPS
    assert not list(one_epoch.glob(".*.tmp"))


def test_a_damaged_pointer_resumes_from_the_newest_file_that_loads(one_epoch, tmp_path):
    run_dir = copy(one_epoch, tmp_path)
    (run_dir / "best-epoch000.ckpt").unlink()  # else its step, as new as the newest, wins
    (run_dir / "latest").write_text("\x00garbage")
    newest = run_dir / f"step-{STEPS:08d}.ckpt"
    older = sorted(run_dir.glob("step-*.ckpt"))[0]
    older_step = step_of(older)  # retention removes it once newer files are written
    newest.write_bytes(newest.read_bytes()[:4000])  # and the newest file cut short
    rerun = cifar_job(*ARGS, "--max-epochs", "2", "--run-dir", str(run_dir))
    assert rerun.returncode == 0, rerun.stderr
    assert f"cifar-job: warning: skipping unreadable checkpoint {newest}" in rerun.stderr
    assert "UserWarning" not in rerun.stderr  # the CLI's own line, not Python's
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert starts[-1]["resumed_from"] == str(older) and starts[-1]["step"] == older_step < STEPS
    assert step_of(run_dir / "last.ckpt") == 2 * STEPS


def test_a_best_checkpoint_newer_than_the_store_s_is_resumed_from(one_epoch, tmp_path):
    """The epoch's best is written before the epoch's step file: a kill between the two
    must not cost the epoch."""
    run_dir = copy(one_epoch, tmp_path)
    newest = run_dir / f"step-{STEPS:08d}.ckpt"
    newest.unlink()  # killed before the epoch's step file
    older = sorted(run_dir.glob("step-*.ckpt"))[-1]
    (run_dir / "latest").write_text(older.name + "\n")
    rerun = cifar_job(*ARGS, "--max-epochs", "2", "--run-dir", str(run_dir))
    assert rerun.returncode == 0, rerun.stderr
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert Path(starts[-1]["resumed_from"]).name == "best-epoch000.ckpt"
    assert starts[-1]["step"] == STEPS


def test_settings_are_checked_against_the_checkpoint_resumed(one_epoch, tmp_path):
    """config.json is rewritten by every start; the checkpoint says what was trained."""
    run_dir = copy(one_epoch, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    clash = cifar_job(*ARGS, "--lr", "0.5", "--max-epochs", "2", "--run-dir", str(run_dir))
    assert clash.returncode == 2 and "--lr 0.05 (now 0.5)" in clash.stderr, clash.stderr
    same = cifar_job(*ARGS, "--max-epochs", "2", "--run-dir", str(run_dir))
    assert same.returncode == 0, same.stderr


def test_a_checkpoint_copied_in_by_hand_is_resumed_from(one_epoch, tmp_path):
    """A training checkpoint copied into a run directory with no store (no step files, no
    `latest`) is resumed from, by its content; never trained over from scratch."""
    run_dir = copy(one_epoch, tmp_path)
    target = (run_dir / "last.ckpt").resolve()
    (run_dir / "last.ckpt").unlink()
    shutil.copy(target, run_dir / "last.ckpt")
    for path in [*run_dir.glob("step-*.ckpt"), run_dir / "latest"]:
        path.unlink()
    rerun = cifar_job(*ARGS, "--max-epochs", "2", "--run-dir", str(run_dir))
    assert rerun.returncode == 0, rerun.stderr
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert starts[-1]["resumed_from"] == str(run_dir / "last.ckpt") and starts[-1]["step"] == STEPS
    assert (run_dir / "last.ckpt").is_symlink() and step_of(run_dir / "last.ckpt") == 2 * STEPS
