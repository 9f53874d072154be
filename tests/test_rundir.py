"""One writer per run directory: a second `cifar-job train` on a directory that a running
run holds is refused with the holder's name; a stale lease (its process gone, or not
refreshed for minutes) is taken over, and the takeover is said; a sweep whose squeue check
fails submits nothing rather than start running elements twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMOKE, cifar_job

from cifar_job import CifarJobError
from cifar_job.launch import queued_elements
from cifar_job.rundir import FILES, LEASE_TTL_S, Lease
from cifar_job.slurm import holder_name, job_id

# A run long enough to be caught holding its directory: 20 steps of a small ResNet.
LONG = [
    *("--dataset", "synthetic", "--synthetic-size", "900", "--val-size", "100"),
    *("--arch", "resnet18", "--stem", "imagenet", "--batch-size", "40", "--num-workers", "0"),
    *("--max-epochs", "1", "--log-every-n-steps", "1"),
]


@pytest.mark.slow
def test_two_trains_on_one_run_directory_one_trains_the_other_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "cifar_job", "train", *LONG, "--run-dir", str(run_dir)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    for line in first.stdout:
        if " step 1/" in line:
            break
    second = cifar_job("train", *LONG, "--run-dir", str(run_dir))
    assert second.returncode == 1, second.stderr
    assert f"is in use by process {first.pid} on " in second.stderr
    assert "a second writer would overwrite its checkpoints" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert (run_dir / "results.json").exists() and not (run_dir / FILES["lease"]).exists()


def test_a_lease_whose_process_is_gone_is_taken_over_and_said(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = Lease(tmp_path, holder_name(), job_id())
    lease.holder = f"process {dead.pid} on elsewhere"
    lease.write(since="earlier")
    stale = json.loads((tmp_path / FILES["lease"]).read_text())
    stale["pid"] = dead.pid  # on this host, and gone
    (tmp_path / FILES["lease"]).write_text(json.dumps(stale))
    run = cifar_job("train", *SMOKE, "--run-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert f"taking over from process {dead.pid} on elsewhere (its process {dead.pid} is gone)" in (
        run.stdout
    )


def test_a_live_holder_on_another_host_is_refused_until_its_lease_goes_stale(tmp_path):
    other = {
        "holder": "Slurm job 99",
        "job": "99",
        "host": "n7",
        "pid": 1,
        "since": "then",
        "refreshed": time.time(),
    }
    (tmp_path / FILES["lease"]).write_text(json.dumps(other))
    with pytest.raises(CifarJobError, match="in use by Slurm job 99 .host n7"):
        Lease(tmp_path, holder_name(), job_id()).acquire()
    other["refreshed"] = time.time() - LEASE_TTL_S - 1
    (tmp_path / FILES["lease"]).write_text(json.dumps(other))
    said = Lease(tmp_path, holder_name(), job_id()).acquire()
    assert said is not None and "taking over from Slurm job 99 (not refreshed for" in said


def test_the_same_slurm_job_takes_its_own_lease_back_after_a_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    first = Lease(tmp_path, holder_name(), job_id())
    assert first.acquire() is None  # held, then the job was requeued without releasing it
    assert Lease(tmp_path, holder_name(), job_id()).acquire() is None


def test_a_sweep_does_not_take_a_failed_squeue_for_no_job_running(tmp_path, monkeypatch):
    stub = tmp_path / "squeue"
    stub.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(CifarJobError, match="squeue failed, so which sweep elements still run"):
        queued_elements([{"job": "5", "elements": [0, 1]}])


def run_dir_names_outside_rundir() -> list[str]:
    """Every string in the package's modules but rundir.py that spells a run directory's
    file as a path: a string without spaces (prose and help texts have them) that is one of
    the names, or ends in one after a slash or a dot (f"{run_dir}/results.json")."""
    import ast

    from cifar_job import rundir

    names = {*rundir.FILES.values(), rundir.LATEST, rundir.LAST, "rank-", "version_"}
    names |= {"best-epoch", "step-", ".ckpt."}
    names -= {rundir.FILES["submitit"]}  # also the name of submitit's logger
    found = []
    for module in sorted(Path(rundir.__file__).parent.glob("*.py")):
        if module.name == "rundir.py":
            continue
        tree = ast.parse(module.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            text = node.value.strip()
            if id(node) in docstrings or not text or any(c.isspace() for c in text):
                continue
            for name in names:
                at = text.find(name)
                if at < 0:
                    continue
                end = at + len(name)
                before = at == 0 or text[at - 1] in "/.*"
                after = end == len(text) or text[end] in "/.{*)"
                if before and after:
                    found.append(f"{module.name}:{node.lineno}: {text!r}")
    return found


def test_no_module_but_rundir_spells_a_run_directory_file():
    assert run_dir_names_outside_rundir() == []


def test_every_atomic_write_is_fsynced_before_its_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    """A rename can reach the disk before the data it names: after a power loss the file
    would be empty. The data is fsynced, then renamed, then the directory is fsynced."""
    import stat

    import torch

    from cifar_job import checkpoints, rundir

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    writes = {
        "json": lambda: rundir.write_json(tmp_path / "config.json", {"lr": 0.1}),
        "decision": lambda: checkpoints.write_marker(tmp_path, "requeue", step=3),
        "lease": lambda: Lease(tmp_path, holder_name(), job_id()).acquire(),
        "checkpoint": lambda: checkpoints.write_checkpoint({"w": torch.ones(2)}, tmp_path / "c"),
    }
    for name, write in writes.items():
        calls.clear()
        write()
        assert calls[-3:] == ["file", "rename", "dir"], (name, calls)
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1}
    assert not list(tmp_path.glob(".*.tmp"))
    calls.clear()
    rundir.write_json(tmp_path / "beat.json", {}, durable=False)  # a heartbeat: no fsync
    assert calls == ["rename"]


@pytest.mark.parametrize("command", ["status", "hours", "plot", "compare"])
def test_commands_that_read_a_run_refuse_a_directory_that_is_not_one(command, tmp_path):
    from click.testing import CliRunner

    from cifar_job.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    result = CliRunner().invoke(main, [command, str(empty)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one line, no traceback, no ledger of zeros
    assert lines[0].startswith(f"Error: {empty} is not a run directory"), lines[0]
    assert "manifest.json" in lines[0] and "Give the --run-dir of a run that started" in lines[0]


def test_a_damaged_file_of_a_finished_run_is_named(tmp_path):
    from click.testing import CliRunner

    from cifar_job.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"starts": [{"job_id": None}]}))
    (run / "results.json").write_text('{"test/acc": 0.9')  # cut short
    status = CliRunner().invoke(main, ["status", str(run)])
    assert status.exit_code == 1 and f"{run / 'results.json'} is damaged" in status.output
    t = 1_800_000_000.0
    (run / "events.jsonl").write_text(
        json.dumps({"time": t, "event": "start", "nodes": 1, "process": t}) + "\n{garbage\n"
    )
    hours = CliRunner().invoke(main, ["hours", str(run), "--no-sacct"])
    assert hours.exit_code == 0, hours.output
    assert f"warning: {run / 'events.jsonl'}: line 2 is not a whole record" in hours.output


@pytest.mark.parametrize(
    "uri", ["htp://127.0.0.1:5000", "ftp://login1:5000", "sqlite:///mlflow.db", "login1:5000"]
)
def test_a_tracking_uri_that_cannot_be_a_server_is_refused_before_training(uri, tmp_path):
    from click.testing import CliRunner

    from cifar_job.cli import main

    run_dir = tmp_path / "run"
    args = ["train", "--tracker", "mlflow", "--tracking-uri", uri, "--run-dir", str(run_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"--tracking-uri {uri!r} cannot be an MLflow tracking server" in result.output
    assert not run_dir.exists()  # refused before anything was written
