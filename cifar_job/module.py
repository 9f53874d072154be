"""The LightningModule: one step function for train, val and test; optimizer and schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_job.config import TrainConfig
from cifar_job.model import build_network

NUM_CLASSES = 10


class CifarClassifier(L.LightningModule):
    """A ResNet trained with cross-entropy; logs `<stage>/loss` and `<stage>/acc`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        # The whole resolved config goes into every checkpoint (plain values only, so the
        # checkpoint loads with weights_only=True).
        self.save_hyperparameters(config)
        self.cfg = TrainConfig.from_dict(config)
        self.net = build_network(self.cfg.arch, self.cfg.stem, NUM_CLASSES, self.cfg.pretrained)
        if self.cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # Kept outside the module tree (object.__setattr__ skips nn.Module's registration): the
        # state dict keeps plain `net.` keys, so checkpoints load with or without --compile.
        object.__setattr__(self, "compiled", torch.compile(self.net) if self.cfg.compile else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        self.acc = nn.ModuleDict(
            # micro: the share of images classified right, as CIFAR-10 results are reported
            # (torchmetrics' default is the mean of the per-class accuracies).
            {stage: MulticlassAccuracy(NUM_CLASSES, average="micro") for stage in ("val", "test")}
        )
        # The mean loss over every image of the split, however it was sharded and padded.
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        # Training's epoch sums on the device: loss x images, images right, images; and the
        # steps summed. Out of the state dict, but in mid-epoch checkpoints (see
        # on_save_checkpoint), so a resumed epoch's figures still cover the whole epoch.
        self.register_buffer("train_sums", torch.zeros(3), persistent=False)
        self.epoch_steps = 0
        self.step_sums: tuple[torch.Tensor, torch.Tensor, int] | None = None  # this step's
        # The cosine schedule of a resumed checkpoint and its step (see on_load_checkpoint).
        self.resumed_cosine: tuple[WarmupCosine, int] | None = None
        self.test_top5 = MulticlassAccuracy(NUM_CLASSES, top_k=5, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalized N x 3 x 32 x 32 batch."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.compiled if self.compiled is not None else self.net)(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss of one batch. Logs train/loss_step and train/acc_step, and sums the epoch's.

        `self.log` costs about 1 ms of Python per call and metric, every step, whatever the
        model (Lightning walks the logged value's state each time), so batch jobs log step
        values only on the steps the logger and the log lines write (--log-every-n-steps);
        with a progress bar on a terminal, every step. Epoch values come from sums on the
        device, reduced across ranks once per epoch. No step waits for the device.

        What else runs on a step (the callbacks' hooks, their cost and why): docs/step.md.
        """
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        with torch.no_grad():  # device ops with Python scalars: no host-device copy, no wait
            right = (logits.argmax(dim=1) == labels).sum()
            n = labels.numel()
            self.step_sums = (loss.detach().float() * n, right, n)
        trainer = self.trainer
        if (
            trainer.progress_bar_callback is not None
            or trainer.fast_dev_run
            or (trainer.global_step + 1) % trainer.log_every_n_steps == 0
        ):
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/acc_step", right / n, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The step's figures join the epoch's as the step is applied, not as it is computed:
        a step that never completes (a rank stuck in its all-reduce) adds nothing to a save
        of the steps before it (watchdog.py)."""
        if self.step_sums is not None:
            loss_sum, right, n = self.step_sums
            self.train_sums[0] += loss_sum
            self.train_sums[1] += right
            self.train_sums[2] += n
            self.epoch_steps += 1
            self.step_sums = None

    def on_train_epoch_end(self) -> None:
        """train/loss_epoch and train/acc_epoch over every image of the epoch, all ranks."""
        sums = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum")
        self.train_sums.zero_()
        self.epoch_steps = 0
        if sums[2] > 0:
            self.log("train/loss_epoch", sums[0] / sums[2], prog_bar=True)
            self.log("train/acc_epoch", sums[1] / sums[2], prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A mid-epoch checkpoint keeps the epoch's sums so far (rank 0's; the file is written
        by rank 0 alone). On resume every rank starts from them: their ratios, the epoch's
        figures, are then exact on one device, and under DDP take rank 0's share of the
        batches before the restart for everyone's, with the right weight."""
        if 0 < self.epoch_steps < self.trainer.num_training_batches:
            checkpoint["train_sums"] = {"sums": self.train_sums.tolist(), "steps": self.epoch_steps}

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        """Loss and metrics of one val or test batch, logged per epoch over all ranks.

        Labels below 0 are padding (ShardSampler): every rank runs the same number of
        batches, and the padding counts in no figure. The metrics sum over the whole split
        when they are computed at the epoch's end: no collective runs per batch.
        """
        images, labels = batch
        logits = self(images)
        real = labels >= 0
        padded = not bool(real.all())
        if padded:
            logits, labels = logits[real], labels[real]
        if not padded or len(labels):  # a batch of padding alone updates nothing
            losses = nn.functional.cross_entropy(
                logits, labels, reduction="none", label_smoothing=self.cfg.label_smoothing
            )
            self.eval_loss[stage].update(losses)
            self.acc[stage].update(logits, labels)
            if stage == "test":
                self.test_top5.update(logits, labels)
                self.test_confusion.update(logits, labels)
        # Logged on every rank and batch all the same: each rank must take part in the sync.
        self.log(f"{stage}/loss", self.eval_loss[stage], on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", self.acc[stage], on_epoch=True, prog_bar=True)
        if stage == "test":
            self.log("test/acc_top5", self.test_top5, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the schedule's position from a checkpoint; take its length from the config.

        Called before configure_optimizers. A run rerun with another --max-epochs carries the
        cosine on from where it is (WarmupCosine.resized): the learning rate never jumps
        back up. The step sizes of step and cyclic are per epoch, so they do not change.
        """
        if "train_sums" in checkpoint:
            self.train_sums.copy_(torch.tensor(checkpoint["train_sums"]["sums"]))
            self.epoch_steps = checkpoint["train_sums"]["steps"]
        position = {"last_epoch", "_step_count", "_last_lr", "base_lrs"}
        for state in checkpoint.get("lr_schedulers", []):
            if "lr_lambdas" in state:
                old = state["lr_lambdas"][0]
                if isinstance(old, dict) and "total" in old:  # a WarmupCosine's attributes
                    self.resumed_cosine = (WarmupCosine(**old), int(state["last_epoch"]))
                # LambdaLR needs the key; None keeps the function configure_optimizers built.
                state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
            if "lr_lambdas" in state or "total_steps" in state or "step_size" in state:
                for key in set(state) - position - {"lr_lambdas"}:
                    del state[key]

    def configure_optimizers(self) -> Any:
        """The optimizer, and a schedule stepped per optimizer step (plateau: per epoch)."""
        cfg = self.cfg
        # Fused CUDA kernels: one launch per step for all parameters instead of one per tensor.
        fused = next(self.parameters()).is_cuda
        optimizer = build_optimizer(cfg, self.parameters(), fused=fused)
        if cfg.scheduler == "none":
            return optimizer
        # Counted by Lightning from the real loader length, devices, accumulation and limits.
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = max(total / max(self.trainer.max_epochs or 1, 1), 1.0)
        if cfg.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.gamma, patience=2
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/acc", "interval": "epoch"},
            }
        schedule = build_schedule(cfg, optimizer, total, per_epoch, self.resumed_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def build_optimizer(cfg: TrainConfig, params: Any, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer, with its learning rate and weight decay."""
    extra = {"fused": True} if fused and cfg.optimizer in ("sgd", "adam", "adamw") else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            **extra,
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    optimizers = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adagrad": torch.optim.Adagrad,
    }
    if cfg.optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    return optimizers[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def build_schedule(
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    total: int,
    per_epoch: float,
    resumed: tuple[WarmupCosine, int] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over `total` optimizer steps; `resumed` is the
    cosine of the checkpoint being resumed and its step, carried on over `total`."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return sched.StepLR(
            optimizer, step_size=max(round(cfg.step_epochs * per_epoch), 1), gamma=cfg.gamma
        )
    if cfg.scheduler == "exponential":  # gamma per epoch, spread over its steps
        return sched.ExponentialLR(optimizer, gamma=cfg.gamma ** (1 / per_epoch))
    if cfg.scheduler == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.scheduler == "cyclic":
        return sched.CyclicLR(
            optimizer,
            base_lr=cfg.lr / 10,
            max_lr=cfg.lr,
            step_size_up=max(round(cfg.step_epochs * per_epoch), 1),
            cycle_momentum=cfg.optimizer in ("sgd", "rmsprop"),
        )
    if cfg.scheduler == "cosine":
        if resumed is not None:
            cosine, step = resumed
            return sched.LambdaLR(optimizer, cosine.resized(total, step))
        warmup = min(round(cfg.warmup_epochs * per_epoch), total - 1)
        return sched.LambdaLR(optimizer, WarmupCosine(warmup, total))
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


class WarmupCosine:
    """Learning-rate factor: linear from 1/warmup to 1 over `warmup` steps, then cosine to 0
    at `total`.

    A run extended (or shortened) after `start` steps keeps the factor it had there and
    stretches the rest of the cosine over the new length: from `start`, the cosine's progress
    goes linearly from `start_progress` to 1 at `total`. The factor never jumps back up.
    """

    def __init__(self, warmup: int, total: int, start: int = 0, start_progress: float = 0.0):
        self.warmup, self.total = warmup, total
        self.start, self.start_progress = max(start, warmup), start_progress

    def progress(self, step: int) -> float:
        """How far along the cosine the schedule is at `step`, 0 to 1."""
        left = max(self.total - self.start, 1)
        share = min(max(step - self.start, 0) / left, 1.0)
        return self.start_progress + (1 - self.start_progress) * share

    def resized(self, total: int, step: int) -> WarmupCosine:
        """This schedule, carried on at `step` over a new total length."""
        if total == self.total or step <= self.warmup:
            return WarmupCosine(self.warmup, total, self.start, self.start_progress)
        return WarmupCosine(self.warmup, total, step, self.progress(step))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))
