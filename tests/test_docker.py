"""The container image (conftest's `image`: built for real on a local Docker engine from a
wheelhouse, with no network), run with `docker run` as its non-root user. Run by
`make test-containers`: it moves GBs."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import IMAGE as TAG
from conftest import REPO, SMOKE, sh

# 30 min: the first test's set-up builds the image (or imports it into enroot) from nothing,
# which took 10 min on 2026-12-01 and ran past 10 on a machine 2.4x slower (2026-12-07).
pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]


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


def test_image_trains_into_a_mounted_run_directory(image, mlflow_server, tmp_path):
    """...and tracks it on an MLflow server (the image has the client; host networking
    reaches the test's server on loopback)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 1000, 1000)  # the image's user owns the volume, as `docker run --user` would
    volume = ["--shm-size=1g", "--network", "host", "-v", f"{runs}:/runs"]
    tracking = ["--tracker", "mlflow", "--tracking-uri", mlflow_server.uri, "--experiment", "image"]
    args = ["docker", "run", "--rm", *volume, TAG, "train", *SMOKE, *tracking]
    run = sh(*args, "--run-dir", "/runs/smoke", timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "test/acc " in run.stdout
    smoke = runs / "smoke"
    config = json.loads((smoke / "config.json").read_text())
    assert config["run_dir"] == "/runs/smoke" and config["data_dir"] == "/data"  # image defaults
    assert json.loads((smoke / "manifest.json").read_text())["starts"]
    assert (smoke / "config.json").stat().st_uid == 1000  # written by the non-root user
    client = mlflow_server.client()
    runs_on_server = client.search_runs([client.get_experiment_by_name("image").experiment_id])
    assert [r.info.status for r in runs_on_server] == ["FINISHED"]
    assert runs_on_server[0].data.params["run_dir"] == "/runs/smoke"


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
    marker = json.loads((runs / "stop" / "decision.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] >= 8

    again = sh("docker", "run", "--rm", *volume_and_train)  # the same training, run again
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    starts = json.loads((runs / "stop" / "manifest.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [None, marker["step"]]
    assert json.loads((runs / "stop" / "results.json").read_text())["global_step"] == 60


def test_compile_works_in_the_image(image, tmp_path):
    """torch.compile builds kernels when it runs (inductor with g++ on CPU; triton with a C
    compiler and Python.h on GPU): the image carries what that needs. And `cifar-job test`
    scores a compiled run's best checkpoint as training did (loading once left the compiled
    network's random weights in place); a compiled network rounds a little differently."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 1000, 1000)
    train = ["train", *SMOKE[:-1], "--max-epochs", "1", "--compile", "--run-dir", "/runs/c"]
    run = sh("docker", "run", "--rm", "-v", f"{runs}:/runs", TAG, *train, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "test/acc " in run.stdout
    results = json.loads((runs / "c" / "results.json").read_text())
    test = ["test", "--ckpt", results["best_checkpoint"], "--json"]
    tested = sh("docker", "run", "--rm", "-v", f"{runs}:/runs", TAG, *test, timeout=900)
    assert tested.returncode == 0, tested.stdout[-2000:] + tested.stderr[-3000:]
    metrics = json.loads(tested.stdout)
    assert metrics["test/loss"] == pytest.approx(results["test/loss"], rel=1e-3)
    assert metrics["test/acc"] == pytest.approx(results["test/acc"], abs=0.01)


def test_image_is_torchs_cuda_wheels_and_little_else(image):
    """What the image is made of: the base (Debian with Python, g++ and Python's headers),
    torch's CUDA wheels installed (torch, nvidia-*, triton: the floor), the other Python
    packages, and nothing else; none of what only a build needs (static libraries, pip's
    cache). The bytecode stays: the venv is read-only at run time, so without it every start
    would compile torch and Lightning again."""
    script = r"""
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo floor $(du -cb "$site"/torch "$site"/nvidia "$site"/triton | tail -1 | cut -f1)
echo venv $(du -sb /opt/venv | cut -f1)
echo static $(find / -xdev -name '*.a' -path '*site-packages*' | wc -l)
echo pip_cache $(find / -xdev -type d -path '*/.cache/pip' | wc -l)
echo bytecode $(find "$site"/torch "$site"/lightning -name '*.pyc' | wc -l)
"""
    out = sh("docker", "run", "--rm", "--user", "0", "--entrypoint", "bash", TAG, "-c", script)
    assert out.returncode == 0, out.stderr
    found = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}

    def size(tag: str) -> int:
        return int(sh("docker", "image", "inspect", tag, "--format", "{{.Size}}").stdout)

    total, base = size(TAG), size(image["base"])
    parts = {
        "image": total,
        "base": base,
        "torch_cuda_wheels": found["floor"],
        "other_packages": found["venv"] - found["floor"],
        "rest": total - base - found["venv"],
    }
    history = sh("docker", "history", TAG, "--format", "{{.Size}}\t{{.CreatedBy}}").stdout
    # What the MLflow client (--tracker mlflow) adds: bench/client_size.py, in the image.
    client = subprocess.run(
        ["docker", "run", "--rm", "-i", "--entrypoint", "python", TAG, "-", "mlflow-skinny"],
        input=(REPO / "bench/client_size.py").read_text(),
        capture_output=True,
        text=True,
    )
    assert client.returncode == 0, client.stderr
    print(client.stdout.strip())
    print("\nimage GB:", json.dumps({k: round(v / 1e9, 2) for k, v in parts.items()}))
    print(history)
    assert found["static"] == 0 and found["pip_cache"] == 0
    assert found["bytecode"] > 1000
    # Lightning, torchvision, numpy, matplotlib and the rest: 0.4 GB when measured, and the
    # MLflow client (--tracker mlflow) 0.1 GB more.
    assert parts["other_packages"] < 0.6e9, parts
    # The user, its directories and the project's wheel: nothing else is added to the base.
    assert parts["rest"] < 0.05e9, parts
