"""The submitit launcher: `cifar-job submit` from a login node.

submitit writes the sbatch script, pickles a TrainJob and runs it in every task of the job.
Preemption goes through the same path as the sbatch templates: USR2 (submitit's signal) sets
the Trainer's flag, all ranks save at the next step and exit 75, and then the batch script
requeues the job from the host. The requeued job runs the same TrainJob, which resumes from
the run directory. submitit's own handler (rank 0 calls checkpoint(), then requeues) only acts when
the signal comes before training has started or after it ended: then nothing new is lost.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from cifar_job import PREEMPTED_MARKER, REQUEUE_EXIT, Preempted
from cifar_job.config import TrainConfig


@dataclass
class SlurmOptions:
    """What `cifar-job submit` asks Slurm for."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # default: one per GPU (one if no GPUs)
    cpus_per_task: int = 8
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    container_image: str | None = None
    max_requeues: int = 10
    job_name: str = "cifar-job"
    # 90 s before the limit: Slurm may signal up to 60 s early; saving takes seconds.
    signal_delay_s: int = 90
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


def time_minutes(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, at least 1."""
    try:
        days, dash, clock = text.strip().rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if len(parts) > 3 or min(parts) < 0 or (dash and not days):
            raise ValueError
        if days:  # D-H, D-H:M, D-H:M:S
            h, m, s = (parts + [0, 0])[:3]
            seconds = int(days) * 86400 + h * 3600 + m * 60 + s
        else:  # M, M:S, H:M:S
            h, m, s = (
                ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, *(parts + [0])[:2])
            )
            seconds = h * 3600 + m * 60 + s
    except ValueError:
        raise ValueError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS") from None
    return max((seconds + 59) // 60, 1)


class TrainJob(submitit.helpers.Checkpointable):
    """`cifar-job train` with one config, run by submitit in every task of a job."""

    def __init__(self, config: dict[str, Any], max_requeues: int) -> None:
        self.config, self.max_requeues = config, max_requeues

    def __call__(self) -> dict[str, Any] | None:
        from cifar_job.train import run

        try:
            return run(TrainConfig.from_dict(self.config))
        except Preempted as e:
            print(f"cifar-job: {e}", flush=True)
            # Every rank exits 75; the batch script requeues (requeue_lines). SystemExit, not
            # an exception: submitit then writes no result, so a client waiting on the job
            # keeps waiting for the requeued run.
            sys.exit(REQUEUE_EXIT)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue with the same job: it resumes from the run directory's last checkpoint."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.max_requeues))


def requeue_lines(max_requeues: int, run_dir: str) -> list[str]:
    """Shell lines for after submitit's srun: requeue the job if the ranks saved for it.

    The requeue runs in the batch script on the host, as in slurm/requeue.sh, so it works
    when the training runs in a container that has no scontrol. The marker file covers a
    rank killed by --kill-on-bad-exit while it was exiting 75 after the others.
    """
    marker = shlex.quote(f"{run_dir}/{PREEMPTED_MARKER}")
    return [
        "rc=$?",
        f'if [ "$rc" -eq {REQUEUE_EXIT} ] || [ -e {marker} ]; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {max_requeues} ]; then',
        f'    echo "cifar-job: requeued {max_requeues} times (--max-requeues); stopping" >&2',
        "    exit 1",
        "  fi",
        '  echo "cifar-job: requeueing job ${SLURM_JOB_ID}"',
        '  scontrol requeue "${SLURM_JOB_ID}"',
        "  exit 0",
        "fi",
        'exit "$rc"',
    ]


def build_executor(cfg: TrainConfig, slurm: SlurmOptions) -> submitit.SlurmExecutor:
    """A SlurmExecutor whose tasks, nodes and signal fit the Trainer by construction."""
    folder = Path(cfg.run_dir) / "submitit"
    python = "python3" if slurm.container_image else None  # the image's own Python
    executor = submitit.SlurmExecutor(
        folder=folder, python=python, max_num_timeout=slurm.max_requeues
    )
    srun_args = ["--kill-on-bad-exit=1"]  # one rank failing must not leave the others hanging
    if slurm.container_image:
        cwd = os.getcwd()
        srun_args += [
            f"--container-image={slurm.container_image}",
            f"--container-mounts={cwd}:{cwd}",
            f"--container-workdir={cwd}",
        ]
    params: dict[str, Any] = {
        "job_name": slurm.job_name,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.ntasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": time_minutes(slurm.time),
        "signal_delay_s": slurm.signal_delay_s,
        "srun_args": srun_args,
        "teardown": requeue_lines(slurm.max_requeues, cfg.run_dir),
        # --requeue: allow `scontrol requeue`; submitit already appends to its logs.
        "additional_parameters": {"requeue": True, **slurm.extra},
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    executor.update_parameters(**params)
    return executor


def absolute(cfg: TrainConfig) -> TrainConfig:
    """The config with its directories made absolute: the job may start elsewhere."""
    cfg.run_dir, cfg.data_dir = str(Path(cfg.run_dir).resolve()), str(Path(cfg.data_dir).resolve())
    return cfg


def sbatch_text(cfg: TrainConfig, slurm: SlurmOptions) -> str:
    """The sbatch script `submit` would send."""
    executor = build_executor(absolute(cfg), slurm)
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def submit(cfg: TrainConfig, slurm: SlurmOptions) -> submitit.Job:
    """Submit the training job and return its handle."""
    executor = build_executor(absolute(cfg), slurm)
    return executor.submit(TrainJob(cfg.to_dict(), slurm.max_requeues))
