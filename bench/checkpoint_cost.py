"""The cost of a periodic checkpoint (--checkpoint-every), side by side with a plain save.

Inside a real Trainer, after one training step (so the optimizer state exists), each round
saves the full training checkpoint two ways, alternating:
- ours: `trainer.save_checkpoint` through checkpoints.AtomicCheckpointIO, the path every
  periodic and on-signal save takes (temporary file, fsync, rename);
- plain: the same checkpoint dict written with torch.save, no fsync and no rename.
It prints seconds per save, the ratio, and what a save every 10 minutes (the default) costs
as a share of training time. The ranks' agreement on each step rides on the all-reduce that
already runs for stop signals, so a save adds nothing else.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bare_trainer  # noqa: E402

from cifar_job.checkpoints import AtomicCheckpointIO  # noqa: E402
from cifar_job.config import TrainConfig  # noqa: E402
from cifar_job.module import CifarClassifier  # noqa: E402
from cifar_job.train import build_datamodule  # noqa: E402

SMOKE = "--smoke" in sys.argv  # one save each way, ResNet18 only: a check of the script
ROUNDS = 1 if SMOKE else 5
DEFAULT_EVERY_S = TrainConfig().checkpoint_every * 60


class TimeSaves(L.Callback):
    """After the first step, time ROUNDS saves each way, alternating."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.ours, self.plain = folder, [], []
        self.size = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            trainer.save_checkpoint(self.folder / "ours.ckpt", weights_only=False)
            self.ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            torch.save(checkpoint, self.folder / "plain.ckpt")
            self.plain.append(time.perf_counter() - t0)
        self.size = (self.folder / "ours.ckpt").stat().st_size


def measure(arch: str) -> dict[str, float]:
    cfg = TrainConfig(arch=arch, dataset="synthetic", synthetic_size=200, val_size=50, batch_size=8)
    with tempfile.TemporaryDirectory() as folder:
        timer = TimeSaves(Path(folder))
        trainer = bare_trainer([timer], max_steps=1, plugins=[AtomicCheckpointIO()])
        trainer.fit(CifarClassifier(cfg.to_dict()), datamodule=build_datamodule(cfg))
        ours, plain = statistics.median(timer.ours), statistics.median(timer.plain)
        return {"mb": timer.size / 1e6, "ours_s": ours, "plain_s": plain}


def main() -> None:
    torch.set_num_threads(2)
    for arch in ("resnet18",) if SMOKE else ("resnet18", "resnet34"):
        m = measure(arch)
        print(
            f"checkpoint {arch} ({m['mb']:.0f} MB with optimizer state), median of {ROUNDS}: "
            f"ours (atomic, fsync) {m['ours_s']:.3f} s, plain torch.save {m['plain_s']:.3f} s, "
            f"ratio {m['ours_s'] / m['plain_s']:.2f}; every {DEFAULT_EVERY_S / 60:.0f} min it "
            f"costs {100 * m['ours_s'] / DEFAULT_EVERY_S:.3f}% of training time"
        )


if __name__ == "__main__":
    main()
