"""The `cifar-job` command line. torch and Lightning are imported only inside commands, so
`--help` answers at once. Exit codes: 2 for a bad option or value (OptionError), 1 for a
problem with the environment, a file or the data (CifarJobError, a missing or unreadable
file), each with a one-line message that names the thing. Anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cifar_job import (
    CifarJobError,
    OptionError,
    Preempted,
    __version__,
    quiet_deprecations,
    warnings_as_lines,
)
from cifar_job.config import TrainConfig, dashed, load_config_file
from cifar_job.launch import SlurmOptions
from cifar_job.rundir import RunDir

ENV_DEFAULTS = {
    "data_dir": "CIFAR_JOB_DATA_DIR",
    "run_dir": "CIFAR_JOB_RUN_DIR",
    "tracking_uri": "MLFLOW_TRACKING_URI",
}
FIELD_TYPES: dict[str, Any] = {
    "int": int,
    "int | None": int,
    "float": float,
    "str": str,
    "str | None": str,
}


class Cli(click.Group):
    """A click group that turns library errors into clear messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Preempted as e:  # saved; the exit status tells the launcher what to do next
            click.echo(f"cifar-job: {e}", err=True)
            ctx.exit(e.exit_code)
        except OptionError as e:
            raise click.UsageError(str(e), ctx) from None
        except CifarJobError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.filename is None:  # not about one file: a bug, or the machine; keep it all
                raise
            raise click.ClickException(f"{e.filename}: {e.strerror}") from None
        except Exception as e:
            # Lightning's own checks of accelerator, devices, strategy and precision.
            if type(e).__name__ == "MisconfigurationException":
                raise click.UsageError(str(e), ctx) from None
            raise


def _read_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: its values become the defaults, so the command line still wins."""
    if value:
        try:
            values = load_config_file(value)
        except OptionError as e:
            raise click.BadParameter(str(e), ctx, param) from None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(values) - known):
            raise click.BadParameter(f"unknown keys: {', '.join(unknown)}", ctx, param)
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def config_option(name: str, **overrides: Any) -> Callable[..., Any]:
    """The click option of one TrainConfig field: its default, help and choices, unless
    `overrides` says otherwise (as for `test`, whose defaults come from the checkpoint)."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    help_text, choices = f.metadata["help"], f.metadata["choices"]
    if f.type == "bool":
        decl = f"--{dashed(name)}/--no-{dashed(name)}"
        settings = {"default": f.default, "show_default": True, "help": help_text}
        return click.option(decl, **{**settings, **overrides})
    kind = click.Choice(choices) if choices else FIELD_TYPES[str(f.type)]
    settings = {"type": kind, "default": f.default, "show_default": True, "help": help_text}
    settings.update(overrides)
    if name in ENV_DEFAULTS:
        # The environment (the image points these at its /data and /runs) is a default, not
        # click's envvar, which would beat a --config file: a config file names this run,
        # the environment is ambient.
        var, default = ENV_DEFAULTS[name], settings["default"]
        settings["default"] = lambda: os.environ.get(var) or default
        if default is None:
            settings["help"] += f" ${var} wins over that where set."
            settings["show_default"] = False
        else:
            settings["show_default"] = f"${var}, else {default}"
    return click.option(f"--{dashed(name)}", name, **settings)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per TrainConfig field, and --config FILE."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        command = config_option(f.name)(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_read_config,
        help="YAML or JSON file of option values; the command line wins.",
    )(command)


def slurm_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per SlurmOptions field (--time, --nodes, ...), with its default."""
    for f in reversed(dataclasses.fields(SlurmOptions)):
        if "help" not in f.metadata:
            continue
        kind: Any = str
        if str(f.type).startswith("int"):
            kind = click.IntRange(min=f.metadata["min"])
        command = click.option(
            f"--{dashed(f.name)}",
            f.name,
            type=kind,
            default=f.default,
            show_default=f.default is not None,
            help=f.metadata["help"],
        )(command)
    return command


@click.group(
    cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
@click.version_option(__version__, prog_name="cifar-job")
def main() -> None:
    """Train, evaluate and use ResNets on CIFAR-10, on a workstation or a Slurm cluster.

    \b
    First fetch the data (on a machine with internet), then train:
      cifar-job download --data-dir data
      cifar-job train --data-dir data --run-dir runs/r34
    Rerunning the same train command resumes from the run directory's last checkpoint.
    """
    quiet_deprecations()
    warnings_as_lines()


@main.command()
@config_options
@click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit.")
def train(print_config: bool, **values: Any) -> None:
    """Train a model, resuming from --run-dir if it holds a checkpoint, then test it.

    Writes checkpoints, logs/metrics.csv, config.json, manifest.json and, at the end,
    results.json (test/acc, test/acc_top5, test/loss) into the run directory.

    Each value comes from, first to last: the command line, the --config file, the
    environment ($CIFAR_JOB_RUN_DIR, $CIFAR_JOB_DATA_DIR, $MLFLOW_TRACKING_URI), the
    defaults shown here.
    """
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    if print_config:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from cifar_job.train import run

    results = run(cfg)
    if results is None:  # a rank other than 0 under DDP: rank 0 reports
        return
    if results.get("already_finished"):
        click.echo(f"Run {cfg.run_dir} already finished {cfg.max_epochs} epochs; nothing to do.")
    click.echo(
        f"test/acc {results['test/acc']:.4f}  test/acc_top5 {results['test/acc_top5']:.4f}  "
        f"test/loss {results['test/loss']:.4f}"
    )
    if not cfg.fast_dev_run:
        results_file = RunDir(cfg.run_dir).results
        click.echo(f"results: {results_file}  checkpoint: {results['best_checkpoint']}")


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint to evaluate.")
@config_option("data_dir", default=None, help="CIFAR-10 directory. [default: the run's own]")
@config_option("accelerator")
@config_option(
    "batch_size",
    type=click.IntRange(min=1),
    default=None,
    help="Batch size. [default: the run's own]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def test(
    ckpt: str, data_dir: str | None, accelerator: str, batch_size: int | None, as_json: bool
) -> None:
    """Evaluate a checkpoint on the test set of the dataset it was trained on, with its own
    precision and batch size: it reproduces the run's results.json."""
    from cifar_job.inference import evaluate

    metrics = evaluate(ckpt, data_dir, accelerator, batch_size)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo("  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


@main.command()
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint to classify with.")
@click.option("--top-k", default=3, type=click.IntRange(1, 10), help="Classes to show per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, per line.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
def predict(ckpt: str, top_k: int, as_json: bool, images: tuple[str, ...]) -> None:
    """Classify PNG or JPEG images (any size; resized to 32x32)."""
    import torch

    from cifar_job.inference import load_checkpoint, load_image, predict

    net, _ = load_checkpoint(ckpt)
    batch = torch.stack([load_image(p) for p in images])
    for path, top in zip(images, predict(net, batch, top_k)):
        if as_json:
            click.echo(json.dumps({"image": path, "top": top}))
        else:
            ranked = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top)
            click.echo(f"{path}: {ranked}")


@main.command()
@config_option("data_dir")
@click.option("--url", default=None, help="Mirror URL (http, https or file://) of the archive.")
@click.option("--md5", default=None, help="md5 of the archive at --url. [default: official]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(data_dir: str, url: str | None, md5: str | None, quiet: bool) -> None:
    """Fetch, verify (md5) and extract cifar-10-python.tar.gz, then check every batch.

    Run this where there is internet (a login node); compute nodes then train offline.
    """
    from cifar_job import dataset as data

    if md5 is not None and (
        len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5.lower())
    ):
        raise click.BadParameter("expected 32 hex digits", param_hint="--md5")
    if url and url != data.CIFAR_URL and md5 is None:
        raise click.UsageError("--url needs --md5: the official md5 fits only the official archive")
    summary = data.download(
        data_dir,
        url or data.CIFAR_URL,
        (md5 or data.CIFAR_MD5).lower(),
        progress=not quiet and sys.stderr.isatty(),
    )
    state = "already complete" if summary["already"] else "downloaded and verified"
    click.echo(
        f"{data_dir}: {state}: {summary['train']} training and {summary['test']} test "
        f"images, {summary['classes']} classes"
    )


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="PNG to write. [default: RUN_DIR/curves.png]",
)
def plot(run_dir: str, out: str | None) -> None:
    """Plot a run's learning curves and test confusion matrix to a PNG."""
    from cifar_job.plot import plot_run

    click.echo(f"wrote {plot_run(RunDir.existing(run_dir, sweep_ok=False), out)}")


def _sbatch_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    pairs: dict[str, Any] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{value!r}: expected KEY=VALUE, e.g. exclusive=true", ctx, param
            )
        # A bare flag such as --exclusive: submitit writes True as the flag alone.
        flag = val.lower() in ("true", "yes", "")
        pairs[key.lstrip("-").replace("-", "_")] = True if flag else val
    return pairs


@main.command(context_settings={"show_default": True})
@config_options
@slurm_options
@click.option(
    "--sbatch",
    "extra",
    multiple=True,
    callback=_sbatch_pairs,
    metavar="KEY=VALUE",
    help="Extra sbatch parameter, repeatable: --sbatch exclusive=true.",
)
@click.option(
    "--sweep",
    "sweep_pairs",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="Sweep a train option over these values, repeatable: the runs are every "
    "combination (times --seeds), one Slurm job array.",
)
@click.option(
    "--sweep-file",
    type=click.Path(dir_okay=False),
    help="YAML or JSON mapping of train options to lists of values: the same as --sweep.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=None,
    help="Run every setting with seeds 0..N-1 (list others with --sweep seed=...).",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Runs of a sweep that may run at once. [default: all]",
)
@click.option("--yes", is_flag=True, help="Submit a sweep of more than 1000 runs.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the sbatch script and submit nothing. A sweep also prints its runs and "
    "writes its plan RUN_DIR/sweep.json (which slurm/sweep_array.sh reads).",
)
@click.option(
    "--wait", is_flag=True, help="Follow the job (or the sweep) and exit with its result."
)
@click.pass_context
def submit(ctx: click.Context, **values: Any) -> None:
    """Submit `cifar-job train` to Slurm through submitit, from a login node.

    Train options pass through. Tasks, nodes and devices agree by construction. The job
    saves and requeues itself at its time limit, saves and lets
    Slurm decide on preemption, scancel or an admin's requeue, saves every
    --checkpoint-every minutes, and resumes in the same --run-dir. Follow it with
    `cifar-job status`.

    \b
    Sweeps: --sweep lr=0.1,0.05 --sweep arch=resnet18,resnet34 --seeds 3 submits one job
    array, each run in RUN_DIR/<its settings>/; resubmitting the same command runs only
    what has not finished. Compare them with `cifar-job compare RUN_DIR`.
    """
    slurm_keys = [f.name for f in dataclasses.fields(SlurmOptions) if "help" in f.metadata]
    slurm_values = {k: values.pop(k) for k in slurm_keys}
    dry_run, wait, extra = (values.pop(k) for k in ("dry_run", "wait", "extra"))
    sweep = {
        k: values.pop(k) for k in ("sweep_pairs", "sweep_file", "seeds", "max_parallel", "yes")
    }
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    slurm = SlurmOptions(**slurm_values, extra=extra)
    slurm.validate()  # a bad --time is a usage error before anything is written
    if sweep["sweep_pairs"] or sweep["sweep_file"] or sweep["seeds"]:
        return submit_grid(ctx, cfg, slurm, dry_run, wait, **sweep)
    if sweep["max_parallel"] or sweep["yes"]:
        raise click.UsageError("--max-parallel and --yes are for sweeps (--sweep, --seeds)")
    from cifar_job.launch import sbatch_text, submit

    if dry_run:
        click.echo(sbatch_text(cfg, slurm), nl=False)
        return
    job = submit(cfg, slurm)
    click.echo(
        f"submitted job {job.job_id}\n  run dir: {cfg.run_dir}\n"
        f"  logs:    {job.paths.stdout}\n           {job.paths.stderr}\n"
        f"  follow:  cifar-job status {cfg.run_dir}"
    )
    if wait:
        import logging

        # submitit warns on every poll of a cluster without accounting (no sacct); the job's
        # own log has what matters.
        logging.getLogger("submitit").setLevel(logging.ERROR)
        try:
            results = job.results()[0]  # one result per task; rank 0's holds the metrics
        except Exception as e:  # submitit's FailedJobError carries the job's traceback
            raise CifarJobError(f"job {job.job_id} failed; see {job.paths.stderr}\n{e}") from None
        click.echo(
            f"job {job.job_id} finished: test/acc {results['test/acc']:.4f}  "
            f"test/acc_top5 {results['test/acc_top5']:.4f}"
        )


def sweep_grid(
    ctx: click.Context, pairs: tuple[str, ...], path: str | None
) -> dict[str, list[Any]]:
    """--sweep KEY=V1,V2 and --sweep-file, each value checked as `train` checks it."""
    raw: dict[str, list[Any]] = {}
    if path:
        for key, values in load_config_file(path).items():
            raw[key] = values if isinstance(values, list) else [values]
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=V1,V2,...", param_hint="--sweep")
        key = key.strip().lstrip("-").replace("-", "_")
        if key in raw:
            raise click.BadParameter(f"{dashed(key)} is swept twice", param_hint="--sweep")
        raw[key] = [v for v in values.split(",") if v]
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    grid: dict[str, list[Any]] = {}
    for key, values in raw.items():
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise click.BadParameter(f"{key!r} is not a train option", param_hint="--sweep")
        grid[key] = [options[key].type.convert(v, options[key], ctx) for v in values]
    return grid


def submit_grid(
    ctx: click.Context,
    cfg: TrainConfig,
    slurm: SlurmOptions,
    dry_run: bool,
    wait: bool,
    sweep_pairs: tuple[str, ...],
    sweep_file: str | None,
    seeds: int | None,
    max_parallel: int | None,
    yes: bool,
) -> None:
    """`submit --sweep ...`: plan the grid, write RUN_DIR/sweep.json, submit what is left."""
    from cifar_job.launch import plan_sweep, sbatch_text, submit_planned
    from cifar_job.mlflow_client import sweep_parent

    grid = sweep_grid(ctx, sweep_pairs, sweep_file)
    plan, indices, busy = plan_sweep(cfg, grid, list(range(seeds or 0)), allow_many=yes)
    elements = plan["elements"]
    todo = [elements[i] for i in indices]
    if dry_run:
        click.echo(sbatch_text(cfg, slurm, todo or elements, max_parallel), nl=False)
        plan_file = RunDir(cfg.run_dir).sweep_plan
        click.echo(f"\n# {len(todo)} of {len(elements)} runs to submit ({plan_file}):")
        for index, e in enumerate(elements):
            state = "to run" if index in indices else "queued" if index in busy else "finished"
            click.echo(f"#   {index:>3}  {e['name']:<40} {state}")
        return
    if not todo:
        done = "are queued or running" if busy else "have finished"
        click.echo(f"all {len(elements)} runs {done}; nothing submitted")
        return
    parent = sweep_parent(cfg, plan)
    jobs = submit_planned(cfg, slurm, plan, indices, max_parallel)
    array = jobs[0].job_id.split("_")[0]
    kind = "job array" if len(jobs) > 1 else "job"
    click.echo(
        f"submitted {kind} {array}: {len(todo)} of {len(elements)} runs\n"
        f"  sweep:   {RunDir(cfg.run_dir).sweep_plan}\n"
        f"  follow:  cifar-job status {cfg.run_dir}\n"
        f"  compare: cifar-job compare {cfg.run_dir}"
    )
    if parent:
        click.echo(
            f"           cifar-job compare --tracking-uri {cfg.tracking_uri} --mlflow-run {parent}"
        )
    if wait:
        import logging

        logging.getLogger("submitit").setLevel(logging.ERROR)
        failed = []
        for job, e in zip(jobs, todo):
            try:
                result = job.results()[0]
                click.echo(f"{e['name']}: test/acc {result['test/acc']:.4f}")
            except Exception:  # submitit's FailedJobError: the element's log says why
                failed.append(f"{e['name']} (job {job.job_id}, {job.paths.stderr})")
        if failed:
            raise CifarJobError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(run_dir: str, as_json: bool) -> None:
    """Show where a run stands: state, step, restarts and the last metrics. For a sweep's
    directory, one line per run."""
    from cifar_job.status import run_status
    from cifar_job.sweep import read_plan

    run = RunDir.existing(run_dir)
    if (plan := read_plan(run.path)) is not None:
        return sweep_status(plan, as_json)
    info = run_status(run)
    if as_json:
        click.echo(json.dumps(info))
        return
    job = f" (job {info['job_id']})" if info.get("job_id") else ""
    click.echo(f"{info['run_dir']}: {info['state']}{job}")
    where = f" (in {info['checkpoint']})" if info.get("checkpoint") else ""
    relaunched = len(info.get("relaunches", []))
    click.echo(
        f"  step {info.get('step', 0)}, epoch {info.get('epoch', 0)}{where}, "
        f"{info['restarts']} restart(s) through the queue, {relaunched} in the allocation"
    )
    for r in info.get("relaunches", []):
        took = f", training again {r['seconds']} s after it" if r.get("seconds") else ""
        nodes = f" on {r['nodes']}" if r.get("nodes") else ""
        left = f" without {r['left_out']}" if r.get("left_out") else ""
        spare = f" (spare {r['spare']} in)" if r.get("spare") else ""
        said = f"{r['fault']} at step {r['step']}{took}{nodes}{left}{spare}"
        click.echo(f"  relaunch {r['relaunch']}: {said}")
    for key, value in sorted(info["metrics"].items()):
        click.echo(f"  {key} {value:.4f}")
    if info.get("tracking"):
        click.echo(f"  MLflow run {info['tracking']['run_id']} on {info['tracking']['uri']}")
    if info.get("checkpoint_problem"):
        click.echo(f"  warning: {info['checkpoint_problem']}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot",
    "plot_to",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also draw a stacked bar per start (per run, for a sweep) to this PNG.",
)
@click.option(
    "--no-sacct", is_flag=True, help="Leave Slurm's accounting out: the run's records alone."
)
def hours(run_dir: str, as_json: bool, plot_to: str | None, no_sacct: bool) -> None:
    """Where a run's node-hours went: kept and recomputed training, checkpoint saves and
    loads, start-up, evaluation, stops, queue waits between starts, hangs, and what no record
    explains; per start and in total, in node-seconds, with the goodput (kept training over
    the total). For a sweep's directory, per run. Queue waits, and each start's allocation,
    come from Slurm's accounting (sacct) where it answers."""
    from cifar_job import ledger
    from cifar_job.sweep import read_plan

    RunDir.existing(run_dir)  # a directory that is not a run is no ledger of zeros
    if (plan := read_plan(run_dir)) is not None:
        found = ledger.sweep_hours([Path(e["run_dir"]) for e in plan["elements"]], not no_sacct)
        lines = ledger.render_sweep(found)
        bars = [(Path(r["run_dir"]).name, r["node_seconds"]) for r in found["runs"]]
    else:
        found = ledger.hours(run_dir, not no_sacct)
        lines = ledger.render(found)
        bars = [(f"start {s['start']}", s["node_seconds"]) for s in found["starts"]]
    click.echo(json.dumps(found) if as_json else "\n".join(lines))
    if plot_to is not None:
        out = ledger.plot(bars, Path(plot_to), f"where the node-hours of {run_dir} went")
        click.echo(f"wrote {out}", err=as_json)


@main.command()
@config_option("devices", help="The --devices you will train with.")
@config_option("num_nodes", type=click.IntRange(min=1), help="The --num-nodes you will train with.")
@config_option("accelerator", help="The --accelerator you will train with.")
@config_option("num_workers", type=click.IntRange(min=0))
@config_option("data_dir", help="The CIFAR-10 directory to check.")
@config_option("dataset")
@config_option("tracking_uri", help="The MLflow server to check this node reaches.")
def doctor(**options: Any) -> None:
    """Print the cluster environment and run preflight checks; exit 1 if one fails.

    Run it the way training will run, e.g. `srun cifar-job doctor --devices 4` inside the
    allocation, to catch a task/device mismatch, a missing srun, a missing --signal, a small
    /dev/shm, tasks that start more threads than their CPUs, missing data or an MLflow
    server this node cannot reach before the real job starts.
    """
    from cifar_job.doctor import Check, checks, environment

    for key, value in environment().items():
        click.echo(f"{key:>20}: {value}")
    try:  # a value training would refuse is a failed check, on the cluster or off it
        TrainConfig(**options).validate()
        found = checks(**options)
    except OptionError as e:
        found = [Check("options", False, str(e))]
    for check in found:
        mark = "FAIL" if not check.ok else "WARN" if check.warn else "ok"
        click.echo(f"{mark:>6}  {check.name}: {check.detail}")
    if not all(check.ok for check in found):
        raise click.ClickException("some checks failed; see above for the fixes")


def sweep_status(plan: dict[str, Any], as_json: bool) -> None:
    """One line per run of a sweep: settings, state, epoch, val/acc, restarts."""
    from cifar_job.status import sweep_rows

    rows = sweep_rows(plan)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'run':<40} {'state':<12} {'epoch':>5} {'val/acc':>8} {'restarts':>8}")
    for row in rows:
        acc = row["metrics"].get("val/acc")
        click.echo(
            f"{row['name']:<40} {row['state']:<12} {row.get('epoch') or 0:>5} "
            f"{'-' if acc is None else f'{acc:.4f}':>8} {row['restarts']:>8}"
        )


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option(
    "--mlflow-run",
    "mlflow_runs",
    multiple=True,
    metavar="RUN_ID",
    help="Read this run from the MLflow server instead (a sweep's parent: all its runs). "
    "Repeatable; no RUN_DIRS needed.",
)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    show_envvar=True,
    help="The MLflow server of --mlflow-run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", is_flag=True, help="Also draw every run's val/acc curve in one PNG.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG for --plot. [default: FIRST_RUN_DIR/compare.png, else ./compare.png]",
)
def compare(
    run_dirs: tuple[str, ...],
    mlflow_runs: tuple[str, ...],
    tracking_uri: str | None,
    as_json: bool,
    plot: bool,
    out: str | None,
) -> None:
    """Rank runs by their best val/acc: a sweep's directory stands for all its runs, and runs
    that differ only in their seed also get the mean and spread over the seeds.

    \b
    From disk:              cifar-job compare runs/sweep runs/other
    From the MLflow server: cifar-job compare --tracking-uri URI --mlflow-run PARENT_ID
    (a sweep's parent run id is in RUN_DIR/tracking.json)."""
    from cifar_job.plot import plot_curves
    from cifar_job.sweep import compare as compare_runs
    from cifar_job.sweep import compare_on_server

    if bool(run_dirs) == bool(mlflow_runs):
        raise click.UsageError("give RUN_DIRS, or --mlflow-run RUN_ID (one or the other)")
    if mlflow_runs:
        if not tracking_uri:
            raise click.UsageError("--mlflow-run needs --tracking-uri (or $MLFLOW_TRACKING_URI)")
        table = compare_on_server(tracking_uri, list(mlflow_runs))
    else:
        table = compare_runs([Path(d) for d in run_dirs])
    if plot:
        default = RunDir(run_dirs[0]).compare if run_dirs else Path(RunDir(".").compare.name)
        table["plot"] = str(plot_curves(table, Path(out or default)))
    if as_json:
        click.echo(json.dumps(table))
        return
    click.echo(f"{'rank':<5} {'run':<40} {'val/acc':>8} {'epoch':>5} {'test/acc':>8} {'epochs':>6}")
    for rank, row in enumerate(table["runs"], 1):
        best = row.get("best_val_acc")
        test = row.get("test_acc")
        click.echo(
            f"{rank:<5} {row['name']:<40} {'-' if best is None else f'{best:.4f}':>8} "
            f"{row.get('best_epoch', '-'):>5} {'-' if test is None else f'{test:.4f}':>8} "
            f"{row['epochs']:>6}"
        )
    if table["over_seeds"]:
        click.echo("mean ± std of the best val/acc over seeds:")
        for group in table["over_seeds"]:
            click.echo(
                f"  {group['name']:<40} {group['mean']:.4f} ± {group['std']:.4f} "
                f"({group['seeds']} seeds)"
            )
    if plot:
        click.echo(f"wrote {table['plot']}")
