"""Sweeps: a grid of `train` settings times seeds, one run directory per element, run as one
Slurm job array (launch.py), and the comparison of any set of runs. No torch here: `status`
and `compare` read JSON and CSV.

A sweep lives in one directory: RUN_DIR/sweep.json is its plan (the grid, the seeds, the
shared settings and the elements), and RUN_DIR/<name>/ is each element's run directory,
a run like any other, which resumes on its own after a stop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from cifar_job import CifarJobError, OptionError, __version__
from cifar_job.config import FIXED, TrainConfig, dashed
from cifar_job.rundir import RunDir, read_json, write_json

# More elements than this is most likely a typo (a long list times another): ask first.
MAX_ELEMENTS = 1000
# Settings that say where a run lives, not what it is: never swept.
NOT_SWEPT = ("run_dir", "data_dir", "download", "fast_dev_run", "tracker", "tracking_uri")
NOT_SWEPT += ("experiment", "log_model")


def element_name(settings: dict[str, Any]) -> str:
    """A short, stable directory name for an element: lr-0.1_arch-resnet18_seed-0."""
    return "_".join(f"{dashed(k)}-{v}" for k, v in settings.items()).replace("/", "-")


def expand(
    base: TrainConfig, grid: dict[str, list[Any]], seeds: list[int], allow_many: bool = False
) -> list[dict[str, Any]]:
    """The elements of a sweep: every combination of the grid's values, times the seeds.

    Each is {"name", "run_dir", "settings", "config"}; every config is validated here, so a
    bad value is a usage error before anything is submitted.
    """
    for key, values in grid.items():
        if key in NOT_SWEPT:  # the CLI has refused keys that are not train options
            raise OptionError(
                f"--sweep {dashed(key)}: where a run lives or is recorded cannot be swept"
            )
        if not values:
            raise OptionError(f"--sweep {dashed(key)}: give at least one value")
    if seeds and "seed" in grid:
        raise OptionError("give the seeds with --seeds N or with --sweep seed=..., not both")
    axes = {**grid, **({"seed": seeds} if seeds else {})}
    count = math.prod(len(v) for v in axes.values())
    if count > MAX_ELEMENTS and not allow_many:
        raise OptionError(
            f"the sweep has {count} runs (more than {MAX_ELEMENTS}); add --yes if you mean it"
        )
    elements = []
    for combination in itertools.product(*axes.values()):
        settings = dict(zip(axes, combination))
        name = element_name(settings)
        cfg = dataclasses.replace(base, **settings, run_dir=str(Path(base.run_dir) / name))
        cfg.validate()
        elements.append(
            {"name": name, "run_dir": cfg.run_dir, "settings": settings, "config": cfg.to_dict()}
        )
    return elements


def make_plan(
    base: TrainConfig, grid: dict[str, list[Any]], seeds: list[int], allow_many: bool = False
) -> dict[str, Any]:
    """sweep.json's content: what the sweep is, and each element with its full config."""
    return {
        "version": __version__,
        "grid": grid,
        "seeds": seeds,
        "base": base.to_dict(),
        "elements": expand(base, grid, seeds, allow_many),
        # [{"job": Slurm job id, "elements": the element index of each array task}]
        "submissions": [],
    }


def write_plan(run_dir: Path, plan: dict[str, Any]) -> None:
    """Write RUN_DIR/sweep.json, refusing a directory that holds another sweep."""
    path = RunDir(run_dir).sweep_plan
    if path.exists():
        old = read_json(path, "the sweep's plan")
        if clash := plan_clashes(old, plan):
            raise OptionError(
                f"{run_dir} holds another sweep ({'; '.join(clash)}). Resubmit it with the "
                "same grid, seeds and settings to finish it, or give a new --run-dir."
            )
        if not plan["submissions"]:  # a new plan for the same sweep: keep what was submitted
            plan["submissions"] = old.get("submissions", [])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, plan)


def plan_clashes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes two plans different sweeps: the grid, the seeds, or a FIXED setting."""
    clashes = []
    if old.get("grid") != new["grid"]:
        clashes.append(f"grid {old.get('grid')} (now {new['grid']})")
    if old.get("seeds") != new["seeds"]:
        clashes.append(f"seeds {old.get('seeds')} (now {new['seeds']})")
    for f in dataclasses.fields(TrainConfig):
        before, now = old.get("base", {}).get(f.name), new["base"][f.name]
        if f.metadata["resume"] == FIXED and f.name not in new["grid"] and before != now:
            clashes.append(f"--{dashed(f.name)} {before} (now {now})")
    return clashes


def read_plan(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/sweep.json, or None when the directory is not a sweep."""
    path = RunDir(run_dir).sweep_plan
    return read_json(path, "the sweep's plan") if path.exists() else None


def is_finished(element: dict[str, Any]) -> bool:
    """Whether the element's run wrote its results for the epochs it was asked to train."""
    path = RunDir(element["run_dir"]).results
    if not path.exists():
        return False
    results = read_json(path, "the final test results")
    return results.get("max_epochs") == element["config"]["max_epochs"]


# ----------------------------------------------------------------------------- compare


def to_submit(plan: dict[str, Any], busy: set[int]) -> list[int]:
    """The elements to submit now: neither finished nor still queued or running (`busy`,
    from an earlier submission: launch.queued_elements asks Slurm)."""
    return [i for i, e in enumerate(plan["elements"]) if i not in busy and not is_finished(e)]


def summary(run_dir: Path) -> dict[str, Any]:
    """One run's row for `compare`: its best val/acc (and epoch), test/acc, curve, epochs."""
    from cifar_job.plot import read_epoch_metrics

    run_dir = Path(run_dir)
    try:
        curve = read_epoch_metrics(RunDir(run_dir)).get("val/acc", [])
    except CifarJobError:
        curve = []  # not started yet
    row: dict[str, Any] = {"run_dir": str(run_dir), "epochs": len(curve), "val_acc_curve": curve}
    if curve:
        epoch, best = max(curve, key=lambda p: (p[1], -p[0]))
        row |= {"best_val_acc": best, "best_epoch": epoch}
    results = RunDir(run_dir).results
    if results.exists():
        row["test_acc"] = read_json(results, "the final test results").get("test/acc")
    return row


def compare(run_dirs: list[Path]) -> dict[str, Any]:
    """Rows for every run (a sweep directory stands for its elements), best val/acc first,
    and, for runs that differ only in their seed, the mean and spread over seeds."""
    rows: list[dict[str, Any]] = []
    for given in run_dirs:
        given = RunDir.existing(given).path
        plan = read_plan(given)
        if plan is None:
            rows.append({**summary(given), "name": given.name, "settings": {}})
            continue
        for element in plan["elements"]:
            row = summary(Path(element["run_dir"]))
            rows.append({**row, "name": element["name"], "settings": element["settings"]})
    return rank(rows)


def compare_on_server(uri: str, run_ids: list[str]) -> dict[str, Any]:
    """compare() from an MLflow server (--tracker mlflow): a sweep's parent run stands for
    its children. Each row is what compare() reads from disk, from the run's metrics."""
    from cifar_job.mlflow_client import client_for, describe

    client = client_for(uri)
    rows: list[dict[str, Any]] = []
    try:
        for run_id in run_ids:
            run = client.get_run(run_id)
            children = client.search_runs(
                [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"
            )
            for member in children or [run]:
                rows.append(server_summary(client, member))
    except Exception as e:  # the client's errors: a refused connection, an unknown run
        raise CifarJobError(f"cannot read the runs from {uri}: {describe(e)}") from None
    return rank(rows)


def server_summary(client: Any, run: Any) -> dict[str, Any]:
    """summary() of a run on the server: val/acc by epoch (the epoch logged at its step)."""
    run_id = run.info.run_id
    epochs = {m.step: int(m.value) + 1 for m in client.get_metric_history(run_id, "epoch")}
    curve = sorted(
        (epochs[m.step], m.value)
        for m in client.get_metric_history(run_id, "val/acc")
        if m.step in epochs
    )
    row: dict[str, Any] = {
        "run_dir": run.data.tags.get("cifar_job.run_dir"),
        "run_id": run_id,
        "name": run.info.run_name,
        "settings": json.loads(run.data.tags.get("cifar_job.settings", "{}")),
        "epochs": len(curve),
        "val_acc_curve": curve,
    }
    if curve:
        epoch, best = max(curve, key=lambda p: (p[1], -p[0]))
        row |= {"best_val_acc": best, "best_epoch": epoch}
    if "test/acc" in run.data.metrics:
        row["test_acc"] = run.data.metrics["test/acc"]
    return row


def rank(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows best val/acc first, and the mean and spread over seeds of runs that differ
    only in their seed."""
    rows.sort(key=lambda r: -r.get("best_val_acc", -1.0))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        rest = {k: v for k, v in row["settings"].items() if k != "seed"}
        if "seed" in row["settings"]:
            groups.setdefault(element_name(rest) or "(one setting)", []).append(row)
    over_seeds = []
    for name, members in groups.items():
        scores = [r["best_val_acc"] for r in members if "best_val_acc" in r]
        if len(members) > 1 and scores:
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1))
            over_seeds.append({"name": name, "seeds": len(scores), "mean": mean, "std": std})
    over_seeds.sort(key=lambda g: -g["mean"])
    return {"runs": rows, "over_seeds": over_seeds}
