"""The ranks' stop agreement: its cost per step with the real Trainer and the project's
callbacks, on 2 CPU ranks over gloo, agreeing on every step (as before 0.2) and about once a
second (now), side by side in one run; with --one-rank, on 1 rank (no collective).

Each variant trains the same ResNet18 (ImageNet stem, batch 40 a rank) for the same steps in
2 DDP processes; the time spent in the agreement's hook (the all-reduce and what surrounds
it) is timed around each call, on rank 0, and so is the whole step. The rounds alternate
the two variants. Lightning launches rank 1 by running this script again, which then runs
the same rounds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from cifar_job import checkpoints
from cifar_job.config import TrainConfig
from cifar_job.module import CifarClassifier
from cifar_job.train import build_datamodule
from cifar_job.trainer import build_trainer

warnings.filterwarnings("ignore")
# --smoke: one round of 4 steps, a check of the script, not a figure.
ROUNDS, STEPS, BATCH = (1, 4, 16) if "--smoke" in sys.argv else (3, 40, 80)


class Timed(checkpoints.CheckpointPolicy):
    """The policy, with the time in its per-step hook and the steps' wall time counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_s, self.steps, self.t0 = 0.0, 0, 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        if not self.t0:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        self.hook_s += time.perf_counter() - t0
        self.steps += 1


def fit(every_s: float, ranks: int = 2) -> tuple[float, float] | None:
    """(agreement ms a step, step ms) on rank 0 for one fit; None on the other rank."""
    checkpoints.AGREE_EVERY_S = every_s
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            dataset="synthetic",
            synthetic_size=STEPS * BATCH + 100,
            val_size=100,
            arch="resnet18",
            stem="imagenet",
            batch_size=BATCH,
            max_epochs=1,
            num_workers=0,
            run_dir=tmp,
            accelerator="cpu",
            devices=str(ranks),
            strategy="ddp" if ranks > 1 else "auto",
            checkpoint_every=0,
        )
        policy = Timed(Path(tmp), 0, None)
        trainer = build_trainer(cfg, Path(tmp), callbacks=[policy], progress=False)
        trainer.fit(CifarClassifier(cfg.to_dict()), datamodule=build_datamodule(cfg))
        wall = time.perf_counter() - policy.t0
    if not trainer.is_global_zero:
        return None
    return policy.hook_s / policy.steps * 1000, wall / policy.steps * 1000


def main() -> None:
    checkpoints.install_signal_handlers()
    # One process per layout: Lightning's DDP launch leaves its variables in the process.
    if "--one-rank" in sys.argv:
        variants = {"1 rank": (1.0, 1)}
    else:
        variants = {"2 ranks, every step": (0.0, 2), "2 ranks, about 1 s": (1.0, 2)}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (every_s, ranks) in variants.items():
            got = fit(every_s, ranks)
            if got is not None:
                results[name].append(got)
    # Rank 1 ran the same fits and prints nothing. Not LOCAL_RANK: Lightning's launcher sets
    # it to "0" in the process that launched rank 1 too, and "0" is a true string.
    if rank_zero_only.rank != 0:
        return
    for name, runs in results.items():
        hook = statistics.median(r[0] for r in runs)
        step = statistics.median(r[1] for r in runs)
        print(
            f"agreement, {name} on CPU: {hook:.2f} ms a step in the hook, "
            f"{step:.0f} ms a step ({hook / step:.2%}); median of {len(runs)} rounds"
        )


if __name__ == "__main__":
    main()
