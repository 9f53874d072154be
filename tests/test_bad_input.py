"""Bad input, as users and clusters produce it: every case ends in one message that names
the option or the file, with exit 2 for a bad option or value and exit 1 for a problem with
the environment, a file or the data. Never a traceback, never exit 0, never a lost file.

Cases that stop before training run in this process (click's CliRunner); those that reach
`train.run` run the real command in a subprocess, since run() installs signal handlers."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SMOKE, cifar_job

from cifar_job.cli import main
from cifar_job.config import TrainConfig
from cifar_job.model import build_network


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height pixels: all Pillow needs to refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_checkpoint(path: Path, **overrides) -> Path:
    """A cifar-job checkpoint as `predict` and `test` read it: config and network weights."""
    cfg = TrainConfig(arch="resnet18", dataset="synthetic", synthetic_size=200, val_size=20)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    net = build_network(cfg.arch, cfg.stem)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": cfg.to_dict()}, path)
    return path


def run_dir(tmp: Path, **files: str | bytes) -> Path:
    """A run directory as training leaves it (manifest, config, a log), with `files` replaced."""
    d = tmp / "run"
    (d / "logs" / "version_0").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"version": "0.1.0", "starts": [{}]}))
    (d / "config.json").write_text(json.dumps(TrainConfig(run_dir=str(d)).to_dict()))
    (d / "logs" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss_epoch,train/acc_epoch,val/loss,val/acc\n0,9,2.0,0.3,1.9,0.35\n"
    )
    for name, content in files.items():
        path = d / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return d


@dataclass
class Case:
    """`cifar-job ARGS` ({tmp} is a fresh directory) after `setup(tmp)`: its exit code and
    the words its message must hold."""

    args: str
    exit: int
    words: tuple[str, ...]
    setup: Callable[[Path], object] | None = None
    subprocess: bool = False


CONFIGS = {
    "broken.yaml": "batch-size: 32\nlr: [0.1,\n",
    "list.yaml": "- batch-size\n- 32\n",
    "unknown.yaml": "batch-size: 32\nlearning-rate: 0.1\n",
    "types.yaml": "batch-size: many\n",
    "broken.json": '{"batch_size": 32,',
}


def configs(tmp: Path) -> None:
    for name, text in CONFIGS.items():
        (tmp / name).write_text(text)
    (tmp / "binary.yaml").write_bytes(b"\x80\x81\xfe\xff" * 10)


def resumable(tmp: Path, **old) -> None:
    """A run directory with a checkpoint, trained with TrainConfig's defaults plus `old`."""
    d = tmp / "r"
    d.mkdir()
    cfg = TrainConfig(run_dir=str(d), dataset="synthetic", **old)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    # What the settings are checked against: the checkpoint's own (no weights needed).
    checkpoint = {
        "state_dict": {},
        "loops": {},
        "global_step": 5,
        "hyper_parameters": cfg.to_dict(),
    }
    torch.save(checkpoint, d / "step-00000005.ckpt")
    (d / "latest").write_text("step-00000005.ckpt\n")


CASES = {
    # --- usage: options and values (exit 2)
    "batch size zero": Case("train --batch-size 0", 2, ("--batch-size must be 1 or more",)),
    "negative lr": Case("train --lr -0.1", 2, ("--lr must not be negative",)),
    "unknown arch": Case("train --arch resnet99", 2, ("resnet99", "resnet18")),
    "devices banana": Case("train --devices banana", 2, ("--devices must be a count",)),
    "max time typo": Case("train --max-time 5h", 2, ("--max-time", "DD:HH:MM:SS")),
    "label smoothing": Case("train --label-smoothing 1.5", 2, ("--label-smoothing",)),
    "negative val size": Case("train --val-size -1", 2, ("--val-size must not be negative",)),
    "unknown accelerator": Case("train --accelerator quantum", 2, ("quantum", "--accelerator")),
    "unknown option": Case("train --learning-rate 0.1", 2, ("No such option",)),
    "missing config": Case("train --config {tmp}/none.yaml", 2, ("none.yaml",)),
    "malformed yaml": Case(
        "train --config {tmp}/broken.yaml", 2, ("broken.yaml", "not valid YAML", "line"), configs
    ),
    "yaml list": Case("train --config {tmp}/list.yaml", 2, ("list.yaml", "mapping"), configs),
    "yaml unknown key": Case(
        "train --config {tmp}/unknown.yaml", 2, ("unknown keys: learning_rate",), configs
    ),
    "yaml bad type": Case("train --config {tmp}/types.yaml", 2, ("many",), configs),
    "malformed json": Case(
        "train --config {tmp}/broken.json", 2, ("broken.json", "not valid JSON"), configs
    ),
    "binary config": Case(
        "train --config {tmp}/binary.yaml", 2, ("binary.yaml", "not a text file"), configs
    ),
    "config is a directory": Case("train --config {tmp}", 2, ("--config",)),
    # doctor reports a value training would refuse as a failed check, with its other checks.
    "doctor devices": Case(
        "doctor --devices banana --dataset synthetic", 1, ("FAIL  options: --devices must be",)
    ),
    "doctor nodes": Case("doctor --num-nodes 0", 2, ("--num-nodes",)),
    "doctor accelerator": Case("doctor --accelerator quantum", 2, ("quantum",)),
    "submit time": Case("submit --dry-run --time 1:2:3:4", 2, ("--time '1:2:3:4'",)),
    "submit nodes": Case("submit --dry-run --nodes 0", 2, ("--nodes",)),
    "submit sbatch pair": Case("submit --dry-run --sbatch exclusive", 2, ("KEY=VALUE",)),
    "submit train value": Case("submit --dry-run --batch-size 0", 2, ("--batch-size",)),
    "sweep unknown key": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep learning_rate=0.1",
        2,
        ("--sweep", "'learning_rate' is not a train option"),
    ),
    "sweep empty list": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep lr=", 2, ("--sweep lr: give at least one",)
    ),
    "sweep bad value": Case("submit --dry-run --run-dir {tmp}/s --sweep lr=0.1,fast", 2, ("fast",)),
    "sweep bad choice": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep arch=resnet18,vgg", 2, ("vgg",)
    ),
    "sweep twice": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep lr=0.1 --sweep lr=0.2", 2, ("swept twice",)
    ),
    "seeds twice": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep seed=1,2 --seeds 2", 2, ("not both",)
    ),
    "sweep of a location": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep data-dir=a,b", 2, ("cannot be swept",)
    ),
    "sweep too large": Case(
        "submit --dry-run --run-dir {tmp}/s --seeds 9 --sweep lr="
        + ",".join(f"0.{i}" for i in range(1, 12))
        + " --sweep weight-decay="
        + ",".join(f"0.00{i}" for i in range(1, 12)),
        2,
        ("1089 runs", "--yes"),
    ),
    "another sweep in the run dir": Case(
        "submit --dry-run --run-dir {tmp}/s --sweep lr=0.1",
        2,
        ("holds another sweep", "grid {'lr': [0.5]}"),
        lambda tmp: (
            (tmp / "s").mkdir()
            or (tmp / "s" / "sweep.json").write_text(
                json.dumps({"grid": {"lr": [0.5]}, "seeds": [], "base": TrainConfig().to_dict()})
            )
        ),
    ),
    "max parallel without a sweep": Case(
        "submit --dry-run --max-parallel 2", 2, ("--max-parallel and --yes are for sweeps",)
    ),
    "compare nothing": Case("compare {tmp}/none", 1, ("none", "does not exist")),
    "download md5": Case("download --data-dir {tmp} --md5 xyz", 2, ("32 hex digits",)),
    "download url md5": Case(
        "download --data-dir {tmp} --url file:///x.tar.gz", 2, ("--url needs --md5",)
    ),
    "predict top k": Case("predict --ckpt x.ckpt --top-k 0 a.png", 2, ("--top-k",)),
    "predict no images": Case("predict --ckpt x.ckpt", 2, ("IMAGES",)),
    "test no ckpt": Case("test", 2, ("--ckpt",)),
    "test batch size": Case("test --ckpt x.ckpt --batch-size 0", 2, ("--batch-size",)),
    # --- resuming a run directory with settings that define another run (exit 2)
    "resume seed": Case(
        "train --dataset synthetic --run-dir {tmp}/r --seed 1",
        2,
        ("--seed 42 (now 1)", "new --run-dir"),
        lambda tmp: resumable(tmp),
        subprocess=True,
    ),
    "resume arch and lr": Case(
        "train --dataset synthetic --run-dir {tmp}/r --arch resnet18 --lr 0.05",
        2,
        ("--arch resnet34 (now resnet18)", "--lr 0.1 (now 0.05)"),
        lambda tmp: resumable(tmp),
        subprocess=True,
    ),
    "resume onecycle length": Case(
        "train --dataset synthetic --run-dir {tmp}/r --scheduler onecycle --max-epochs 40",
        2,
        ("--max-epochs 30 (now 40)",),
        lambda tmp: resumable(tmp, scheduler="onecycle"),
        subprocess=True,
    ),
    "val size too large": Case(
        "train --dataset synthetic --synthetic-size 100 --val-size 200 --run-dir {tmp}/r "
        "--arch resnet18 --stem imagenet",
        2,
        ("--val-size 200 leaves no training images",),
        subprocess=True,
    ),
    # --- files, data and the environment (exit 1)
    "text file as checkpoint": Case(
        "test --ckpt {tmp}/notes.ckpt",
        1,
        ("notes.ckpt", "not a readable cifar-job checkpoint"),
        lambda tmp: (tmp / "notes.ckpt").write_text("hello\n"),
    ),
    "truncated checkpoint": Case(
        "predict --ckpt {tmp}/cut.ckpt a.png",
        1,
        ("cut.ckpt", "not a readable cifar-job checkpoint"),
        lambda tmp: (tmp / "cut.ckpt").write_bytes(
            write_checkpoint(tmp / "whole.ckpt").read_bytes()[:100_000]
        ),
    ),
    "missing checkpoint": Case("test --ckpt {tmp}/none.ckpt", 1, ("none.ckpt", "does not exist")),
    "checkpoint is a directory": Case("test --ckpt {tmp}", 1, ("does not exist",)),
    "decompression bomb": Case(
        "predict --ckpt {tmp}/m.ckpt {tmp}/bomb.png",
        1,
        ("bomb.png", "too large to decode safely"),
        lambda tmp: (
            write_checkpoint(tmp / "m.ckpt"),
            (tmp / "bomb.png").write_bytes(png_header(30_000, 30_000)),
        ),
    ),
    "large image under the bomb limit": Case(
        "predict --ckpt {tmp}/m.ckpt {tmp}/big.png",
        1,
        ("big.png", "too large to decode safely"),
        lambda tmp: (
            write_checkpoint(tmp / "m.ckpt"),
            (tmp / "big.png").write_bytes(png_header(10_000, 10_000)),
        ),
    ),
    "text file as image": Case(
        "predict --ckpt {tmp}/m.ckpt {tmp}/notes.png",
        1,
        ("notes.png", "cannot read image"),
        lambda tmp: (write_checkpoint(tmp / "m.ckpt"), (tmp / "notes.png").write_text("hi")),
    ),
    "missing image": Case(
        "predict --ckpt {tmp}/m.ckpt {tmp}/none.png",
        1,
        ("none.png", "does not exist"),
        lambda tmp: write_checkpoint(tmp / "m.ckpt"),
    ),
    "status of nothing": Case("status {tmp}/none", 1, ("none", "does not exist")),
    "status of a plain directory": Case("status {tmp}", 1, ("no manifest.json",)),
    "status corrupt manifest": Case(
        "status {tmp}/run",
        1,
        ("manifest.json is damaged",),
        lambda tmp: run_dir(tmp, **{"manifest.json": '{"starts": ['}),
    ),
    "status corrupt results": Case(
        "status {tmp}/run",
        1,
        ("results.json is damaged",),
        lambda tmp: run_dir(tmp, **{"results.json": "\0\0\0"}),
    ),
    "status corrupt metrics": Case(
        "status {tmp}/run",
        1,
        ("metrics.csv is damaged",),
        lambda tmp: run_dir(tmp, **{"logs/version_0/metrics.csv": "epoch,val/acc\n0,high\n"}),
    ),
    "plot corrupt metrics": Case(
        "plot {tmp}/run",
        1,
        ("metrics.csv is damaged",),
        lambda tmp: run_dir(tmp, **{"logs/version_0/metrics.csv": "epoch,val/acc\n0,high\n"}),
    ),
    "plot corrupt results": Case(
        "plot {tmp}/run",
        1,
        ("results.json is damaged",),
        lambda tmp: run_dir(tmp, **{"results.json": "{"}),
    ),
    "plot of a plain directory": Case("plot {tmp}", 1, ("is not a run directory",)),
    "plot to a text file": Case(
        "plot {tmp}/run --out {tmp}/curves.txt", 2, ("--out", "curves.txt", ".png"), run_dir
    ),
    "compare --plot to a text file": Case(
        "compare {tmp}/run --plot --out {tmp}/compare.txt",
        2,
        ("--out", "compare.txt", ".png"),
        run_dir,
    ),
    "plot into a missing directory": Case(
        "plot {tmp}/run --out {tmp}/none/curves.png", 1, ("none/curves.png",), run_dir
    ),
    "status truncated metrics row": Case(
        "status {tmp}/run",
        0,
        ("val/acc 0.4000", "val/loss 1.9000"),
        lambda tmp: run_dir(
            tmp, **{"logs/version_0/metrics.csv": "epoch,val/acc,val/loss\n0,0.35,1.9\n1,0.4"}
        ),
    ),
    "strategy typo": Case(
        "train --dataset synthetic --run-dir {tmp}/r --strategy dpp",
        2,
        ("strategy", "dpp"),
        subprocess=True,
    ),
    # A finished run's settings are read from config.json (its checkpoints may be gone).
    "train corrupt config.json": Case(
        "train --dataset synthetic --run-dir {tmp}/run",
        1,
        ("config.json is damaged",),
        lambda tmp: run_dir(tmp, **{"config.json": "{", "results.json": "{}"}),
        subprocess=True,
    ),
    "download into a file": Case(
        "download --data-dir {tmp}/file --url file:///x.tar.gz --md5 " + "0" * 32,
        1,
        ("file",),
        lambda tmp: (tmp / "file").write_text(""),
    ),
    "submit off the cluster": Case(
        "submit --dataset synthetic --run-dir {tmp}/r",
        1,
        ("no sbatch or srun on PATH", "--dry-run"),
    ),
}


@pytest.fixture()
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without Slurm's commands, as on a laptop."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))


@pytest.mark.parametrize("name", CASES)
def test_bad_input_ends_in_one_clear_message(name, tmp_path, monkeypatch):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    if case.setup:
        case.setup(work)
    args = case.args.replace("{tmp}", str(work)).split()
    if case.subprocess:
        result = cifar_job(*args, cwd=tmp_path)
        code, output = result.returncode, result.stdout + result.stderr
        assert "Traceback" not in output, output
    else:
        monkeypatch.chdir(tmp_path)
        if name == "submit off the cluster":
            monkeypatch.setenv("PATH", str(work))
        result = CliRunner().invoke(main, args)
        code, output = result.exit_code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert code == case.exit, output
    for words in case.words:
        assert words in output, output
    assert len(CASES) >= 40


def test_submit_dry_run_needs_no_slurm(tmp_path, empty_path):
    result = CliRunner().invoke(
        main, ["submit", "--dry-run", "--dataset", "synthetic", "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash") and "#SBATCH --requeue" in result.output


def test_wrong_md5_keeps_the_good_archive(tmp_path, archive):
    """A typo in --md5 must not delete the archive that is already there and good."""
    data = tmp_path / "data"
    data.mkdir()
    good = data / archive[0].name
    good.write_bytes(archive[0].read_bytes())
    result = CliRunner().invoke(
        main,
        ["download", "--data-dir", str(data), "--url", archive[0].as_uri(), "--md5", "f" * 32],
    )
    assert result.exit_code == 1 and "md5 mismatch" in result.output
    assert hashlib.md5(good.read_bytes()).hexdigest() == archive[1]
    assert sorted(p.name for p in data.iterdir()) == [".download.lock", good.name]


def test_status_of_a_run_with_a_truncated_last_checkpoint_reports_the_older_one(tmp_path):
    """A kill mid-write (before atomic saves) or a full disk leaves last.ckpt cut short:
    status says so and where the next start will resume from."""
    d = run_dir(tmp_path)
    write_checkpoint(d / "best-epoch001.ckpt")
    whole = torch.load(d / "best-epoch001.ckpt", weights_only=True)
    torch.save({**whole, "global_step": 40, "epoch": 1, "loops": {}}, d / "best-epoch001.ckpt")
    (d / "last.ckpt").write_bytes((d / "best-epoch001.ckpt").read_bytes()[:5000])
    result = CliRunner().invoke(main, ["status", str(d)])
    assert result.exit_code == 0, result.output
    assert "step 40, epoch 1 (in best-epoch001.ckpt)" in result.output
    assert "warning: skipping unreadable checkpoint" in result.output
    assert "last.ckpt" in result.output


def test_a_job_meant_for_a_container_never_trains_on_the_host(tmp_path):
    """pyxis loaded as `optional` runs the task on the host when the container cannot start;
    the templates and `submit --container-image` name the image, and the task refuses."""
    run_dir = tmp_path / "run"
    env = {"CIFAR_JOB_CONTAINER": "dockerd://cifar-job:test"}
    result = cifar_job("train", *SMOKE, "--run-dir", str(run_dir), env=env)
    assert result.returncode == 1, result.stderr
    assert "was to run in the container dockerd://cifar-job:test" in result.stderr
    assert "runs on the host" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()  # nothing trained, nothing written
