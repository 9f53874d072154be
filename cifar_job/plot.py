"""cifar-job plot: learning curves and the test confusion matrix of a run, as one PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cifar_job import CifarJobError, OptionError
from cifar_job.config import CLASSES
from cifar_job.rundir import RunDir


def csv_rows(path: Path) -> list[dict[str, float | str]]:
    """The rows of a metrics CSV, numbers as floats; a damaged file is an error naming it."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        # A row cut short by a kill lacks its last fields: they read as None, and are left out.
        return [
            {k: (v if k == "epoch" else float(v)) for k, v in row.items() if k and v}
            for row in rows
        ]
    except (csv.Error, ValueError, UnicodeDecodeError, TypeError) as e:
        raise CifarJobError(
            f"{path} is damaged ({e}); it holds one start's logged metrics. Move it away "
            "to go on without it."
        ) from None


def read_epoch_metrics(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch (epoch, value) series by metric name; a later start overrides an epoch."""
    paths = run.metrics_files()
    if not paths:
        raise CifarJobError(f"{run.path} has no metrics logged yet: no start reached training")
    by_epoch: dict[str, dict[int, float]] = {}
    for path in paths:
        for row in csv_rows(path):
            for key in ("train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"):
                if key in row and row.get("epoch"):
                    by_epoch.setdefault(key, {})[int(str(row["epoch"])) + 1] = float(row[key])
    return {key: sorted(values.items()) for key, values in by_epoch.items()}


def pyplot():
    """matplotlib's pyplot, drawing to files: there is no display on cluster nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> Path:
    """Write the figure to `out` in the format its suffix names, and close it."""
    plt = pyplot()
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        plt.close(fig)
        raise OptionError(f"--out {out}: give a file ending in .png (or .{', .'.join(formats)})")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run: RunDir, out: str | Path | None = None) -> Path:
    """Write the run's curves.png (or `out`) and return its path."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    series = read_epoch_metrics(run)
    confusion = run.read(run.results, "the final test results", {}).get("test/confusion")
    panels = 3 if confusion else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    for ax, what in zip(axes, ("loss", "acc")):
        for stage in ("train", "val"):
            key = f"{stage}/{what}_epoch" if stage == "train" else f"{stage}/{what}"
            if points := series.get(key):
                ax.plot(*zip(*points), marker="o", label=stage)
        ax.set(xlabel="epoch", ylabel=what, title=f"{'accuracy' if what == 'acc' else what}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if what == "loss":
            ax.set_yscale("log")  # an early spike would flatten the rest of the curve
        ax.grid(alpha=0.3)
        ax.legend()
    if confusion:
        ax = axes[2]
        ax.imshow(confusion, cmap="Blues")
        ax.set(
            xticks=range(10),
            yticks=range(10),
            xlabel="predicted",
            ylabel="true",
            title="test confusion matrix",
        )
        ax.set_xticklabels(CLASSES, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(CLASSES, fontsize=8)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, int(count), ha="center", va="center", fontsize=6)
    fig.suptitle(str(run.path))
    fig.tight_layout()
    return save_figure(fig, Path(out) if out else run.curves)


def plot_curves(table: dict[str, Any], out: Path) -> Path:
    """`compare --plot`: val/acc per epoch of every run in `table`, in one figure."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = pyplot().subplots(figsize=(8, 5))
    for row in table["runs"]:
        if row["val_acc_curve"]:
            ax.plot(*zip(*row["val_acc_curve"]), marker="o", markersize=3, label=row["name"])
    ax.set(xlabel="epoch", ylabel="val/acc", title="validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(table["runs"]) <= 20:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)
