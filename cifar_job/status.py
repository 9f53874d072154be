"""`cifar-job status`: where a run stands, from its run directory (and Slurm, for the state of
its job): state, step and epoch of the checkpoint the next start resumes from, restarts,
and the last metrics. Reads; writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_job.rundir import RunDir
from cifar_job.slurm import job_state


def run_status(run: RunDir) -> dict[str, Any]:
    """Where a run stands: state, step, epoch, restarts and the last metrics."""
    manifest = run.read(run.manifest, "the run's history (version, starts, final metrics)", {})
    starts = manifest.get("starts", [])
    run_dir = run.path
    recoveries = relaunches(run)
    status: dict[str, Any] = {
        "run_dir": str(run_dir),
        "starts": len(starts),
        # Through the queue (a requeue, a resubmission); and inside the allocation.
        "restarts": max(len(starts) - 1 - len(recoveries), 0),
        "relaunches": recoveries,
    }
    status |= checkpoint_position(run_dir)
    job_id = starts[-1].get("job_id") if starts else None
    if run.results.exists():
        status["state"] = "finished"
        final = run.read(run.results, "the final test results")
        status["metrics"] = {
            k: v for k, v in final.items() if k.startswith("test/") and k != "test/confusion"
        }
    else:
        status["state"] = job_state(job_id) if job_id else "stopped (not running under Slurm)"
        status["metrics"] = last_metrics(run.metrics_files())
    status["job_id"] = job_id
    if run.tracking.exists():  # --tracker mlflow: where the run is on the server
        status["tracking"] = run.read(run.tracking, "the MLflow run this run logs to")
    return status


def relaunches(run: RunDir) -> list[dict[str, Any]]:
    """Each start the batch script relaunched inside its allocation after a fault: the fault
    and its step, the nodes it went on with, those left out, the spare put in, and the
    seconds from the fault to the first step trained again (events.jsonl, and requeues.log's
    line for it: `job J DATE relaunch N nodes=... left_out=... spare=...`, requeue.sh)."""
    from cifar_job import events

    placed: dict[tuple[str, int], dict[str, str]] = {}  # (job, relaunch number) -> its line
    if run.requeue_log.exists():
        for line in run.requeue_log.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) > 4 and words[3] == "relaunch" and words[4].isdigit():
                pairs = (w.split("=", 1) for w in words[5:] if "=" in w)
                placed[(words[1], int(words[4]))] = {k: v for k, v in pairs if v != "none"}
    found: list[dict[str, Any]] = []
    fault: dict[str, Any] | None = None  # the first word of the fault that ended a start
    waiting: tuple[dict[str, Any], float] | None = None  # a relaunch's first step to come
    for event in events.read(run.path):
        kind = event["event"]
        if kind in ("fault", "peer-lost", "hang"):
            fault = fault or event
        elif kind == "start":
            waiting = None
            if event.get("relaunch"):
                where = placed.get((str(event.get("job")), event["relaunch"]), {})
                found.append(
                    {
                        "relaunch": event["relaunch"],
                        "fault": fault["event"] if fault else "a rank killed without a word",
                        "step": event.get("step"),
                        "nodes": where.get("nodes"),
                        "left_out": where.get("left_out"),
                        "spare": where.get("spare"),
                        "seconds": None,
                    }
                )
                waiting = (found[-1], fault["time"]) if fault else None
            fault = None
        elif kind == "first_step" and waiting is not None:
            item, since = waiting
            item["seconds"] = round(event["time"] - since, 1)
            waiting = None
    return found


def checkpoint_position(run_dir: Path) -> dict[str, Any]:
    """Step and epoch of the checkpoint the next start resumes from, and which one it is."""
    import warnings

    from cifar_job import CifarJobError
    from cifar_job.checkpoints import find_resume_checkpoint

    with warnings.catch_warnings(record=True) as skipped:  # damaged ones are reported below
        warnings.simplefilter("always")
        try:
            path, _, _ = find_resume_checkpoint(run_dir)
        except CifarJobError as e:
            return {"checkpoint_problem": str(e)}
    info: dict[str, Any] = {}
    if skipped:
        info["checkpoint_problem"] = "; ".join(str(w.message) for w in skipped)
    if path is not None:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        info |= {"step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
        info["checkpoint"] = Path(path).name
    return info


def last_metrics(paths: list[Path]) -> dict[str, float]:
    """The newest value of each validation and epoch-level training metric."""
    from cifar_job.plot import csv_rows

    latest: dict[str, float] = {}
    for path in paths:
        for row in csv_rows(path):
            for key, value in row.items():
                if value and (key.startswith("val/") or key.endswith("_epoch")):
                    latest[key] = float(value)
    return latest


def sweep_rows(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run of a sweep: its name and settings, and where it stands (run_status)."""
    rows = []
    for e in plan["elements"]:
        if (run := RunDir(e["run_dir"])).is_run():
            info = run_status(run)
        else:
            info = {"state": "not started", "restarts": 0, "metrics": {}}
        rows.append({"name": e["name"], "settings": e["settings"], **info})
    return rows
