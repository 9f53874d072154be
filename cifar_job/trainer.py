"""build_trainer(cfg): devices, nodes, strategy, precision, callbacks, loggers, cluster env.

This module, slurm.py, checkpoints.py, watchdog.py, launch.py and doctor.py are the only ones
that know about clusters; what the job reads of Slurm's environment is slurm.py's. How a run
stops, saves and resumes is checkpoints.py's alone.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from cifar_job import OptionError, quiet_deprecations
from cifar_job.checkpoints import AtomicCheckpointIO
from cifar_job.config import TrainConfig
from cifar_job.rundir import BEST, RunDir
from cifar_job.slurm import slurm_layout


def quiet_lightning() -> None:
    """Keep Lightning to its warnings, and those that tell the user something.

    Its info lines (devices found, cloud-service tips, "Restoring states ...") and the
    hints below are noise in a job's log: train.py and LogLines print what happened.
    """
    quiet_deprecations()  # also for a job that submitit starts, which skips the CLI
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in (
        # ModelCheckpoint writes into the run directory, which a resumed run has filled.
        ".*exists and is not empty.*",
        # The tensor loader has no workers, by design.
        ".*does not have many workers.*",
        # Outside a job (a login node, a workstation with Slurm's tools): nothing to fix.
        ".*The `srun` command is available on your system but is not used.*",
        # LogLines prints every --log-every-n-steps steps, and at each epoch's end.
        ".*is smaller than the logging interval.*",
        # train/*_epoch are sums that on_train_epoch_end has reduced across ranks already.
        ".*when logging on epoch level in distributed setting.*",
        # The loader's position is in the DataModule's state (loader.py), which Lightning
        # restores: a mid-epoch resume continues with exactly the unseen samples.
        ".*your dataloader is not resumable.*",
    ):
        warnings.filterwarnings("ignore", message=message)


quiet_lightning()


class LogLines(Callback):
    """Plain progress lines for logs that are not terminals (batch jobs, CI, containers)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.started, self.images = time.monotonic(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # img/s counts training alone: not start-up, DDP set-up or the sanity check.
        self.started, self.images = time.monotonic(), 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.images += len(batch[0]) * trainer.world_size
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            m = trainer.callback_metrics
            rate = self.images / max(time.monotonic() - self.started, 1e-9)
            print(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                f"step {trainer.global_step}/{int(trainer.estimated_stepping_batches)} "
                f"loss {float(m.get('train/loss_step', float('nan'))):.4f} "
                f"acc {float(m.get('train/acc_step', float('nan'))):.4f} "
                f"{rate:.0f} img/s",
                flush=True,
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        if trainer.is_global_zero and not trainer.sanity_checking and "val/acc" in m:
            print(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                f"val/loss {float(m['val/loss']):.4f} val/acc {float(m['val/acc']):.4f}",
                flush=True,
            )


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    callbacks: list[Callback] | None = None,
    progress: bool | None = None,
    loggers: list[Logger] | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints and logs into run_dir (and to `loggers` as well)."""
    run_dir = Path(run_dir)
    progress = sys.stderr.isatty() if progress is None else progress
    devices, num_nodes = slurm_layout(cfg)
    all_callbacks: list[Callback] = [
        # The best epoch by validation accuracy. Not also save_last: since Lightning 2.6 that
        # refreshes last.ckpt only in epochs that improved on the best.
        ModelCheckpoint(
            dirpath=run_dir,
            filename=BEST,
            auto_insert_metric_name=False,
            monitor="val/acc",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="step"),
        *(callbacks or []),
    ]
    if not progress:
        all_callbacks.append(LogLines(cfg.log_every_n_steps))
    # Each start of the run logs to its own logs/version_N/: Lightning's CSVLogger deletes
    # an existing metrics.csv when it opens it again. `cifar-job plot` reads them in order.
    all_loggers: list[Logger] = [CSVLogger(run_dir, name=RunDir(run_dir).logs.name)]
    if cfg.tensorboard:
        all_loggers.append(TensorBoardLogger(run_dir, name=RunDir(run_dir).tensorboard.name))
    all_loggers += loggers or []
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Ranks come from Slurm; requeueing belongs to the launcher (sbatch script or
        # submitit), never to Lightning as well: two owners requeue twice or not at all.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        return L.Trainer(
            accelerator=cfg.accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=cfg.strategy,
            precision=cfg.precision,  # type: ignore[arg-type]
            max_epochs=cfg.max_epochs,
            fast_dev_run=cfg.fast_dev_run,
            deterministic=cfg.deterministic,
            default_root_dir=run_dir,
            callbacks=all_callbacks,
            logger=all_loggers,
            plugins=plugins,
            log_every_n_steps=cfg.log_every_n_steps,
            enable_progress_bar=progress,
            enable_model_summary=progress,
            # The DataModule shards every split itself (ShardSampler), so a resumed run can
            # continue mid-epoch with the exact batches it had left.
            use_distributed_sampler=False,
        )
    except ValueError as e:  # Lightning's checks of --strategy, --devices, --precision, ...
        raise OptionError(str(e)) from None


def build_eval_trainer(
    accelerator: str = "auto", precision: str = "32", progress: bool | None = None
) -> L.Trainer:
    """A one-device Trainer for evaluation: no checkpoints, no logs."""
    progress = sys.stderr.isatty() if progress is None else progress
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def end_process_group() -> None:
    """Tear down the DDP process group, if any, before the process exits.

    Lightning leaves it up; gloo's threads then met interpreter shutdown and aborted the
    tasks ("terminate called without an active exception") after a finished run, which
    Slurm reports as a failed job (seen once in the sbatch test).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
