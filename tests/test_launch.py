"""The submitit launcher's sbatch text, time parsing, and checkpoints under a hard kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, REPO, assert_matches_golden, cifar_job

from cifar_job.cli import main
from cifar_job.launch import REQUEUE_SCRIPT, time_minutes

GOLDEN = Path(__file__).parent / "golden" / "submit_dry_run.sbatch"


def test_submit_dry_run_prints_the_pinned_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "submit",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--cpus-per-task",
        "6",
        "--mem",
        "64G",
        "--time",
        "2:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--qos",
        "high",
        "--constraint",
        "a100",
        "--sbatch",
        "exclusive=true",
        "--run-dir",
        "runs/golden",
        "--max-epochs",
        "90",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert_matches_golden(result.output, tmp_path, GOLDEN)
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_submit_dry_run_with_a_container_image_uses_pyxis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--container-image", "cifar-job:1"])
    assert result.exit_code == 0, result.output
    srun = next(line for line in result.output.splitlines() if line.startswith("srun "))
    assert "--container-image=cifar-job:1" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path} " in srun  # ./data and ./runs inside
    assert f"--container-workdir={tmp_path} " in srun
    assert " python3 -u -m submitit.core._submit" in srun  # the image's Python
    # The protocol is in the script: the nodes need no path of this host's install.
    assert "\nsource " not in result.output and "\ncifar_job_after_step() {" in result.output
    # The tasks refuse to train on the host if the container does not start.
    assert "\nexport CIFAR_JOB_CONTAINER=cifar-job:1\n" in result.output


def test_container_mounts_the_data_and_run_directories_wherever_they_are(tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "home")
    data, runs = tmp_path / "scratch" / "data", tmp_path / "project" / "runs"
    args = ["submit", "--dry-run", "--container-image", "img.sqsh"]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(data), "--run-dir", str(runs)])
    assert result.exit_code == 0, result.output
    mounts = result.output.split("--container-mounts=")[1].split()[0].split(",")
    home = tmp_path / "home"
    assert sorted(mounts) == sorted(f"{d}:{d}" for d in (home, data, runs))


@pytest.mark.parametrize(
    "text, minutes",
    [("30", 30), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0:0:10", 1)],
)
def test_time_limits_in_slurm_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["soon", "1:2:3:4", "-5"])
def test_bad_time_limit_is_a_usage_error(bad):
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--time", bad])
    assert result.exit_code == 2
    assert "--time" in result.output


def test_bad_extra_sbatch_parameter_is_a_usage_error():
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--sbatch", "exclusive"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "700",
        "--val-size",
        "100",
        "--batch-size",
        "50",
        "--max-epochs",
        "4",
        "--run-dir",
        str(run_dir),
        *FAST,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed_at = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and killed_at is None:
        # A second step checkpoint being written beside the first: kill -9 in the middle of it.
        if (run_dir / "last.ckpt").exists() and any(run_dir.glob(".step-*.ckpt.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, "the checkpoint write was never caught in progress"
    # The interrupted write left last.ckpt as it was: whole, at an earlier epoch's end.
    previous = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert previous["global_step"] % 12 == 0 and previous["global_step"] > 0
    # The best checkpoint of the same epoch may have been written just before the kill.
    newest = max(
        torch.load(p, map_location="cpu", weights_only=True)["global_step"]
        for p in run_dir.glob("*.ckpt")
    )

    result = cifar_job(*args)
    assert result.returncode == 0, result.stderr
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert starts[-1]["step"] == newest >= previous["global_step"]  # no work lost, none redone
    final = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 4 * 12


def test_batch_script_and_training_agree_on_the_requeue_status():
    """requeue.sh requeues on the status the ranks exit with after USR1/USR2 (and reads the
    marker they write): the shell and Python halves of one protocol must not drift apart."""
    from cifar_job import stops
    from cifar_job.rundir import FILES

    shell = REQUEUE_SCRIPT.read_text()
    assert f"CIFAR_JOB_REQUEUE_EXIT={stops.REQUEUE_EXIT} " in shell
    for name in (FILES["decision_env"], FILES["decision"], FILES["requeue_log"]):
        assert f'"${{RUN_DIR}}/{name}"' in shell, name  # the names rundir.py gives them
    assert (Path(__file__).parent.parent / "slurm" / "requeue.sh").resolve() == REQUEUE_SCRIPT


def test_container_templates_mount_the_data_and_run_directories_wherever_they_are(tmp_path):
    """The pyxis and Apptainer templates mount what requeue.sh's cifar_job_host_dirs lists: the
    submit directory, plus the data and run directories that lie outside it (created)."""
    submit, data = tmp_path / "submit", tmp_path / "scratch" / "data"
    submit.mkdir()
    env = {
        **os.environ,
        "SLURM_SUBMIT_DIR": str(submit),
        "DATA_DIR": str(data),
        "RUN_DIR": "runs/x",
    }
    script = f"source {REQUEUE_SCRIPT} && cifar_job_host_dirs"
    out = subprocess.run(
        ["bash", "-c", script], cwd=submit, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(submit), str(data)]
    assert data.is_dir() and (submit / "runs" / "x").is_dir()
    for template in ("ddp_4gpu_pyxis.sh", "ddp_4gpu_apptainer.sh"):
        assert "$(cifar_job_host_dirs" in (REPO / "slurm" / template).read_text()
    # A directory the job's user cannot make or enter fails the job, saying which, instead of
    # an empty entry in the mounts that the runtime then rejects.
    (tmp_path / "file").write_text("")
    bad = {**env, "DATA_DIR": str(tmp_path / "file" / "data")}
    failed = subprocess.run(
        ["bash", "-c", f"set -eo pipefail; m=$({script} | paste -sd, -); echo $m"],
        cwd=submit,
        env=bad,
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and failed.stdout == "", failed.stdout
    assert f"cifar-job: {tmp_path}/file/data: the job's user" in failed.stderr


@pytest.mark.parametrize(
    ("env", "mask", "threads", "workers"),
    [
        ({"SLURM_CPUS_PER_TASK": "3"}, None, 3, 2),  # --cpus-per-task: one CPU for training
        ({"SLURM_CPUS_PER_TASK": "32"}, None, 32, 8),  # more workers would only cost memory
        ({}, {0}, 1, 1),  # no count, but bound to one CPU (task/affinity, cgroups)
        ({}, None, None, None),  # neither: Lightning's share of the node
        ({"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "2"}, {0}, None, 2),  # the user's
    ],
)
def test_a_tasks_threads_and_loader_workers_follow_the_cpus_slurm_gave_it(
    env, mask, threads, workers
):
    """Under srun, training sizes its threads and DataLoader workers from --cpus-per-task,
    else from the affinity mask a binding site gives each task; the user's OMP_NUM_THREADS
    and --num-workers win."""
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", **env}
    code = (
        "import os\n"
        f"if {mask!r} is not None: os.sched_setaffinity(0, {mask!r})\n"
        "from cifar_job.slurm import loader_workers, size_threads\n"
        "print(size_threads(), loader_workers(2), loader_workers(2, 5))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **step}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    sized, shared, wanted = out.stdout.split()
    assert sized == str(threads) and wanted == "5"
    if workers is not None:
        assert shared == str(workers)
    else:  # the node's CPUs shared among its 2 ranks, less one each
        assert shared == str(max(len(os.sched_getaffinity(0)) // 2 - 1, 1))


def test_submit_with_spare_nodes_asks_for_them_and_trains_on_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["submit", "--dry-run", "--nodes", "2", "--spare-nodes", "1", "--min-nodes", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "#SBATCH --nodes=3" in lines and "#SBATCH --no-kill" in lines
    assert "export SPARE_NODES=1" in lines and "export MIN_NODES=1" in lines
    # submitit's srun line is requeue.sh's step: started again in the allocation after a fault.
    assert 'srun() { cifar_job_step "$@"; }' in lines

    wrong = CliRunner().invoke(main, ["submit", "--dry-run", "--nodes", "2", "--min-nodes", "3"])
    assert wrong.exit_code == 2 and "--min-nodes 3 is more than --nodes 2" in wrong.output
