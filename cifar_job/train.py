"""run(cfg): one training run, in the order it happens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from cifar_job import CifarJobError, OptionError, Preempted, __version__, checkpoints, events
from cifar_job.config import (
    TrainConfig,
    max_time_seconds,
    read_json,
    resume_clashes,
    write_json,
)
from cifar_job.data import CIFAR10DataModule
from cifar_job.module import CifarClassifier
from cifar_job.trainer import (
    build_trainer,
    check_container,
    end_process_group,
    job_id,
    running_image,
)
from cifar_job.watchdog import Watchdog, node_name

RESULTS = "results.json"


def run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train (resuming from the run directory), test the best, write results.

    Returns the test results on global rank 0, None on the other ranks.
    """
    cfg.validate()
    check_container()  # a job meant for a container never trains on the host
    checkpoints.install_signal_handlers()  # from here on, a stop signal is never lost
    run_dir = prepare_run_dir(cfg)
    if (finished := finished_results(run_dir, cfg)) is not None:
        return finished
    # From here on, a rank that stops making progress ends the start (watchdog.py).
    watchdog = Watchdog(run_dir, cfg.hang_timeout, cfg.exclude_hung_node)
    watchdog.start()
    try:
        results = fit_and_test(cfg, run_dir, watchdog)
    except Preempted as e:
        record_end(run_dir, "stopped", str(e))
        raise
    except Exception as e:
        record_end(run_dir, "error", f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        watchdog.stop()
        end_process_group()
    record_end(run_dir, "finished")
    return results


def fit_and_test(cfg: TrainConfig, run_dir: Path, watchdog: Watchdog) -> dict[str, Any] | None:
    """Build, fit (resuming), test the best checkpoint and write the results."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = CifarClassifier(cfg.to_dict())
    # Each rank looks; rank 0's choice is the one every rank loads (CheckpointPolicy.setup).
    resume_from, resume_step = checkpoints.find_resume_checkpoint(run_dir)
    # On a stop signal fit saves and raises Preempted; it also saves every cfg.checkpoint_every.
    max_time_s = max_time_seconds(cfg.max_time) if cfg.max_time else None
    policy = checkpoints.CheckpointPolicy(run_dir, cfg.checkpoint_every, resume_from, max_time_s)
    # The watchdog first: a step's progress is noted before a stop's save begins.
    trainer = build_trainer(cfg, run_dir, callbacks=[watchdog, policy])
    if trainer.is_global_zero:
        # Before this start counts: a job that keeps failing without a new checkpoint stops.
        checkpoints.check_progress(run_dir, job_id(), resume_step, cfg.max_stalled_starts)
        record_start(run_dir, cfg, resume_from, resume_step)
        events.record(run_dir, "start", job=job_id(), step=resume_step, node=node_name())
        checkpoints.clear_leftovers(run_dir)
        nodes, devices = trainer.num_nodes, trainer.num_devices
        kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        layout = (
            f"{run_dir}: {nodes * devices} process(es) on {nodes} node(s) x {devices} {kind} "
            f"device(s), global batch {cfg.batch_size}"
        )
        if resume_from:
            layout += f"; resuming from {Path(resume_from).name} at step {resume_step}"
        print(layout, flush=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.interrupted:
        raise CifarJobError("training was interrupted; rerun the same command to resume")
    best = None if cfg.fast_dev_run else (trainer.checkpoint_callback.best_model_path or None)
    metrics = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    results = {
        **{k: float(v) for k, v in metrics.items()},
        "test/confusion": model.test_confusion.compute().tolist(),
        "max_epochs": cfg.max_epochs,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": best,
    }
    if not trainer.is_global_zero:
        return None  # rank 0 writes and reports
    if not cfg.fast_dev_run:
        write_json(run_dir / RESULTS, results)
        record_finish(run_dir, results)
    return results


def build_datamodule(cfg: TrainConfig) -> CIFAR10DataModule:
    """The DataModule for cfg's dataset, split and batch size."""
    return CIFAR10DataModule(cfg)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create (or reopen) the run directory, refusing one that holds a different run."""
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CifarJobError(f"--run-dir {run_dir} is a file; give a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CifarJobError(f"--run-dir {run_dir} cannot be written: {e.strerror}") from None
    saved = run_dir / "config.json"
    started = any(run_dir.glob("*.ckpt")) or (run_dir / RESULTS).exists()
    if saved.exists() and started:
        clashes = resume_clashes(read_json(saved, "the run's settings"), cfg)
        if clashes:
            raise OptionError(
                f"{run_dir} holds a run trained with other settings: {', '.join(clashes)}. "
                "They define what is trained, so its checkpoints cannot continue with new "
                "ones. Rerun with the old values to resume it, or give a new --run-dir to "
                "start a new run."
            )
    write_json(saved, cfg.to_dict())
    return run_dir


def finished_results(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The results of a run that already trained for cfg.max_epochs here, else None."""
    path = run_dir / RESULTS
    if cfg.fast_dev_run or not path.exists():
        return None
    results = read_json(path, "the final test results")
    if results.get("max_epochs") != cfg.max_epochs:
        return None  # asked for more (or fewer) epochs: train on from last.ckpt
    return {**results, "already_finished": True}


def record_end(run_dir: Path, reason: str, message: str | None = None) -> None:
    """Note in the event log how this start ended (rank 0), for the next start's budget."""
    if rank_zero_only.rank == 0:
        events.record(run_dir, "end", job=job_id(), reason=reason, message=message)


def _manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if path.exists():
        return read_json(path, "the run's history (version, starts, final metrics)")
    return {"version": __version__, "git_sha": git_sha(), "starts": []}


def record_start(
    run_dir: Path, cfg: TrainConfig, resume_from: str | None, step: int | None
) -> None:
    """Append this start (time, job id, host, Python, checkpoint and step resumed from, and the
    settings it ran with) to manifest.json. The image (its version and revision; None on the
    host) and the Python tell a start in the container from one on the host."""
    manifest = _manifest(run_dir)
    manifest["starts"].append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job_id": job_id(),
            "host": socket.gethostname(),
            "python": sys.executable,
            "image": running_image(),
            "resumed_from": resume_from,
            "step": step,
            "config": cfg.to_dict(),
        }
    )
    write_json(run_dir / "manifest.json", manifest)


def record_finish(run_dir: Path, results: dict[str, Any]) -> None:
    """Store the final metrics in manifest.json."""
    manifest = _manifest(run_dir)
    manifest["final"] = {k: v for k, v in results.items() if k != "test/confusion"}
    write_json(run_dir / "manifest.json", manifest)


def git_sha() -> str | None:
    """The commit of the installed source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
