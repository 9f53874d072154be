"""The container image, built for real on a local Docker engine from a wheelhouse with no
network, then run as its non-root user. Opt-in (`make test-docker`): it moves GBs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow]
TAG = "cifar-job:test"


def sh(*cmd: str, timeout: float = 1800, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def image() -> dict[str, float]:
    """Build the image twice (cold, then cached) and return the figures."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the test Docker engine needs root and apt-get")
    started = sh(str(REPO / "tests/docker/start.sh"))
    if started.returncode:
        pytest.skip(f"no Docker engine: {started.stderr.strip()[-300:]}")
    base = started.stdout.strip().splitlines()[-1]
    # The base image is Debian bookworm: Python 3.11, so the wheelhouse is for 3.11.
    wheels = sh("make", "wheels", "WHEELS_PYTHON=3.11", cwd=REPO)
    assert wheels.returncode == 0, wheels.stderr[-2000:]
    sh("docker", "rmi", "-f", TAG)
    sh("docker", "builder", "prune", "-f")
    build = [
        "docker",
        "build",
        "--network",
        "none",
        "-f",
        "docker/Dockerfile",
        "-t",
        TAG,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        "WHEELS=1",
        "--build-arg",
        "VERSION=test",
        "--build-arg",
        "REVISION=abc123",
        ".",
    ]
    t0 = time.monotonic()
    cold = sh(*build, cwd=REPO)
    cold_s = time.monotonic() - t0
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr[-3000:]
    t0 = time.monotonic()
    cached = sh(*build, cwd=REPO)
    cached_s = time.monotonic() - t0
    assert cached.returncode == 0 and "Using cache" in cached.stdout
    size = int(sh("docker", "image", "inspect", TAG, "--format", "{{.Size}}").stdout)
    figures = {
        "cold_build_s": round(cold_s),
        "cached_build_s": round(cached_s, 1),
        "image_gb": round(size / 1e9, 2),
    }
    print(f"\ndocker image figures: {json.dumps(figures)}")
    return figures


def test_image_runs_help_as_its_non_root_user(image):
    help_run = sh("docker", "run", "--rm", TAG, "--help")
    assert help_run.returncode == 0, help_run.stderr
    assert "Usage: cifar-job" in help_run.stdout and "train" in help_run.stdout
    uid = sh("docker", "run", "--rm", "--entrypoint", "id", TAG, "-u")
    assert uid.stdout.strip() == "1000"


def test_image_labels_name_version_and_revision(image):
    labels = json.loads(
        sh("docker", "image", "inspect", TAG, "--format", "{{json .Config.Labels}}").stdout
    )
    assert labels["org.opencontainers.image.version"] == "test"
    assert labels["org.opencontainers.image.revision"] == "abc123"
    assert "org.opencontainers.image.source" in labels


def test_image_trains_into_a_mounted_run_directory(image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 1000, 1000)  # the image's user owns the volume, as `docker run --user` would
    args = [
        "docker",
        "run",
        "--rm",
        "--shm-size=1g",
        "-v",
        f"{runs}:/runs",
        TAG,
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "300",
        "--val-size",
        "50",
        "--arch",
        "resnet18",
        "--stem",
        "imagenet",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--fast-dev-run",
        "--run-dir",
        "/runs/smoke",
    ]
    run = sh(*args, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "test/acc " in run.stdout
    smoke = runs / "smoke"
    config = json.loads((smoke / "config.json").read_text())
    assert config["run_dir"] == "/runs/smoke" and config["data_dir"] == "/data"  # image defaults
    assert json.loads((smoke / "manifest.json").read_text())["starts"]
    assert (smoke / "config.json").stat().st_uid == 1000  # written by the non-root user


def test_image_without_gpus_fails_clearly_when_asked_for_one(image, tmp_path):
    run = sh(
        "docker",
        "run",
        "--rm",
        TAG,
        "train",
        "--dataset",
        "synthetic",
        "--accelerator",
        "gpu",
        "--run-dir",
        "/tmp/r",
    )
    assert run.returncode == 2
    assert "gpu" in run.stderr.lower() and "Traceback" not in run.stderr


def test_docker_stop_saves_and_the_same_docker_run_resumes(image, tmp_path):
    """`docker stop` sends SIGTERM and, 10 s later, SIGKILL: the run saves inside that grace,
    exits 143 (never 0), and rerunning the very same `docker run` resumes from that step."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 1000, 1000)
    name = f"cifar-job-stop-{os.getpid()}"
    volume_and_train = [
        *("-v", f"{runs}:/runs", TAG, "train"),
        *("--dataset", "synthetic", "--synthetic-size", "1300", "--val-size", "100"),
        *("--arch", "resnet18", "--stem", "imagenet", "--batch-size", "40"),
        *("--num-workers", "0", "--max-epochs", "2", "--log-every-n-steps", "1"),
        *("--run-dir", "/runs/stop"),
    ]
    command = ["docker", "run", "--name", name, *volume_and_train]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if " step 8/" in line:
                break
        t0 = time.monotonic()
        stop = sh("docker", "stop", name)  # SIGTERM, SIGKILL after 10 s
        stopped_in = time.monotonic() - t0
        proc.communicate(timeout=60)
        assert stop.returncode == 0, stop.stderr
        state = json.loads(sh("docker", "inspect", name, "--format", "{{json .State}}").stdout)
    finally:
        sh("docker", "rm", "-f", name)
    assert state["ExitCode"] == 143 and not state["OOMKilled"], state  # saved, not killed
    assert stopped_in < 10, stopped_in  # well inside docker's grace
    marker = json.loads((runs / "stop" / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] >= 8

    again = sh("docker", "run", "--rm", *volume_and_train)  # the same training, run again
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    starts = json.loads((runs / "stop" / "manifest.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [None, marker["step"]]
    assert json.loads((runs / "stop" / "results.json").read_text())["global_step"] == 60
