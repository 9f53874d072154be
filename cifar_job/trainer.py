"""build_trainer(cfg): devices, nodes, strategy, precision, callbacks, loggers, cluster env.

This module, checkpoints.py, launch.py and doctor.py are the only ones that know about
clusters. How a run stops, saves and resumes is checkpoints.py's alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
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

from cifar_job import CifarJobError, OptionError, quiet_deprecations
from cifar_job.checkpoints import LAST, AtomicCheckpointIO
from cifar_job.config import TrainConfig, parse_devices


def quiet_lightning() -> None:
    """Keep Lightning to its warnings, and those that tell the user something.

    Its info lines (devices found, cloud-service tips, "Restoring states ...") and the
    hints below are noise in a job's log: run.py and LogLines print what happened.
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
        # The loader's position is in the DataModule's state (data.py), which Lightning
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


def slurm_layout(cfg: TrainConfig) -> tuple[int | str | list[int], int]:
    """(devices, num_nodes) for the Trainer: from the Slurm allocation inside an srun step.

    Lightning hangs at DDP init, or runs with the wrong world size, when they disagree with
    --ntasks-per-node and --nodes; so under srun they are read from Slurm, and a value the
    user set that contradicts the allocation is an error that says what to change.
    """
    devices = parse_devices(cfg.devices)
    if not in_srun_step():
        return devices, cfg.num_nodes
    tasks, nodes = tasks_per_node(), slurm_nodes()
    problems = layout_problems(cfg.devices, cfg.num_nodes, tasks, nodes)
    if problems["devices"]:
        raise CifarJobError(
            f"--devices {cfg.devices} disagrees with Slurm's {tasks} tasks per node: "
            + problems["devices"]
        )
    if problems["nodes"]:
        raise CifarJobError(
            f"--num-nodes {cfg.num_nodes} disagrees with Slurm's {nodes} nodes: "
            + problems["nodes"]
        )
    return (tasks if devices == "auto" else devices), nodes


def layout_problems(devices: str, num_nodes: int, tasks: int, nodes: int) -> dict[str, str | None]:
    """The fix for --devices and for --num-nodes against Slurm's tasks and nodes, or None.

    One place for the rule that training enforces and `cifar-job doctor` reports.
    """
    wanted = parse_devices(devices)
    count = len(wanted) if isinstance(wanted, list) else wanted
    return {
        "devices": None
        if count in ("auto", tasks)
        else f"give sbatch --ntasks-per-node={count}, or --devices {tasks} (auto: one per task)",
        "nodes": None
        if num_nodes in (1, nodes)
        else f"give sbatch --nodes={num_nodes}, or --num-nodes {nodes} (or leave it out)",
    }


def slurm_nodes() -> int:
    """How many nodes the Slurm job has."""
    return int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)


def in_srun_step() -> bool:
    """Whether this process is a task of an srun step (not the batch script itself)."""
    step = os.environ.get("SLURM_STEP_ID", "")
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and step.isdigit()


# The image (docker/Dockerfile) writes its version and revision here; nothing else does.
IMAGE_MARKER = Path("/etc/cifar-job/image.json")
# Set by the container templates and `submit --container-image` to the image the tasks were
# meant to run in.
CONTAINER_VAR = "CIFAR_JOB_CONTAINER"


def running_image() -> dict[str, Any] | None:
    """The cifar-job image this process runs in (its version and revision), or None."""
    try:
        return json.loads(IMAGE_MARKER.read_text())
    except (OSError, ValueError):
        return None


def check_container() -> None:
    """Refuse to train on the host when the job asked for a container.

    pyxis loaded as `optional` (and other runtimes' fallbacks) runs the task on the host when
    the container cannot start: the run would go on with the host's Python and packages, and
    nothing would say so.
    """
    wanted = os.environ.get(CONTAINER_VAR)
    if wanted and running_image() is None:
        raise CifarJobError(
            f"this task was to run in the container {wanted}, but it runs on the host "
            f"{socket.gethostname()} ({sys.executable}): the container did not start. "
            "See the container runtime's error above in the job log (pyxis: 'container was "
            "not started successfully'); nothing was trained."
        )


def tasks_per_node() -> int:
    """Slurm's tasks per node for this step (SLURM_STEP_TASKS_PER_NODE looks like "2(x2)")."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if match := re.match(r"\d+", os.environ.get(var, "")):
            return int(match.group())
    return 1


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    callbacks: list[Callback] | None = None,
    progress: bool | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints and logs into run_dir."""
    progress = sys.stderr.isatty() if progress is None else progress
    devices, num_nodes = slurm_layout(cfg)
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
            dirpath=run_dir,
            filename=LAST.removesuffix(".ckpt"),
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
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs")]
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
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
            logger=loggers,
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


def job_id() -> str | None:
    """The scheduler's job id (with the array task, if any), or None outside a job."""
    jid = os.environ.get("SLURM_JOB_ID")
    if jid and os.environ.get("SLURM_ARRAY_TASK_ID"):
        jid = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return jid


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
