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
import torch
from lightning.pytorch.utilities import rank_zero_only

from cifar_job import (
    CifarJobError,
    OptionError,
    Preempted,
    __version__,
    checkpoints,
    events,
    stops,
    tracking,
)
from cifar_job.config import TrainConfig, max_time_seconds, resume_clashes
from cifar_job.loader import CIFAR10DataModule
from cifar_job.mlflow_client import check_client
from cifar_job.module import CifarClassifier
from cifar_job.phases import Phases
from cifar_job.rundir import Lease, RunDir, read_json, write_json
from cifar_job.slurm import (
    allocation_started,
    check_container,
    holder_name,
    job_id,
    launch_rank,
    loader_workers,
    node_name,
    relaunch_count,
    running_image,
    size_threads,
    start_id,
    start_number,
    under_slurm,
)
from cifar_job.trainer import build_trainer, end_process_group
from cifar_job.watchdog import FAULT_VAR, Watchdog, Where


def run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train (resuming from the run directory), test the best, write results.

    Returns the test results on global rank 0, None on the other ranks.
    """
    cfg.validate()
    check_client(cfg)
    check_container()  # a job meant for a container never trains on the host
    size_threads()  # one thread per CPU Slurm gave the task, not per core of the node
    checkpoints.install_signal_handlers()  # from here on, a stop signal is never lost
    run_dir = RunDir.create(cfg.run_dir)
    # One job writes a run directory at a time: rank 0 holds the lease for all its ranks.
    lease = Lease(run_dir, holder_name(), job_id()) if rank_zero_only.rank == 0 else None
    if lease is not None and (took_over := lease.acquire()):
        print(took_over, flush=True)
    try:
        # Rank 0 chooses the checkpoint to resume from, and checks the settings against it;
        # the other ranks only see whether there is one, and load rank 0's choice.
        resume = checkpoints.find_resume_checkpoint(run_dir, verify=lease is not None)
        if lease is not None:
            check_settings(run_dir, cfg, resume[2])
        if (finished := finished_results(run_dir, cfg)) is not None:
            if lease is not None and (tracker := tracking.make_tracker(run_dir, cfg)):
                # What a finished run could not send at its end is sent now.
                tracker.begin(None)
                tracker.end("finished", artifacts=final_artifacts(run_dir, cfg, finished))
            return finished
        return train_and_record(cfg, run_dir, lease, resume[:2])
    finally:
        if lease is not None:
            lease.release()


def train_and_record(
    cfg: TrainConfig, run_dir: RunDir, lease: Lease | None, resume: tuple[str | None, int | None]
) -> dict[str, Any] | None:
    """fit_and_test under the watchdog, with how the start ended recorded."""
    # From here on, a rank that stops making progress ends the start (watchdog.py).
    where = Where(
        rank=launch_rank(),
        node=node_name(),
        start_key=start_id(),
        start_number=start_number(),
        under_slurm=under_slurm(),
        fault=os.environ.get(FAULT_VAR, ""),
    )
    watchdog = Watchdog(run_dir, cfg.hang_timeout, cfg.exclude_hung_node, where)
    if lease is not None:
        watchdog.on_beat = lease.refresh
    tracker = tracking.make_tracker(run_dir, cfg)
    if tracker is not None and lease is not None:
        watchdog.on_exit = tracker.abort  # a hang ends the process at once
    watchdog.start()
    try:
        results = fit_and_test(cfg, run_dir, watchdog, resume, tracker)
    except Preempted as e:  # fit saved, and wrote the marker
        # Every rank: that each one stopped as agreed is the job's own record, not srun's.
        events.record(run_dir, "exit", rank=rank_zero_only.rank, code=e.exit_code)
        record_end(run_dir, "stopped", e.cause, str(e), tracker=tracker)
        raise
    except Exception as e:
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        record_end(run_dir, "error", stops.cause_of_error(e), message, tracker=tracker)
        raise
    finally:
        watchdog.stop()
        end_process_group()
    artifacts = final_artifacts(run_dir, cfg, results) if results is not None else []
    record_end(run_dir, "finished", "finished", tracker=tracker, artifacts=artifacts)
    return results


def fit_and_test(
    cfg: TrainConfig,
    run_dir: RunDir,
    watchdog: Watchdog,
    resume: tuple[str | None, int | None],
    tracker: tracking.MlflowTracker | None = None,
) -> dict[str, Any] | None:
    """Build, fit (resuming), test the best checkpoint and write the results."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = CifarClassifier(cfg.to_dict())
    resume_from, resume_step = resume  # rank 0's is the one every rank loads
    # On a stop signal fit saves and raises Preempted; it also saves every cfg.checkpoint_every.
    max_time_s = max_time_seconds(cfg.max_time) if cfg.max_time else None
    policy = checkpoints.CheckpointPolicy(
        run_dir, cfg.checkpoint_every, resume_from, max_time_s, cfg.keep_checkpoints
    )
    # The watchdog first: a step's progress is noted before a stop's save begins.
    loggers = [tracker] if tracker is not None else []
    callbacks = [watchdog, Phases(run_dir), policy]
    trainer = build_trainer(cfg, run_dir, callbacks=callbacks, loggers=loggers)
    if trainer.is_global_zero:
        # Before this start counts: a job that keeps failing without a new checkpoint stops.
        checkpoints.check_progress(run_dir, job_id(), resume_step, cfg.max_stalled_starts)
        record_start(run_dir, cfg, resume_from, resume_step)
        events.record(
            run_dir,
            "start",
            job=job_id(),
            step=resume_step,
            node=node_name(),
            nodes=trainer.num_nodes,
            relaunch=relaunch_count(),  # a start inside the same allocation, after a fault
            process=round(events.process_started(), 3),
            allocated=allocation_started(),
            reached=events.read_reached(run_dir),  # the newest earlier start's last step
        )
        checkpoints.clear_leftovers(run_dir)
        nodes, devices = trainer.num_nodes, trainer.num_devices
        kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        layout = (
            f"{run_dir}: {nodes * devices} process(es) on {nodes} node(s) x {devices} {kind} "
            f"device(s), {torch.get_num_threads()} CPU thread(s) each"
        )
        if cfg.data_loader == "torch":
            layout += f" and {loader_workers(devices, cfg.num_workers)} loader worker(s)"
        layout += f", global batch {cfg.batch_size}"
        if resume_from:
            layout += f"; resuming from {Path(resume_from).name} at step {resume_step}"
        print(layout, flush=True)
        if tracker is not None:
            shape = f"{nodes} node(s) x {devices} {kind}"
            tracker.begin(start_summary(run_dir, resume_step, job_id(), shape))
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
        write_json(run_dir.results, results)
        record_finish(run_dir, results)
    return results


def build_datamodule(cfg: TrainConfig) -> CIFAR10DataModule:
    """The DataModule for cfg's dataset, split and batch size."""
    return CIFAR10DataModule(cfg, lambda ranks: loader_workers(ranks, cfg.num_workers))


def check_settings(run_dir: RunDir, cfg: TrainConfig, trained_with: dict[str, Any] | None) -> None:
    """Refuse settings that cannot continue the run the directory holds: those the resumed
    checkpoint was trained with (else config.json's, for a finished run); save cfg's."""
    saved = run_dir.config
    if trained_with is None and saved.exists() and run_dir.results.exists():
        trained_with = read_json(saved, "the run's settings")
    if trained_with is not None:
        clashes = resume_clashes(trained_with, cfg)
        if clashes:
            raise OptionError(
                f"{run_dir} holds a run trained with other settings: {', '.join(clashes)}. "
                "They define what is trained, so its checkpoints cannot continue with new "
                "ones. Rerun with the old values to resume it, or give a new --run-dir to "
                "start a new run."
            )
    write_json(saved, cfg.to_dict())


def finished_results(run_dir: RunDir, cfg: TrainConfig) -> dict[str, Any] | None:
    """The results of a run that already trained for cfg.max_epochs here, else None."""
    path = run_dir.results
    if cfg.fast_dev_run or not path.exists():
        return None
    results = read_json(path, "the final test results")
    if results.get("max_epochs") != cfg.max_epochs:
        return None  # asked for more (or fewer) epochs: train on from last.ckpt
    return {**results, "already_finished": True}


def record_end(
    run_dir: RunDir,
    reason: str,
    cause: str,
    message: str | None = None,
    tracker: tracking.MlflowTracker | None = None,
    artifacts: list[Path] | None = None,
) -> None:
    """Note how this start ended (rank 0), and why (`cause`, a row of stops.RULES): in the
    event log, for the next start's budget; in the decision that the batch script carries
    out (a stop's own is the save's, written as it saved); and on the tracking server."""
    if rank_zero_only.rank != 0:
        if cause == "error":  # its own failure, which the others see as a lost peer
            checkpoints.write_marker(run_dir, "fail", reason=reason, message=message)
        return
    events.record(run_dir, "end", job=job_id(), reason=reason, cause=cause, message=message)
    if reason != "stopped":
        action = stops.decide(cause).action
        checkpoints.write_marker(run_dir, action, reason=reason, message=message)
    if tracker is not None:
        # A stopped job's nodes are wanted back (its save is whole): what the server has
        # not taken in 5 s waits for the next start.
        tracker.end(reason, message, artifacts or [], wait_s=5.0 if reason == "stopped" else None)


def start_summary(
    run_dir: RunDir, step: int | None, job: str | None, layout: str
) -> dict[str, Any]:
    """This start as the tracking server tags it: its number and job, every job of the run,
    where it runs and from which step."""
    starts = _manifest(run_dir)["starts"]
    jobs = [str(s["job_id"]) for s in starts if s.get("job_id")]
    return {
        "number": len(starts),
        "job": job,
        "jobs": list(dict.fromkeys(jobs)),
        "host": socket.gethostname(),
        "layout": layout,
        "step": step,
        "image": (running_image() or {}).get("version"),
    }


def final_artifacts(run_dir: RunDir, cfg: TrainConfig, results: dict[str, Any]) -> list[Path]:
    """What a finished run uploads: results.json, curves.png (the learning curves and the
    confusion matrix) and, with --log-model, the best checkpoint."""
    if cfg.tracker == "none" or cfg.fast_dev_run:
        return []
    from cifar_job.plot import plot_run

    paths = [run_dir.results]
    try:
        paths.append(plot_run(run_dir))
    except Exception as e:  # a plot is never worth failing a finished run for
        print(f"tracking: no {run_dir.curves.name}: {e}", file=sys.stderr, flush=True)
    if cfg.log_model and results.get("best_checkpoint"):
        paths.append(Path(results["best_checkpoint"]))
    return paths


def _manifest(run_dir: RunDir) -> dict[str, Any]:
    path = run_dir.manifest
    if path.exists():
        return read_json(path, "the run's history (version, starts, final metrics)")
    return {"version": __version__, "git_sha": git_sha(), "starts": []}


def record_start(
    run_dir: RunDir, cfg: TrainConfig, resume_from: str | None, step: int | None
) -> None:
    """Append this start (time, job id, host, Python, checkpoint and step resumed from, and the
    settings it ran with) to manifest.json. The image (its version and revision; None on the
    host) and the Python tell a start in the container from one on the host."""
    manifest = _manifest(run_dir)
    manifest["starts"].append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job_id": job_id(),
            "relaunch": relaunch_count(),  # > 0: started again inside the job's allocation
            "host": socket.gethostname(),
            "python": sys.executable,
            "image": running_image(),
            "resumed_from": resume_from,
            "step": step,
            "config": cfg.to_dict(),
        }
    )
    write_json(run_dir.manifest, manifest)


def record_finish(run_dir: RunDir, results: dict[str, Any]) -> None:
    """Store the final metrics in manifest.json."""
    manifest = _manifest(run_dir)
    manifest["final"] = {k: v for k, v in results.items() if k != "test/confusion"}
    write_json(run_dir.manifest, manifest)


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
