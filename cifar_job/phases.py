"""Each start's phases, recorded as they happen for `cifar-job hours` (events.py says what): rank 0
appends a line to events.jsonl when the data is ready, training begins, the first step ends,
an evaluation ends (with its duration) and fit ends, and writes every completed step to
reached.bin. Saves and loads are recorded where they happen (checkpoints.py), stop signals
by the watchdog's thread, which sees them at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from cifar_job import events
from cifar_job.events import StepCounter
from cifar_job.rundir import RunDir


class Phases(Callback):
    """Rank 0's record of where a start's time goes. Per step: one store to memory."""

    def __init__(self, run_dir: RunDir | Path) -> None:
        self.run_dir = Path(run_dir)
        self.on = False
        self.counter: StepCounter | None = None
        self.first_step = True
        self.eval_began: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.on = trainer.is_global_zero
        if self.on and stage == "fit":
            events.record(self.run_dir, "data")  # the DataModule's setup has just run

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on:
            self.counter = StepCounter(self.run_dir)
            events.record(self.run_dir, "train", step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.counter is not None:
            self.counter.write(trainer.global_step)
            if self.first_step:
                self.first_step = False
                events.record(self.run_dir, "first_step", step=trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.eval_began = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluated("val")

    on_test_start = on_validation_start

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluated("test")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on:
            events.record(self.run_dir, "fit_end", step=trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.counter is not None and stage == "fit":
            self.counter.close()
            self.counter = None

    def _evaluated(self, stage: str) -> None:
        if self.on and self.eval_began is not None:
            took = time.monotonic() - self.eval_began
            events.record(self.run_dir, "eval", stage=stage, s=round(took, 4))
        self.eval_began = None
