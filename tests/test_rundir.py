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

import pytest
from conftest import SMOKE, cifar_job

from cifar_job import CifarJobError
from cifar_job.launch import queued_elements
from cifar_job.rundir import LEASE, LEASE_TTL_S, Lease

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
    assert (run_dir / "results.json").exists() and not (run_dir / LEASE).exists()


def test_a_lease_whose_process_is_gone_is_taken_over_and_said(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = Lease(tmp_path)
    lease.holder = f"process {dead.pid} on elsewhere"
    lease.write(since="earlier")
    stale = json.loads((tmp_path / LEASE).read_text())
    stale["pid"] = dead.pid  # on this host, and gone
    (tmp_path / LEASE).write_text(json.dumps(stale))
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
    (tmp_path / LEASE).write_text(json.dumps(other))
    with pytest.raises(CifarJobError, match="in use by Slurm job 99 .host n7"):
        Lease(tmp_path).acquire()
    other["refreshed"] = time.time() - LEASE_TTL_S - 1
    (tmp_path / LEASE).write_text(json.dumps(other))
    said = Lease(tmp_path).acquire()
    assert said is not None and "taking over from Slurm job 99 (not refreshed for" in said


def test_the_same_slurm_job_takes_its_own_lease_back_after_a_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    first = Lease(tmp_path)
    assert first.acquire() is None  # held, then the job was requeued without releasing it
    assert Lease(tmp_path).acquire() is None


def test_a_sweep_does_not_take_a_failed_squeue_for_no_job_running(tmp_path, monkeypatch):
    stub = tmp_path / "squeue"
    stub.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(CifarJobError, match="squeue failed, so which sweep elements still run"):
        queued_elements([{"job": "5", "elements": [0, 1]}])
