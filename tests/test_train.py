"""Training end to end on CPU, as a user runs it: train -> test -> predict -> plot, resume,
and 2-process DDP over gloo."""

from __future__ import annotations

import csv
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, TRAIN_PER_BATCH, cifar_job

N_TRAIN = 5 * TRAIN_PER_BATCH - 100  # --val-size 100
BATCH = 50
STEPS_PER_EPOCH = N_TRAIN // BATCH  # the last partial batch is dropped


def train(data_dir: Path, run_dir: Path, *extra: str):
    return cifar_job(
        "train",
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--val-size",
        "100",
        "--batch-size",
        str(BATCH),
        *FAST,
        *extra,
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "e2e"
    result = train(data_dir, run_dir, "--max-epochs", "3", "--tensorboard")
    assert result.returncode == 0, result.stderr
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


@pytest.fixture(scope="module")
def one_epoch(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for one epoch, trained once: each test that trains on from it gets its
    own copy (a copied run directory uses its own checkpoints: tested below)."""
    run_dir = tmp_path_factory.mktemp("runs") / "one-epoch"
    result = train(data_dir, run_dir, "--max-epochs", "1")
    assert result.returncode == 0, result.stderr
    return run_dir


def copy_of(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["test/acc"] > 0.3  # chance is 0.1
    assert 0 <= results["test/acc"] <= results["test/acc_top5"] <= 1 + 1e-6
    assert results["global_step"] == 3 * STEPS_PER_EPOCH
    confusion = torch.tensor(results["test/confusion"])
    assert confusion.sum() == 200  # every test image counted once
    # test/acc is plain accuracy: the confusion matrix's diagonal over all images.
    assert results["test/acc"] == pytest.approx(confusion.trace().item() / 200, abs=1e-6)
    assert json.loads((trained / "config.json").read_text())["batch_size"] == BATCH
    last = load(trained / "last.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * STEPS_PER_EPOCH
    assert last["hyper_parameters"]["arch"] == "resnet18"
    manifest = json.loads((trained / "manifest.json").read_text())
    assert len(manifest["starts"]) == 1 and manifest["final"]["test/acc"] == results["test/acc"]
    rows = list(csv.DictReader(open(trained / "logs" / "version_0" / "metrics.csv")))
    assert sorted(r["epoch"] for r in rows if r.get("val/acc")) == ["0", "1", "2"]
    assert any(r.get("train/loss_step") for r in rows) and any(
        r.get("train/acc_epoch") for r in rows
    )


@pytest.mark.slow
def test_batch_logs_get_plain_progress_lines_and_tensorboard_events(trained):
    stdout = (trained / "stdout.txt").read_text()
    assert f"epoch 1/3 step 5/{3 * STEPS_PER_EPOCH} loss" in stdout  # not a terminal: lines
    assert "epoch 3/3 val/loss" in stdout
    assert list((trained / "tensorboard").glob("version_0/events.out.tfevents.*"))


def test_fast_dev_run_is_a_smoke_test_that_writes_no_results(tmp_path):
    result = cifar_job(
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "200",
        "--val-size",
        "50",
        "--fast-dev-run",
        "--batch-size",
        "16",
        "--run-dir",
        str(tmp_path / "r"),
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    assert "test/acc " in result.stdout
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.slow
def test_test_command_reproduces_the_run_s_test_accuracy(trained, data_dir):
    results = json.loads((trained / "results.json").read_text())
    out = cifar_job(
        "test", "--ckpt", results["best_checkpoint"], "--data-dir", str(data_dir), "--json"
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["test/acc"] == pytest.approx(results["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_predict_classifies_png_and_jpeg_of_any_size(trained, data_dir, tmp_path):
    from PIL import Image

    from cifar_job.dataset import CLASSES, load_split

    images, labels = load_split(data_dir, train=False)
    paths = []
    for i, fmt in ((0, "PNG"), (1, "JPEG")):
        path = tmp_path / f"img{i}.{fmt.lower()}"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((64, 48)).save(path, fmt)
        paths.append(str(path))
    out = cifar_job(
        "predict", "--ckpt", str(trained / "last.ckpt"), "--json", "--top-k", "3", *paths
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [line["image"] for line in lines] == paths
    for line in lines:
        probs = [t["prob"] for t in line["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert line["top"][0]["class"] in CLASSES
    human = cifar_job("predict", "--ckpt", str(trained / "last.ckpt"), paths[0])
    assert human.returncode == 0 and human.stdout.startswith(f"{paths[0]}: ")


@pytest.mark.slow
def test_plot_draws_curves_and_confusion_matrix(trained, tmp_path):
    from PIL import Image

    out = cifar_job("plot", str(trained), "--out", str(tmp_path / "run.png"))
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "run.png") as im:
        assert im.format == "PNG" and im.size[0] > 1.5 * im.size[1]  # three panels side by side
        assert len(set(im.convert("L").getdata())) > 50  # not a blank canvas


@pytest.mark.slow
def test_finished_run_rerun_does_nothing(trained, data_dir):
    before = (trained / "last.ckpt").stat().st_mtime_ns
    result = train(data_dir, trained, "--max-epochs", "3")
    assert result.returncode == 0, result.stderr
    assert "already finished 3 epochs" in result.stdout
    assert (trained / "last.ckpt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_stopped_run_resumes_at_the_next_epoch(data_dir, one_epoch, tmp_path):
    run_dir = copy_of(one_epoch, tmp_path / "resume")
    after_one = load(run_dir / "last.ckpt")
    assert after_one["epoch"] == 0 and after_one["global_step"] == STEPS_PER_EPOCH

    second = train(data_dir, run_dir, "--max-epochs", "2")
    assert second.returncode == 0, second.stderr
    after_two = load(run_dir / "last.ckpt")
    assert after_two["epoch"] == 1 and after_two["global_step"] == 2 * STEPS_PER_EPOCH
    # It continued from epoch 1's weights and optimizer state, not from scratch.
    momentum = after_two["optimizer_states"][0]["state"]
    assert momentum, "optimizer state was not carried over"
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [None, STEPS_PER_EPOCH]
    # The file the store's `latest` names, which last.ckpt links to.
    assert Path(starts[1]["resumed_from"]).name == f"step-{STEPS_PER_EPOCH:08d}.ckpt"
    assert (run_dir / "last.ckpt").resolve().name == f"step-{2 * STEPS_PER_EPOCH:08d}.ckpt"
    # The manifest records what each start ran with.
    assert [s["config"]["max_epochs"] for s in starts] == [1, 2]
    assert {(s["python"], s["host"]) for s in starts} == {(sys.executable, socket.gethostname())}
    lrs = []
    for start, epoch in ((0, "0"), (1, "1")):  # each start logs its own epochs
        rows = list(csv.DictReader(open(run_dir / "logs" / f"version_{start}" / "metrics.csv")))
        assert [r["epoch"] for r in rows if r.get("val/acc")] == [epoch]
        lrs.append([float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")])
    # The longer run carries the cosine on from where the first left it, at zero: the
    # learning rate does not jump back up (to 0.025, half the peak, as it once did).
    assert max(lrs[0]) > 0.04 and max(lrs[1]) < 1e-6


@pytest.mark.slow
def test_a_moved_or_copied_run_directory_uses_its_own_checkpoints(data_dir, one_epoch, tmp_path):
    first = copy_of(one_epoch, tmp_path / "first")
    copy = copy_of(first, tmp_path / "copy")
    before = {p.name: p.stat().st_mtime_ns for p in first.glob("*.ckpt")}
    moved = tmp_path / "moved"
    first.rename(moved)  # the original is gone: a stale path would point nowhere
    for run_dir in (copy, moved):
        result = train(data_dir, run_dir, "--max-epochs", "2")
        assert result.returncode == 0, result.stderr
        results = json.loads((run_dir / "results.json").read_text())
        assert Path(results["best_checkpoint"]).parent == run_dir
        assert len(list(run_dir.glob("best-epoch*.ckpt"))) == 1  # the old best was replaced
        states = load(run_dir / "last.ckpt")["callbacks"].values()
        paths = [v for s in states for v in s.values() if isinstance(v, str) and v[:1] == "/"]
        assert paths and all(p.startswith(str(run_dir)) for p in paths), paths
    assert {p.name: p.stat().st_mtime_ns for p in moved.glob("*.ckpt")} != before


@pytest.mark.slow
def test_max_time_ends_each_start_with_a_checkpoint_and_a_rerun_continues(data_dir, tmp_path):
    """--max-time counts per start. Lightning's own clock carried over into the resumed
    run, so a rerun stopped at once and reported the unfinished run as finished."""
    run_dir = tmp_path / "timed"
    steps = []
    for _ in range(2):
        result = train(data_dir, run_dir, "--max-epochs", "50", "--max-time", "00:00:00:04")
        assert result.returncode == 75, result.stderr
        assert "--max-time reached: saved" in result.stderr
        assert not (run_dir / "results.json").exists()
        steps.append(load(run_dir / "last.ckpt")["global_step"])
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert starts[1]["step"] == steps[0] > 0 and steps[1] > steps[0]


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_to_an_older_valid_one(data_dir, one_epoch, tmp_path):
    run_dir = copy_of(one_epoch, tmp_path / "corrupt")
    (run_dir / "last.ckpt").write_bytes(b"half a checkpoint")  # a kill mid-write, pre-atomic
    result = train(data_dir, run_dir, "--max-epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable checkpoint" in result.stderr
    assert load(run_dir / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_splits_the_global_batch(data_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    result = train(
        data_dir,
        run_dir,
        "--max-epochs",
        "2",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
    )
    assert result.returncode == 0, result.stderr
    assert ": 2 process(es) on 1 node(s) x 2 cpu device(s), " in result.stdout
    assert "global batch 50" in result.stdout
    # Global batch 50 = 25 per rank: an epoch is N_TRAIN // 50 optimizer steps. Were 50 the
    # per-rank batch, each rank would see half the data in half as many steps.
    last = load(run_dir / "last.ckpt")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    results = json.loads((run_dir / "results.json").read_text())
    assert sum(map(sum, results["test/confusion"])) == 200  # the shards cover the test set once
    assert result.stdout.count("test/acc ") == 1  # rank 0 reports, rank 1 does not


@pytest.mark.slow
def test_predict_refuses_a_checkpoint_of_another_architecture(trained, tmp_path):
    ckpt = load(trained / "last.ckpt")
    ckpt["hyper_parameters"]["arch"] = "resnet34"  # resnet18 weights claiming to be resnet34
    torch.save(ckpt, tmp_path / "other.ckpt")
    (tmp_path / "img.png").write_bytes(b"")
    out = cifar_job("predict", "--ckpt", str(tmp_path / "other.ckpt"), str(tmp_path / "img.png"))
    assert out.returncode == 1
    assert "do not fit a resnet34" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_predict_refuses_unreadable_images(trained, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    out = cifar_job("predict", "--ckpt", str(trained / "last.ckpt"), str(tmp_path / "notes.png"))
    assert out.returncode == 1
    assert "cannot read image" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_test_and_predict_refuse_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "x.ckpt"
    if content is None:  # a real torch file, but no cifar-job checkpoint
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    for args in (["test", "--ckpt", str(path)], ["predict", "--ckpt", str(path), "a.png"]):
        out = cifar_job(*args)
        assert out.returncode == 1, out.stderr
        assert "not a" in out.stderr and "checkpoint" in out.stderr
        assert "Traceback" not in out.stderr


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    out = cifar_job("predict", "--ckpt", str(tmp_path / "evil.ckpt"), "a.png")
    assert out.returncode == 1
    assert "pwned" not in out.stdout


@pytest.mark.slow
def test_ddp_evaluation_whose_shards_differ_by_a_batch_finishes_and_counts_each_image_once(
    tmp_path,
):
    """101 test images at global batch 100 on 2 ranks: shards of 51 and 50, which were 2 and
    1 batches, and a collective per test batch then hung for gloo's 30 minutes."""
    run_dir = tmp_path / "run"
    args = [*("--dataset", "synthetic", "--synthetic-size", "505", "--val-size", "105")]
    args += [*FAST, "--batch-size", "100", "--max-epochs", "1", "--run-dir", str(run_dir)]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    trained = cifar_job("train", *args, *ddp, timeout=300)
    assert trained.returncode == 0, trained.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert sum(map(sum, results["test/confusion"])) == 101  # every image once, no padding
    # One process scores the same weights on the same 101 images: the same figures.
    alone = json.loads(cifar_job("test", "--ckpt", results["best_checkpoint"], "--json").stdout)
    assert alone["test/acc"] == pytest.approx(results["test/acc"], abs=1e-9)
    assert alone["test/loss"] == pytest.approx(results["test/loss"], rel=1e-5)
