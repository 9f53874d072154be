"""Shared fixtures: CIFAR-format archives made here (CIFAR-10 itself cannot be fetched
offline), and a way to run the real `cifar-job` command in a subprocess."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from cifar_job.dataset import CLASSES, make_synthetic

REPO = Path(__file__).resolve().parent.parent
# Small and learnable: 5 train batches of 300 and a test batch of 200 images.
TRAIN_PER_BATCH, N_TEST = 300, 200


def batch_bytes(images: torch.Tensor, labels: list[int], name: str) -> bytes:
    """One batch file in CIFAR-10's python format."""
    return pickle.dumps(
        {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": images.reshape(len(labels), 3072).numpy(),
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        }
    )


def make_archive(path: Path, batches: dict[str, bytes] | None = None) -> str:
    """Write a cifar-10-python.tar.gz at path and return its md5."""
    if batches is None:
        images, labels = make_synthetic(5 * TRAIN_PER_BATCH, seed=7, split="train")
        test_images, test_labels = make_synthetic(N_TEST, seed=7, split="test")
        batches = {
            f"data_batch_{i + 1}": batch_bytes(
                images[i * TRAIN_PER_BATCH : (i + 1) * TRAIN_PER_BATCH],
                labels[i * TRAIN_PER_BATCH : (i + 1) * TRAIN_PER_BATCH].tolist(),
                f"batch {i}",
            )
            for i in range(5)
        }
        batches["test_batch"] = batch_bytes(test_images, test_labels.tolist(), "test")
        batches["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A valid CIFAR-format archive and its md5."""
    path = tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz"
    return path, make_archive(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, archive: tuple[Path, str]) -> Path:
    """A data directory filled by the real download path, from a file:// URL."""
    root = tmp_path_factory.mktemp("data")
    result = cifar_job(
        "download", "--data-dir", str(root), "--url", archive[0].as_uri(), "--md5", archive[1]
    )
    assert result.returncode == 0, result.stderr
    return root


def cifar_job(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would, and capture what it prints."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cifar_job", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Fast settings for training on 2 CPU cores: torchvision's ImageNet stem is ~20x cheaper
# than the CIFAR stem on 32x32 images (FACTS.md), and these runs only need to learn a little.
FAST = [
    "--arch",
    "resnet18",
    "--stem",
    "imagenet",
    "--num-workers",
    "0",
    "--lr",
    "0.05",
    "--log-every-n-steps",
    "5",
]


# One batch each of training, validation and test on tiny generated data: whether training
# runs at all somewhere (a container), not what it learns.
SMOKE = [
    *("--dataset", "synthetic", "--synthetic-size", "300", "--val-size", "50"),
    *("--arch", "resnet18", "--stem", "imagenet", "--batch-size", "32", "--num-workers", "0"),
    "--fast-dev-run",
]


@pytest.fixture(scope="session")
def cluster() -> None:
    """The local Slurm cluster (tests/cluster/start.sh), or a skip that says how to start it."""
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.skip("no Slurm cluster: run tests/cluster/start.sh (root, Debian) or `make cluster`")


@pytest.fixture(scope="session")
def reference(cluster, tmp_path_factory: pytest.TempPathFactory):
    """sbatch slurm/ddp_4gpu.sh, 1 node x 2 tasks, uninterrupted (slurmjobs.Uninterrupted):
    the weights every stopped run of that layout must end with."""
    from slurmjobs import ONE_NODE_TWO_TASKS, TEMPLATE, uninterrupted

    return uninterrupted(tmp_path_factory.mktemp("reference"), *ONE_NODE_TWO_TASKS, TEMPLATE)


@pytest.fixture(scope="session")
def reference_two_nodes(cluster, tmp_path_factory: pytest.TempPathFactory):
    """sbatch slurm/ddp_multinode.sh, 2 nodes x 1 task, uninterrupted. Not bitwise the same
    as 1 x 2: the reduction order across hosts differs."""
    from slurmjobs import MULTINODE, TWO_NODES, uninterrupted

    return uninterrupted(tmp_path_factory.mktemp("reference2"), *TWO_NODES, MULTINODE)


def sh(*cmd: str, timeout: float = 1800, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


IMAGE = "cifar-job:test"


@pytest.fixture(scope="session")
def image() -> dict[str, str]:
    """The image, built as `make image WHEELS=1` builds it (from a wheelhouse, with no
    network) on the local Docker engine of tests/docker/start.sh, on a Debian base made there.
    Built twice: the second build must come from the cache. Prints what each part took."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the test Docker engine needs root and apt-get")
    t0 = time.monotonic()
    started = sh(str(REPO / "tests/docker/start.sh"))
    if started.returncode:
        pytest.skip(f"no Docker engine: {started.stderr.strip()[-300:]}")
    base = started.stdout.strip().splitlines()[-1]
    figures = {"engine_and_base_s": round(time.monotonic() - t0)}
    t0 = time.monotonic()
    # The base image is Debian bookworm: Python 3.11, so the wheelhouse is for 3.11.
    wheels = sh("make", "wheels", "WHEELS_PYTHON=3.11", cwd=REPO)
    assert wheels.returncode == 0, wheels.stderr[-2000:]
    figures["wheels_s"] = round(time.monotonic() - t0)
    # Each new set of requirements leaves its build stage behind, untagged (about 9.5 GB, the
    # cache of the next build). Where they would leave too little room for one more build,
    # they go: a cold build takes minutes, a full disk fails the phase.
    root = sh("docker", "info", "--format", "{{.DockerRootDir}}").stdout.strip() or "/"
    if shutil.disk_usage(root).free < 25e9:
        sh("docker", "image", "prune", "-f")
        figures["pruned_for_room_gb"] = round(shutil.disk_usage(root).free / 1e9)
    build = ["docker", "build", "--network", "none", "-f", "docker/Dockerfile", "-t", IMAGE]
    for arg in (f"BASE_IMAGE={base}", "WHEELS=1", "VERSION=test", "REVISION=abc123"):
        build += ["--build-arg", arg]
    for attempt in ("build_s", "rebuild_s"):
        t0 = time.monotonic()
        built = sh(*build, ".", cwd=REPO)
        figures[attempt] = round(time.monotonic() - t0, 1)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "Using cache" in built.stdout and "Step" in built.stdout
    # Earlier builds of the image, now untagged (GBs each, less the layers they share).
    sh(
        "docker",
        "image",
        "prune",
        "-f",
        "--filter",
        "label=org.opencontainers.image.title=cifar-job",
    )
    size = int(sh("docker", "image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    figures["image_gb"] = round(size / 1e9, 2)
    print(f"\nimage figures: {json.dumps(figures)}")
    return {"tag": IMAGE, "base": base}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-containers",
        action="store_true",
        help="run the tests marked container (build the image, run it in Docker and pyxis)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-containers"):
        return
    skip = pytest.mark.skip(
        reason="the image build takes GBs and minutes: `make test-containers` runs it"
    )
    for item in items:
        if "container" in item.keywords:
            item.add_marker(skip)


def assert_matches_golden(output: str, cwd: Path, golden: Path) -> None:
    """Generated text (an sbatch script) against its golden file, with this machine's paths,
    and requeue.sh written into it, as placeholders. UPDATE_GOLDEN=1 rewrites the file."""
    from cifar_job.launch import REQUEUE_SCRIPT

    text = (
        output.replace(REQUEUE_SCRIPT.read_text().rstrip("\n"), "{REQUEUE_SH}")
        .replace(str(cwd), "{CWD}")
        .replace(sys.executable, "{PYTHON}")
    )
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


# The controller's address on the test cluster's own network (tests/cluster/start.sh): the
# nodes, each in a network namespace of its own, reach this machine there, not on loopback.
CLUSTER_HOST = "10.77.0.1"


def server_host() -> str:
    """Where a server the cluster's jobs must reach listens: the test network's address when
    the cluster runs, else loopback."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((CLUSTER_HOST, 0))
            return CLUSTER_HOST
        except OSError:
            return "127.0.0.1"


class MlflowServer:
    """A real `mlflow server` on this machine's test address (server_host): SQLite backend and a
    local artifact store in `root`, on a free port. stop() and start() again keep its data (a
    server that went away and came back)."""

    def __init__(self, root: Path) -> None:
        import socket

        self.root, self.host = root, server_host()
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://{self.host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import urllib.request

        mlflow = Path(sys.executable).parent / "mlflow"
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server's own)
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--host", self.host, "--port", str(self.port)]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(
            f"mlflow server did not start: {(self.root / 'server.log').read_text()}"
        )

    def stop(self) -> None:
        """Gone at once, as a server whose node is lost: SIGKILL to its process group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.process = None

    def client(self):  # noqa: ANN201 (mlflow's MlflowClient)
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One MLflow server for the session (tests use their own experiments), stopped after."""
    if shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no mlflow server in this environment: make install (the dev extra has it)")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def metric_steps(client, run_id: str) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN001
    """Every metric of an MLflow run as (step, value), in step order, repeats included."""
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def csv_steps(run_dir: Path) -> dict[str, dict[int, float]]:
    """The run's own CSV logs (every start's), as {metric: {step: first value}}."""
    import csv

    values: dict[str, dict[int, float]] = {}
    for path in sorted(
        (run_dir / "logs").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    ):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        values.setdefault(key, {}).setdefault(int(row["step"]), float(value))
    return values


def assert_each_step_once_as_in_csv(client, run_id: str, run_dir: Path) -> None:  # noqa: ANN001
    """The server's metric history has each step once, with the CSV's value at that step."""
    server, local = metric_steps(client, run_id), csv_steps(run_dir)
    assert server.keys() == local.keys(), (sorted(server), sorted(local))
    for key, points in server.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
        assert steps == sorted(local[key]), (key, steps, sorted(local[key]))
        for step, value in points:
            assert value == pytest.approx(local[key][step], rel=1e-6), (key, step)
