"""GPU checks and timings in one call (a few minutes on one H100/H200-class GPU).

For ResNet34 with the CIFAR stem, bf16 autocast, channels-last and global batch 512, through
the real cifar-job Trainer on synthetic CIFAR-shaped data (50,000 images), it measures:
  - training images/s on the on-device tensor data path, without and with --compile;
  - the same on the DataLoader path (--data-loader torch, 8 workers);
  - the share of step time spent waiting for data, on both paths;
  - the achieved TFLOP/s against the card's peak (training costs ~3x the 2.32 GFLOP forward).

  python bench/gpu.py            # on a GPU machine; prints one JSON line per measurement
  python bench/gpu.py --smoke    # the same code on the CPU, tiny, to check the script itself
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from common import bare_trainer

from cifar_job.config import TrainConfig
from cifar_job.module import CifarClassifier
from cifar_job.train import build_datamodule

FORWARD_GFLOP = 2.32  # ResNet34, CIFAR stem, one 32x32 image
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor figures
warnings.filterwarnings("ignore")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Times the steps after a warm-up; with per-step syncs, also the gaps between steps,
    which are the time spent fetching, moving and augmenting the next batch."""

    def __init__(self, warmup: int, per_step_sync: bool) -> None:
        self.warmup, self.per_step_sync = warmup, per_step_sync
        self.t0, self.seconds, self.images, self.last_end = 0.0, 0.0, 0, 0.0
        self.waits: list[float] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            sync()
            self.t0 = time.perf_counter()
        elif trainer.global_step > self.warmup and self.per_step_sync:
            self.waits.append(now - self.last_end)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self.warmup:
            self.images += len(batch[0])
        if self.per_step_sync:
            sync()
        self.last_end = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        sync()
        self.seconds = time.perf_counter() - self.t0


def measure(loader: str, compile: bool, per_step_sync: bool, smoke: bool) -> StepTimer:
    steps, warmup = (3, 1) if smoke else (120, 30)
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic_size=200 if smoke else 50_000,
        val_size=0,
        arch="resnet18" if smoke else "resnet34",
        stem="imagenet" if smoke else "cifar",
        batch_size=8 if smoke else 512,
        precision="bf16-mixed",
        channels_last=True,
        compile=compile,
        data_loader=loader,
        num_workers=1 if smoke else 8,
        max_epochs=100,
    )
    timer = StepTimer(warmup, per_step_sync)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bare_trainer(
            [timer],
            accelerator="cpu" if smoke else "gpu",
            precision="bf16-mixed",
            max_steps=steps,
            default_root_dir=tmp,
        )
        trainer.fit(CifarClassifier(cfg.to_dict()), datamodule=build_datamodule(cfg))
    return timer


def main() -> None:
    smoke = "--smoke" in sys.argv
    if not smoke and not torch.cuda.is_available():
        print(
            "gpu: skipped, no CUDA device here (run bench/gpu.py on a GPU machine; --smoke "
            "checks the script on this CPU)"
        )
        return
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results: dict[str, Any] = {"device": name, "torch": torch.__version__}
    runs = (
        ("tensor", "tensor", False),
        ("tensor+compile", "tensor", True),
        ("dataloader", "torch", False),
    )
    for label, loader, compile in runs:
        if smoke and compile:
            continue  # compiling on a CPU takes minutes and checks nothing GPU-specific
        t0 = time.perf_counter()
        timer = measure(loader, compile, per_step_sync=False, smoke=smoke)
        rate = timer.images / timer.seconds
        tflops = rate * 3 * FORWARD_GFLOP / 1000
        results[label] = {
            "img_per_s": round(rate),
            "tflops": round(tflops, 1),
            "of_peak": round(tflops / peak, 3) if peak else None,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(label, json.dumps(results[label]), flush=True)
    for label, loader in (("tensor", "tensor"), ("dataloader", "torch")):
        timer = measure(loader, compile=False, per_step_sync=True, smoke=smoke)
        results[f"{label}_data_wait_share"] = round(sum(timer.waits) / timer.seconds, 3)
    results["fast_path_speedup"] = round(
        results["tensor"]["img_per_s"] / results["dataloader"]["img_per_s"], 2
    )
    if "tensor+compile" in results:
        results["compile_speedup"] = round(
            results["tensor+compile"]["img_per_s"] / results["tensor"]["img_per_s"], 2
        )
    print("gpu:", json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
