"""build_trainer(cfg): devices, nodes, strategy, precision, callbacks, loggers, cluster env.

This module, launch.py and doctor.py are the only ones that know about clusters.
"""

from __future__ import annotations

import json
import os
import re
import signal
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

from cifar_job import PREEMPTED_MARKER, CifarJobError, Preempted
from cifar_job.config import TrainConfig

# USR1: what the sbatch templates ask Slurm for (and Lightning's convention). USR2: submitit's.
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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


class CheckpointOnSignal(Callback):
    """Saves last.ckpt on all ranks together after a preemption signal, then stops training.

    The handler only sets a flag: saving from inside it would deadlock under DDP, since
    `Trainer.save_checkpoint` ends in a barrier that ranks without the signal never reach.
    After every optimizer step the ranks agree on the flag (one tiny all-reduce), so they all
    save the same step and stop together, raising Preempted (exit 75 from the CLI).
    Requeueing is the launcher's job, not this one's.

    The all-reduce runs on a CPU tensor in a gloo group of its own. On the training backend
    (Lightning's reduce_boolean_decision: NCCL on GPUs) it would make the host wait for each
    step's kernels to finish, and the GPU would then idle while the next step is launched.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}
        self.group: Any = None

    def any_rank_signalled(self) -> bool:
        if self.group is None:
            return self.signalled is not None
        flag = torch.tensor([int(self.signalled is not None)], dtype=torch.int32)
        torch.distributed.all_reduce(flag, group=self.group)  # host memory, never the GPU
        return bool(flag.item())

    def _flag(self, signum: int, frame: Any) -> None:
        self.signalled = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._flag)
            if trainer.world_size > 1 and torch.distributed.is_initialized():
                self.group = torch.distributed.new_group(backend="gloo")  # every rank calls it

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.group is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group(self.group)
        self.group = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.any_rank_signalled():
            return
        # No "made no progress" check here: the flag is read after a finished step, so every
        # save is ahead of the restart's start. The launchers' requeue budget ends loops.
        if trainer.is_global_zero:  # before the save, whose barrier holds the other ranks
            marker = {"step": trainer.global_step, "signal": self.signalled}
            (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n")
        trainer.save_checkpoint(self.run_dir / "last.ckpt")
        name = signal.Signals(self.signalled).name if self.signalled else "a signal on another rank"
        # An exception, not trainer.should_stop: stopping would still run the epoch-end
        # validation and checkpoints, and those would overwrite this mid-epoch last.ckpt.
        raise Preempted(
            f"{name}: saved {self.run_dir}/last.ckpt at step {trainer.global_step}; "
            "rerun (or requeue) the same command to resume"
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
        devices=devices,
        num_nodes=num_nodes,
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


def end_process_group() -> None:
    """Tear down the DDP process group, if any, before the process exits.

    Lightning leaves it up; gloo's threads then met interpreter shutdown and aborted the
    tasks ("terminate called without an active exception") after a finished run, which
    Slurm reports as a failed job (seen once in the sbatch test).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
