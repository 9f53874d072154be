"""Data path: our batch pipeline against torchvision's CIFAR10 + transforms DataLoader.

Both produce the same thing, normalized training batches with random crop (4-pixel padding)
and horizontal flip, from the same 50,000 CIFAR-format images, on the CPU. The baseline is
the usual Lightning recipe: per-sample PIL transforms in 2 DataLoader workers. Ours: the
split as one uint8 tensor, batches sliced from it and augmented whole. Goal: at least 10x.
"""

from __future__ import annotations

import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from cifar_job.config import TrainConfig
from cifar_job.dataset import FOLDER, load_split, make_synthetic
from cifar_job.loader import MEAN, STD, CIFAR10DataModule, augment, normalize

BATCH = 256
# --smoke: every path once, on 2,560 images (a check of the script, not a figure).
SMOKE = "--smoke" in sys.argv


def write_cifar(root: Path, n: int = 50_000) -> None:
    """A CIFAR-10-format directory of generated images (CIFAR-10 itself is not to be had here)."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    images, labels = make_synthetic(n, seed=0)
    per = n // 5
    for i in range(5):
        part = slice(i * per, (i + 1) * per)
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(
                {"data": images[part].reshape(per, -1).numpy(), "labels": labels[part].tolist()},
                f,
            )
    test_x, test_y = make_synthetic(1000, seed=0, split="test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test_x.reshape(1000, -1).numpy(), "labels": test_y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["c"] * 10}, f)


class UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, minus its md5 checks against the official files."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        self.classes = [f"c{i}" for i in range(10)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def rate(batches) -> float:
    """Images per second over one pass, after one warm-up batch."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    for images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - t0)


def ours(root: Path, loader: str, workers: int, passes: int = 1) -> float:
    dm = CIFAR10DataModule(
        TrainConfig(
            data_dir=str(root),
            batch_size=BATCH,
            val_size=0,
            num_workers=workers,
            data_loader=loader,
        )
    )
    dm.setup("fit")
    g = torch.Generator().manual_seed(0)
    batches = (b for _ in range(passes) for b in dm.train_dataloader())
    return rate((normalize(augment(x, g)), y) for x, y in batches)


def loading(root: Path, reps: int = 5) -> tuple[float, float]:
    """Seconds to read the training images into memory: ours (load_split, one uint8
    tensor) and torchvision's CIFAR10 (one numpy array), alternating, best of `reps`."""
    ours_s, theirs_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        load_split(root, train=True)
        t1 = time.perf_counter()
        UncheckedCIFAR10(str(root), train=True)
        ours_s.append(t1 - t0)
        theirs_s.append(time.perf_counter() - t1)
    return min(ours_s), min(theirs_s)


def torchvision_baseline(root: Path) -> float:
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    data = UncheckedCIFAR10(str(root), train=True, transform=tf)
    return rate(
        DataLoader(
            data,
            batch_size=BATCH,
            shuffle=True,
            num_workers=2,
            persistent_workers=False,
            drop_last=True,
        )
    )


def main(rounds: int = 1 if SMOKE else 3) -> None:
    # A short pass is at the mercy of the machine's drift, so the three paths alternate for
    # a few rounds and the ratio is of the medians.
    base, tensor, loader = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = 2_560 if SMOKE else 50_000
        write_cifar(root, images)
        for _ in range(rounds):
            base.append(torchvision_baseline(root))
            tensor.append(ours(root, "tensor", 0, passes=1 if SMOKE else 3))
            loader.append(ours(root, "torch", 2))
        reps = 1 if SMOKE else 5
        load, theirs = loading(root, reps)
    b, t, d = (statistics.median(r) for r in (base, tensor, loader))
    print(
        f"data-path: torchvision CIFAR10+transforms, 2 workers {b:,.0f} img/s; ours "
        f"(tensor slices, batch augmentation) {t:,.0f} img/s, ratio {t / b:.1f}x "
        f"(goal >= 10x; medians of {rounds} alternating rounds, ratios "
        f"{min(x / y for x, y in zip(tensor, base, strict=True)):.1f}x-"
        f"{max(x / y for x, y in zip(tensor, base, strict=True)):.1f}x); "
        f"ours through a 2-worker DataLoader {d:,.0f} img/s, {d / b:.1f}x"
    )
    print(
        f"data-load: the {images:,} training images into memory: ours {load:.3f} s, torchvision "
        f"CIFAR10 {theirs:.3f} s, ratio {load / theirs:.2f} (goal <= 2: both are one pass over "
        f"the bytes; best of {reps}, alternating)"
    )


if __name__ == "__main__":
    main()
