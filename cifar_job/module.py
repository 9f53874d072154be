"""The LightningModule: one step function for train, val and test; optimizer and schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
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
            # "train" is taken by nn.Module.train(), hence the keys' underscore. micro: the
            # share of images classified right, as CIFAR-10 results are reported
            # (torchmetrics' default is the mean of the per-class accuracies).
            {
                f"{stage}_": MulticlassAccuracy(NUM_CLASSES, average="micro")
                for stage in ("train", "val", "test")
            }
        )
        self.test_top5 = MulticlassAccuracy(NUM_CLASSES, top_k=5, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalized N x 3 x 32 x 32 batch."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.compiled if self.compiled is not None else self.net)(x)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss and metrics of one batch, logged under `stage/`."""
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        training = stage == "train"
        accuracy = self.acc[f"{stage}_"]
        accuracy(logits, labels)
        # Per step and per epoch for training (train/loss_step, train/loss_epoch); per epoch,
        # averaged over all ranks, for val and test.
        self.log(
            f"{stage}/loss",
            loss,
            on_step=training,
            on_epoch=True,
            prog_bar=True,
            sync_dist=not training,
        )
        self.log(f"{stage}/acc", accuracy, on_step=training, on_epoch=True, prog_bar=True)
        if stage == "test":
            self.test_top5(logits, labels)
            self.test_confusion.update(logits, labels)
            self.log("test/acc_top5", self.test_top5, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the schedules' position from a checkpoint, not their shape.

        The shape (total steps, warm-up, step size) is rebuilt from the current config, so
        a finished run extended with a larger --max-epochs gets a schedule over the new
        length, instead of one that already decayed to zero.
        """
        position = {"last_epoch", "_step_count", "_last_lr", "base_lrs"}
        for state in checkpoint.get("lr_schedulers", []):
            if "lr_lambdas" in state or "total_steps" in state or "step_size" in state:
                for key in set(state) - position - {"lr_lambdas"}:
                    del state[key]
                if "lr_lambdas" in state:  # LambdaLR needs the key; None keeps the new shape
                    state["lr_lambdas"] = [None] * len(state["lr_lambdas"])

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
        schedule = build_schedule(cfg, optimizer, total, per_epoch)
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
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int, per_epoch: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over `total` optimizer steps."""
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
        warmup = min(round(cfg.warmup_epochs * per_epoch), total - 1)
        return sched.LambdaLR(optimizer, WarmupCosine(warmup, total))
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


class WarmupCosine:
    """Learning-rate factor: linear from 1/warmup to 1 over `warmup` steps, then cosine to 0."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
