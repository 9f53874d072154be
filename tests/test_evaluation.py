"""`cifar-job test` scores the weights that were trained, whatever the model options, and
train, test and predict print what the user needs: no tips, hints or deprecation notices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, cifar_job

pytestmark = pytest.mark.slow

# Lightning's advertisements and hints, and dependencies' deprecation notices.
NOISE = ("Tip", "litlogger", "srun", "available:", "deprecated", "Deprecation", "FutureWarning")


@pytest.mark.parametrize(
    "options",
    [
        # --compile: test_docker.py, in the image (compiling on 2 CPU cores takes a minute)
        ["--channels-last"],
        # 32 is the default: test_train.py checks it. On a CPU Lightning trains 16-mixed as
        # bf16-mixed (and says so), so bf16-mixed stands for both here.
        ["--precision", "bf16-mixed"],
    ],
    ids=lambda o: "".join(o).strip("-"),
)
def test_test_command_scores_the_best_checkpoint_as_training_did(options, tmp_path: Path):
    run_dir = tmp_path / "run"
    trained = cifar_job(
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "300",  # 5 steps and 100 test images: bf16 runs at a few images a second on a CPU
        "--val-size",
        "50",
        "--batch-size",
        "50",
        "--max-epochs",
        "1",
        "--run-dir",
        str(run_dir),
        *FAST,
        *options,
    )
    assert trained.returncode == 0, trained.stderr
    results = json.loads((run_dir / "results.json").read_text())

    tested = cifar_job("test", "--ckpt", results["best_checkpoint"], "--json")
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads(tested.stdout)
    # The loss pins the weights: random ones score a loss far from the trained one's, even at
    # a similar accuracy.
    assert metrics["test/loss"] == pytest.approx(results["test/loss"], rel=1e-6)
    assert metrics["test/acc"] == pytest.approx(results["test/acc"], abs=1e-6)

    from PIL import Image

    from cifar_job.dataset import make_synthetic

    images, _ = make_synthetic(1, seed=42, split="test")
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    predicted = cifar_job("predict", "--ckpt", results["best_checkpoint"], str(tmp_path / "x.png"))
    assert predicted.returncode == 0, predicted.stderr
    for command in (trained, tested, predicted):
        printed = command.stdout + command.stderr
        assert not [word for word in NOISE if word in printed], printed
    assert predicted.stderr == ""
