"""build_trainer(cfg): devices, nodes, strategy, precision, callbacks, loggers, cluster env.

This module and launch.py are the only ones that know about clusters.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from cifar_job.config import TrainConfig

# ModelCheckpoint writes into the run directory, which a resumed run has filled already.
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, fsyncs, then renames it into place.

    A job killed mid-write (preemption, OOM, time limit) leaves the previous checkpoint whole.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; others in the project may read it
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class LogLines(Callback):
    """Plain progress lines for logs that are not terminals (batch jobs, CI, containers)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.started = time.monotonic()
        self.images = 0

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


def parse_devices(devices: str) -> int | str | list[int]:
    """Lightning's devices value from its CLI spelling: 2, 0,1, -1 or auto."""
    text = str(devices).strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(d) for d in text.split(",") if d.strip()]
        return int(text)
    except ValueError:
        raise ValueError(
            f"--devices must be a count, a list such as 0,1, or auto; got {devices!r}"
        ) from None


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    callbacks: list[Callback] | None = None,
    progress: bool | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints and logs into run_dir."""
    progress = sys.stderr.isatty() if progress is None else progress
    all_callbacks: list[Callback] = [
        # The best epoch by validation accuracy. Not also save_last: since Lightning 2.6 that
        # refreshes last.ckpt only in epochs that improved on the best.
        ModelCheckpoint(
            dirpath=run_dir,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor="val/acc",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
        # last.ckpt after every epoch, overwritten in place, to resume from.
        ModelCheckpoint(
            dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False
        ),
        LearningRateMonitor(logging_interval="step"),
        *(callbacks or []),
    ]
    if not progress:
        all_callbacks.append(LogLines(cfg.log_every_n_steps))
    # Each start of the run logs to its own logs/version_N/: Lightning's CSVLogger deletes
    # an existing metrics.csv when it opens it again. `cifar-job plot` reads them in order.
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs")]
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Ranks come from Slurm; requeueing belongs to the launcher (sbatch script or
        # submitit), never to Lightning as well: two owners requeue twice or not at all.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=parse_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,  # type: ignore[arg-type]
        max_epochs=cfg.max_epochs,
        max_time=cfg.max_time,
        fast_dev_run=cfg.fast_dev_run,
        deterministic=cfg.deterministic,
        default_root_dir=run_dir,
        callbacks=all_callbacks,
        logger=loggers,
        plugins=plugins,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        # The DataModule shards every split itself (ShardSampler), so a resumed run can
        # continue mid-epoch with the exact batches it had left.
        use_distributed_sampler=False,
    )


def job_id() -> str | None:
    """The scheduler's job id (with the array task, if any), or None outside a job."""
    jid = os.environ.get("SLURM_JOB_ID")
    if jid and os.environ.get("SLURM_ARRAY_TASK_ID"):
        jid = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return jid


def build_eval_trainer(accelerator: str = "auto", progress: bool | None = None) -> L.Trainer:
    """A one-device Trainer for evaluation: no checkpoints, no logs."""
    progress = sys.stderr.isatty() if progress is None else progress
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
