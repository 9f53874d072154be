"""--tracker mlflow against a real `mlflow server` on loopback (SQLite backend, local artifact
store): one MLflow run for the life of a run directory, each step once, a server that goes
away never stops training, one rank talks to it, and bad settings cost one line. The cluster's
side (a run preempted twice, a sweep's parent and children) is in test_preemption.py and
test_sweep.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    assert_each_step_once_as_in_csv,
    cifar_job,
    csv_steps,
)

pytestmark = pytest.mark.slow

# 300 training images in batches of 40: 7 steps an epoch (the last partial batch is dropped),
# each step logged.
TINY = [
    *("--dataset", "synthetic", "--synthetic-size", "400", "--val-size", "100"),
    *("--arch", "resnet18", "--stem", "imagenet", "--num-workers", "0", "--batch-size", "40"),
    *("--lr", "0.05", "--log-every-n-steps", "1", "--accelerator", "cpu"),
]


def tracked(server_uri: str, experiment: str) -> list[str]:
    return ["--tracker", "mlflow", "--tracking-uri", server_uri, "--experiment", experiment]


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "tracking.json").read_text())["run_id"]


def tracking_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tracking:")]


def spool(run_dir: Path) -> list[dict]:
    """The lines of the run's tracking spool: {"s": step, "t": ms, "m": {metric: value}}."""
    path = run_dir / "tracking-metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def spool_steps(run_dir: Path, key: str | None = None) -> list[int]:
    return [line["s"] for line in spool(run_dir) if key is None or key in line["m"]]


def server_last_step(client, run_dir: Path, key: str = "train/loss_step") -> int:  # noqa: ANN001
    if not (run_dir / "tracking.json").exists():
        return -1
    return max((m.step for m in client.get_metric_history(run_id(run_dir), key)), default=-1)


def wait_until(condition, timeout: float = 120, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def train_in_background(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """`cifar-job train` in its own process group, its stderr in cwd/stderr.txt."""
    with open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "cifar_job", "train", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )


def test_a_server_that_dies_and_a_hard_kill_leave_one_run_with_each_step_once(
    mlflow_server, tmp_path
):
    """One run meets both: the server is killed after the first metrics reached it, training
    goes on with one warning line, then the job is killed (-9) between saves, so the next
    start trains the steps since the save again. With the server back, that start resumes
    the same MLflow run, sends what waited, each step once with the CSV's (first) values,
    and ends it FINISHED with its artifacts."""
    server = mlflow_server  # stopped and started again here: the same data comes back
    client = server.client()
    run_dir = tmp_path / "run"
    # 30 steps an epoch: the warning comes within the first epoch, and the kill well before
    # the save at the second epoch's end (15 steps an epoch were too few on a quiet machine).
    args = [*TINY, "--synthetic-size", "1300", "--max-epochs", "2", "--run-dir", str(run_dir)]
    args += ["--data-dir", str(tmp_path), *tracked(server.uri, "outage")]
    job = train_in_background(*args, cwd=tmp_path)
    stderr, latest = tmp_path / "stderr.txt", run_dir / "latest"
    try:
        wait_until(lambda: server_last_step(client, run_dir) >= 1, what="metrics on the server")
        server.stop()
        wait_until(lambda: "does not take the run" in stderr.read_text(), what="the warning")
        wait_until(latest.exists, what="the first epoch's save")
        saved = int(latest.read_text().strip().split("-")[1].split(".")[0])
        wait_until(lambda: max(spool_steps(run_dir)) >= saved + 3, what="3 steps after it")
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        server.stop()
        server.start()  # the session's other tests need it
    reached, err = max(spool_steps(run_dir)), stderr.read_text()
    assert latest.read_text() == f"step-{saved:08d}.ckpt\n"  # killed between saves
    warnings = [line for line in tracking_lines(err) if "does not take the run" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "training goes on" in warnings[0] and "tracking-metrics.jsonl" in warnings[0]
    first_id = run_id(run_dir)

    result = cifar_job("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert len(starts) == 2 and starts[1]["step"] == saved < reached  # trained again
    assert run_id(run_dir) == first_id and "resumed MLflow run" in result.stderr
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert_each_step_once_as_in_csv(client, first_id, run_dir)
    assert {a.path for a in client.list_artifacts(first_id)} == {"results.json", "curves.png"}
    sent = Path(client.download_artifacts(first_id, "results.json", str(tmp_path)))
    assert json.loads(sent.read_text()) == json.loads((run_dir / "results.json").read_text())
    assert len(client.search_runs([run.info.experiment_id])) == 1
    tags = run.data.tags
    assert tags["cifar_job.starts"] == "2" and "FINISHED" in tags["cifar_job.start.002"]
    assert "ended" not in tags["cifar_job.start.001"]  # killed: it could say nothing
    assert json.loads(run.data.params["max_epochs"]) == 2
    assert run.data.params["tracker"] == "mlflow"
    status = cifar_job("status", str(run_dir))
    assert f"MLflow run {first_id} on {server.uri}" in status.stdout


# An experiment name is any text: the DDP run uses one with odd characters.
ODD_NAME = "ddp/odd name with spaces, 'quotes' & ünïcode ★"


def test_a_ddp_run_on_two_ranks_logs_once(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    result = cifar_job(
        "train",
        *TINY,
        *("--max-epochs", "1", "--devices", "2", "--strategy", "ddp"),
        *("--run-dir", str(run_dir), "--data-dir", str(tmp_path)),
        *tracked(mlflow_server.uri, ODD_NAME),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(ODD_NAME)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id(run_dir)]
    assert runs[0].info.status == "FINISHED"
    assert_each_step_once_as_in_csv(client, run_id(run_dir), run_dir)
    steps = spool_steps(run_dir, "train/loss_step")
    assert len(steps) == len(set(steps)) == 7  # rank 0 wrote the spool, alone
    assert len(tracking_lines(result.stderr)) == 1  # one rank: one "new MLflow run" line
    assert "2 process(es)" in result.stdout


class Silent:
    """A server that accepts connections and never answers."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# A URI that can never be a server (htp://, sqlite:///) is refused before training instead:
# test_rundir.py's test_a_tracking_uri_that_cannot_be_a_server_is_refused_before_training.
@pytest.mark.parametrize("case", ["refused", "never answers", "name too long"])
def test_bad_tracking_settings_cost_one_line_and_training_goes_on(mlflow_server, tmp_path, case):
    experiment = "bad"
    with Silent() as silent:
        uri = {
            "refused": closed_port(),
            "never answers": silent,
        }.get(case, mlflow_server.uri)
        if case == "name too long":
            experiment = "x" * 600
        started = time.monotonic()
        result = cifar_job(
            "train",
            *TINY,
            *("--max-epochs", "1", "--run-dir", str(tmp_path / "run")),
            *("--data-dir", str(tmp_path), *tracked(uri, experiment)),
            env={"CIFAR_JOB_TRACKING_WAIT": "5"},
            cwd=tmp_path,
        )
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()
    lines = tracking_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    expected = {
        "refused": "connection refused",
        # Timed out in the tracking thread, or still waiting when the short run ended.
        "never answers": "timed out" if "timed out" in lines[0] else "did not take",
        "name too long": "exceeds the maximum length",
    }[case]
    assert expected in lines[0], lines
    if case == "never answers":
        # The step loop never waited for it: the end waited its 5 s, the client's 10 s
        # request ran in the tracking thread.
        assert took < 120, took
    # Everything it logged waits in the run directory for a server that answers.
    logged = set().union(*(set(steps) for steps in csv_steps(tmp_path / "run").values()))
    assert set(spool_steps(tmp_path / "run")) == logged


def test_tracker_mlflow_without_a_uri_is_a_usage_error(tmp_path):
    result = cifar_job(
        "train",
        "--tracker",
        "mlflow",
        "--run-dir",
        str(tmp_path / "r"),
        env={"MLFLOW_TRACKING_URI": ""},
    )
    assert result.returncode == 2
    assert "--tracker mlflow needs --tracking-uri" in result.stderr


def test_doctor_says_whether_this_node_reaches_the_tracking_server(mlflow_server):
    reached = cifar_job("doctor", "--dataset", "synthetic", "--tracking-uri", mlflow_server.uri)
    assert reached.returncode == 0, reached.stdout + reached.stderr
    assert f"ok  tracking: the MLflow server {mlflow_server.uri} answers" in reached.stdout
    refused = closed_port()
    missed = cifar_job("doctor", "--dataset", "synthetic", env={"MLFLOW_TRACKING_URI": refused})
    assert missed.returncode == 1
    assert f"FAIL  tracking: the MLflow server {refused} does not answer" in missed.stdout


def test_compare_from_the_server_imports_neither_torch_nor_lightning(mlflow_server):
    """`compare --mlflow-run` reads the server only: it starts as fast as the rest of the
    CLI (a run made here with the client, its val/acc by epoch)."""
    from test_cli import heavy_imports

    client = mlflow_server.client()
    experiment = client.create_experiment("compare-imports")
    run_id = client.create_run(experiment, run_name="r").info.run_id
    for step, epoch, acc in ((10, 0, 0.3), (20, 1, 0.5)):
        client.log_metric(run_id, "epoch", epoch, step=step)
        client.log_metric(run_id, "val/acc", acc, step=step)
    args = ("compare", "--tracking-uri", mlflow_server.uri, "--mlflow-run", run_id, "--json")
    assert heavy_imports(*args) == []
    table = json.loads(cifar_job(*args).stdout)
    assert table["runs"][0]["val_acc_curve"] == [[1, 0.3], [2, 0.5]]
    assert table["runs"][0]["best_val_acc"] == 0.5 and table["runs"][0]["best_epoch"] == 2
