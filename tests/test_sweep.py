"""Sweeps: one `submit` makes a Slurm job array of a grid times seeds; every element resumes
on its own after a stop; a resubmission finishes only what is left; `compare` ranks them."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, assert_matches_golden, cifar_job
from slurmjobs import TRAIN, ckpt_step, manifest_starts, sbatch, wait_for_text

from cifar_job.cli import main

GOLDEN = Path(__file__).parent / "golden" / "submit_sweep_dry_run.txt"
# Four elements (two learning rates x two seeds), one CPU node each, three at a time; 600
# training images in batches of 40: 15 steps each (about 4 s on one CPU).
SWEEP = [
    *("submit", "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "1"),
    *("--time", "10", "--accelerator", "cpu", *TRAIN, "--max-epochs", "1"),
    *("--synthetic-size", "800", "--sweep", "lr=0.05,0.02", "--seeds", "2", "--max-parallel", "3"),
]
STEPS = 15


def array_done(job: str, timeout: float = 400) -> None:
    """Wait until no element of the array is pending or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.25)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job array {job} still running after {timeout} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_runs_as_one_array_and_each_element_resumes_alone(cluster, mlflow_server, tmp_path):
    """Also tracked: on the MLflow server the sweep is a parent run with a child per element,
    and `compare` ranks them from there as from disk."""
    sweep = tmp_path / "sweep"
    tracking = ["--tracker", "mlflow", "--tracking-uri", mlflow_server.uri, "--experiment", "sweep"]
    first = cifar_job(*SWEEP, *tracking, "--run-dir", str(sweep), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted job array" in first.stdout and "4 of 4 runs" in first.stdout
    parent = json.loads((sweep / "tracking.json").read_text())["run_id"]
    assert f"--mlflow-run {parent}" in first.stdout
    array = first.stdout.split("submitted job array ")[1].split(":")[0]
    again = cifar_job(*SWEEP, *tracking, "--run-dir", str(sweep), cwd=tmp_path)  # hasty
    assert "all 4 runs are queued or running; nothing submitted" in again.stdout, again.stdout
    plan = json.loads((sweep / "sweep.json").read_text())
    assert plan["submissions"] == [{"job": array, "elements": [0, 1, 2, 3]}]
    dirs = [Path(e["run_dir"]) for e in plan["elements"]]
    assert [e["settings"] for e in plan["elements"]] == [
        {"lr": 0.05, "seed": 0},
        {"lr": 0.05, "seed": 1},
        {"lr": 0.02, "seed": 0},
        {"lr": 0.02, "seed": 1},
    ]

    # An admin requeues element 1 mid-epoch (SIGTERM to its tasks, as a preemption).
    wait_for_text(f"submitit/{array}_1_0_log.out", sweep, " step 2/")
    subprocess.run(["scontrol", "requeue", f"{array}_1"], check=True)
    array_done(array)
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        assert results["global_step"] == STEPS and ckpt_step(d) == STEPS
    again = manifest_starts(dirs[1])
    assert len(again) == 2 and again[1]["step"] >= 2  # resumed where it saved, not from 0
    undisturbed = (dirs[0], dirs[2], dirs[3])
    assert [len(manifest_starts(d)) for d in undisturbed] == [1, 1, 1]

    status = cifar_job("status", str(sweep))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("finished") == 4 and "lr-0.05_seed-1" in status.stdout
    # The sweep's hours: each run's, from sacct (array elements are jobs of their own), and
    # the sum; the requeued element's second start waited in the queue.
    spent = cifar_job("hours", str(sweep), "--json", "--plot", str(tmp_path / "hours.png"))
    assert spent.returncode == 0, spent.stderr
    hours = json.loads(spent.stdout)
    assert [len(r["starts"]) for r in hours["runs"]] == [1, 2, 1, 1]
    assert all(r["slurm"] == "sacct" for r in hours["runs"])
    assert hours["runs"][1]["starts"][1]["node_seconds"]["queue"] > 0
    total = sum(r["node_seconds_total"] for r in hours["runs"])
    assert hours["node_seconds_total"] == pytest.approx(total, abs=0.01)
    assert 0 < hours["goodput"] < 1 and (tmp_path / "hours.png").stat().st_size > 1000
    compared = cifar_job("compare", str(sweep), "--json", "--plot")
    assert compared.returncode == 0, compared.stderr
    table = json.loads(compared.stdout)
    scores = [r["best_val_acc"] for r in table["runs"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert sorted(g["name"] for g in table["over_seeds"]) == ["lr-0.02", "lr-0.05"]
    assert all(g["seeds"] == 2 for g in table["over_seeds"])
    png = (sweep / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("sweep").experiment_id
    assert len(client.search_runs([experiment])) == 5  # the parent and its four runs
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.info.run_name for c in children) == sorted(d.name for d in dirs)
    for child in children:
        element = next(e for e in plan["elements"] if e["name"] == child.info.run_name)
        assert child.info.status == "FINISHED"
        assert float(child.data.params["lr"]) == element["settings"]["lr"]
        assert int(child.data.params["seed"]) == element["settings"]["seed"]
    assert client.get_run(parent).info.status == "FINISHED"
    served = cifar_job(
        "compare", "--tracking-uri", mlflow_server.uri, "--mlflow-run", parent, "--json"
    )
    assert served.returncode == 0, served.stderr
    from_server = json.loads(served.stdout)
    best = {r["name"]: r["best_val_acc"] for r in table["runs"]}
    assert {r["name"]: r["best_val_acc"] for r in from_server["runs"]} == pytest.approx(best)
    ranked = [r["best_val_acc"] for r in from_server["runs"]]
    assert ranked == sorted(ranked, reverse=True)
    for on_disk, served_group in zip(table["over_seeds"], from_server["over_seeds"]):
        assert served_group["name"] == on_disk["name"]
        assert served_group["mean"] == pytest.approx(on_disk["mean"])
        assert served_group["std"] == pytest.approx(on_disk["std"])

    # Resubmitting the finished sweep starts nothing; after losing one element's results,
    # only that element runs again.
    rerun = cifar_job(*SWEEP, *tracking, "--run-dir", str(sweep), cwd=tmp_path)
    assert rerun.returncode == 0 and "all 4 runs have finished" in rerun.stdout, rerun.stdout
    (dirs[2] / "results.json").unlink()
    rest = cifar_job(*SWEEP, *tracking, "--run-dir", str(sweep), "--wait", cwd=tmp_path)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "1 of 4 runs" in rest.stdout and "lr-0.02_seed-0: test/acc" in rest.stdout
    assert (dirs[2] / "results.json").exists()
    assert [len(manifest_starts(d)) for d in dirs] == [1, 2, 2, 1]


def test_sweep_dry_run_prints_the_array_script_and_the_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no Slurm here, as on a laptop
    args = [
        *("submit", "--dry-run", "--run-dir", "runs/sw", "--max-epochs", "30"),
        *("--sweep", "lr=0.1,0.05", "--sweep", "arch=resnet18,resnet34", "--max-parallel", "3"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert_matches_golden(result.output, tmp_path, GOLDEN)
    plan = json.loads((tmp_path / "runs/sw/sweep.json").read_text())
    assert len(plan["elements"]) == 4 and not list((tmp_path / "runs/sw").glob("*/"))


def test_a_sweep_file_gives_the_same_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text("lr: [0.1, 0.05]\narch: [resnet18, resnet34]\n")
    on_line = CliRunner().invoke(
        main,
        ["submit", "--dry-run", "--run-dir", "a", "--sweep", "lr=0.1,0.05"]
        + ["--sweep", "arch=resnet18,resnet34", "--seeds", "2"],
    )
    from_file = CliRunner().invoke(
        main,
        ["submit", "--dry-run", "--run-dir", "b", "--sweep-file", "sweep.yaml", "--seeds", "2"],
    )
    assert on_line.exit_code == from_file.exit_code == 0, on_line.output + from_file.output
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in "ab")
    assert [e["settings"] for e in a["elements"]] == [e["settings"] for e in b["elements"]]
    assert len(a["elements"]) == 8


def test_compare_takes_any_run_directories(tmp_path):
    for name, accs in (("a", [0.3, 0.5]), ("b", [0.4, 0.7, 0.6])):
        logs = tmp_path / name / "logs" / "version_0"
        logs.mkdir(parents=True)
        rows = "".join(f"{e},{e * 10},{acc}\n" for e, acc in enumerate(accs))
        (logs / "metrics.csv").write_text("epoch,step,val/acc\n" + rows)
        (tmp_path / name / "config.json").write_text("{}")  # every run has one
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:4] == ["1", "b", "0.7000", "2"]  # rank, run, best val/acc, epoch
    assert lines[2].split()[:4] == ["2", "a", "0.5000", "2"]


@pytest.mark.slurm
@pytest.mark.slow
def test_the_sweep_array_template_runs_the_planned_elements(cluster, tmp_path):
    """For sbatch users: the plan from a dry run, then `sbatch --array slurm/sweep_array.sh`."""
    sweep = tmp_path / "sweep"
    plan = cifar_job(
        *("submit", "--dry-run", "--run-dir", str(sweep), *TRAIN, "--max-epochs", "1"),
        *("--synthetic-size", "800", "--sweep", "lr=0.05,0.02"),
        cwd=tmp_path,
    )
    assert plan.returncode == 0, plan.stderr
    job = sbatch(
        *("--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1"),
        *("--cpus-per-task=1", str(REPO / "slurm/sweep_array.sh"), str(sweep)),
        cwd=tmp_path,
    )
    array_done(job)
    for name in ("lr-0.05", "lr-0.02"):
        results = json.loads((sweep / name / "results.json").read_text())
        assert results["global_step"] == STEPS
        assert json.loads((sweep / name / "config.json").read_text())["lr"] == float(name[3:])
