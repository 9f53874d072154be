"""Lightning overhead: our training loop against a plain PyTorch loop, same model, data,
batch size, optimizer and schedule, side by side on the CPU, step by step.

Timing the two loops in separate runs, even alternating, does not resolve a few percent on a
shared machine: its speed drifts by 10% or more over seconds (five such runs here gave
ratios from 0.92 to 1.10). So the two loops run interleaved in one process: within every
step of our Trainer, a callback runs one step of the plain loop (its own network, optimizer,
schedule and loader), before the Trainer's step on odd batches and after it on even ones.
Each pair of steps then sees the same machine.

- Ours: wall time from one training batch's start to the next one's, minus the plain step
  inside it. It holds everything the Trainer does per step and, on the steps that cross an
  epoch's end, per epoch (metric reduction, loader reset).
- Plain: wall time of one step, including fetching its batch and a new loader iterator at
  its epoch's end.

The ratio is of the totals over whole epochs after the first (a warm-up), that is of the
wall time per epoch; a 95% interval comes from the spread of the per-pair ratios. Our loop
also updates torchmetrics accuracy and logs loss and accuracy every step, which the plain
loop does not. Goal: 1.03x.

A second line gives the loop's own cost per step in milliseconds, measured the same way with
the network cut to one linear layer: the share it takes of a step is what to expect where
steps are short, as on a fast GPU.

`--delay-ms` adds a sleep to each of our steps: a check that the bench sees overhead where
there is some (at about 180 ms per step, 9 ms reads as 1.05 or a little more, since a sleep
also lets the worker threads go idle; measured here: 1.052 and 1.089).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
from common import bare_trainer

from cifar_job.config import TrainConfig
from cifar_job.loader import augment, normalize
from cifar_job.model import build_network
from cifar_job.module import CifarClassifier, build_optimizer, build_schedule
from cifar_job.train import build_datamodule

CFG = TrainConfig(
    dataset="synthetic",
    synthetic_size=3200,
    val_size=200,
    arch="resnet18",
    stem="imagenet",
    batch_size=100,
    num_workers=0,
)
warnings.filterwarnings("ignore")


def linear() -> torch.nn.Module:
    """A stand-in network that costs next to nothing, so that the loops' own cost shows."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))


def plain_loop(epochs: int, loop_only: bool) -> Callable[[], float]:
    """One step of a plain PyTorch training loop per call; returns its wall time."""
    dm = build_datamodule(CFG)
    dm.setup("fit")
    loader = dm.train_dataloader()
    net = (linear() if loop_only else build_network(CFG.arch, CFG.stem)).train()
    opt = build_optimizer(CFG, net.parameters())
    sched = build_schedule(CFG, opt, len(loader) * epochs, len(loader))
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    batches = iter(loader)

    def step() -> float:
        nonlocal batches
        t0 = time.perf_counter()
        with torch.enable_grad():
            try:
                images, labels = next(batches)
            except StopIteration:  # the plain loop's epoch boundary
                batches = iter(loader)
                images, labels = next(batches)
            loss = loss_fn(net(normalize(augment(images, g))), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return time.perf_counter() - t0

    return step


class Interleave(L.Callback):
    """One plain step inside each of the Trainer's steps; records both steps' wall times.

    The plain step runs after the Trainer's step on even batches and before it on odd ones,
    so that neither loop always runs on the caches the other one left.
    """

    def __init__(self, plain_step: Callable[[], float], delay: float = 0.0) -> None:
        self.plain_step = plain_step
        self.delay = delay
        self.ours: list[float] = []
        self.plain: list[float] = []
        self.mark: float | None = None
        self.inserted = 0.0

    def run_plain(self) -> None:
        t0 = time.perf_counter()
        self.plain.append(self.plain_step())
        self.inserted += time.perf_counter() - t0

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self.mark is not None:  # closes the previous step: start to start, less plain
            self.ours.append(now - self.mark - self.inserted)
        self.mark, self.inserted = now, 0.0
        if batch_idx % 2:
            self.run_plain()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if batch_idx % 2 == 0:
            self.run_plain()
        if self.delay:
            time.sleep(self.delay)


def measure(
    epochs: int, delay: float = 0.0, loop_only: bool = False
) -> tuple[list[float], list[float], int]:
    """Per-step wall times of ours and of the plain loop, paired, and the steps per epoch."""
    torch.manual_seed(0)
    probe = Interleave(plain_loop(epochs, loop_only), delay)
    trainer = bare_trainer([probe], accelerator="cpu", max_epochs=epochs)
    module = CifarClassifier(CFG.to_dict())
    if loop_only:
        module.net = linear()
    trainer.fit(module, datamodule=build_datamodule(CFG))
    steps_per_epoch = trainer.num_training_batches
    # The last step has no next start to close it; pair step i of ours with plain step i.
    n = len(probe.ours)
    return probe.ours, probe.plain[:n], steps_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs, the first one a warm-up")
    parser.add_argument(
        "--smoke", action="store_true", help="2 epochs of 4 steps: checks the script, in seconds"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="sleep added to each of our steps (a check)"
    )
    args = parser.parse_args()
    if args.smoke:
        CFG.synthetic_size, CFG.batch_size, args.epochs = 4 * 16 + CFG.val_size, 16, 2
    ours, plain, per_epoch = measure(args.epochs, args.delay_ms / 1000)
    ours, plain = ours[per_epoch:], plain[per_epoch:]  # drop the warm-up epoch
    ratio = sum(ours) / sum(plain)
    pairs = [o / p for o, p in zip(ours, plain, strict=True)]
    half = 1.96 * statistics.stdev(pairs) / math.sqrt(len(pairs))
    measured = len(ours) / per_epoch
    print(
        f"lightning-overhead: plain PyTorch {sum(plain) / measured:.2f} s/epoch, cifar-job "
        f"Trainer {sum(ours) / measured:.2f} s/epoch, ratio {ratio:.3f} "
        f"(95% interval of the mean pair ratio {statistics.fmean(pairs) - half:.3f}-"
        f"{statistics.fmean(pairs) + half:.3f}; goal <= 1.03; {len(pairs)} interleaved step "
        f"pairs over {measured:.1f} epochs of {per_epoch} steps, ResNet18 batch "
        f"{CFG.batch_size}, CPU, {torch.get_num_threads()} threads"
        + (f", {args.delay_ms:g} ms added to each of ours" if args.delay_ms else "")
        + ")"
    )
    # The same with the network cut to one linear layer: what the loop itself costs a step,
    # the figure that matters where a step is short (a fast GPU, a small model).
    ours_l, plain_l, per_epoch = measure(args.epochs, args.delay_ms / 1000, loop_only=True)
    ours_l, plain_l = ours_l[per_epoch:], plain_l[per_epoch:]
    extra = (sum(ours_l) - sum(plain_l)) / len(ours_l)
    print(
        f"lightning-overhead-per-step: {extra * 1e3:.2f} ms a step over the plain loop with the "
        f"network cut to one linear layer (ours {statistics.median(ours_l) * 1e3:.2f} ms, plain "
        f"{statistics.median(plain_l) * 1e3:.2f} ms, medians); that is "
        f"{extra / (sum(plain) / len(plain)):.1%} of a ResNet18 step here"
    )


if __name__ == "__main__":
    main()
