"""The MLflow server as the CLI and the tracker both reach it, without Lightning or torch:
`compare --mlflow-run` and `submit --sweep --tracker mlflow` import only this (and the
MLflow client), so they start as fast as the rest of the CLI. tracking.py is the training
side."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cifar_job import OptionError
from cifar_job.config import TrainConfig
from cifar_job.rundir import RunDir, read_json, write_json

# The MLflow client retries a request for minutes by default; here a request that fails is
# tried again by the sender, with training going on. A user's own settings win.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_client(cfg: TrainConfig) -> None:
    """Refuse --tracker mlflow without the client installed (TrainConfig.validate has
    checked the URI)."""
    if cfg.tracker == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise OptionError(
            "--tracker mlflow needs the MLflow client: pip install 'cifar-job[mlflow]' "
            "(the image has it)"
        )


def describe(error: BaseException) -> str:
    """One short line for a client error: what failed, not the client's traceback."""
    text = str(error).strip() or type(error).__name__
    for cause in ("Connection refused", "timed out", "No route to host"):
        if cause in text:
            return cause.lower()
    if "NameResolutionError" in text or "Name or service not known" in text:
        return "the host name is not known"
    if "Max retries exceeded" in text or "NewConnectionError" in text:
        return "no connection"
    if "Unsupported" in type(error).__name__ or "filesystem tracking backend" in text:
        return "not a tracking URI MLflow can use; give http://HOST:PORT"
    line = text.splitlines()[0]
    return line if len(line) <= 200 else line[:197] + "..."


def say(message: str) -> None:
    print(f"tracking: {message}", file=sys.stderr, flush=True)


def read_state(path: Path) -> dict[str, Any]:
    """A run's (or a sweep's) tracking.json: the server, experiment and run ids."""
    return read_json(path, "the MLflow run this run logs to") if path.exists() else {}


def client_for(uri: str) -> Any:
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created if new (by whichever of many starts comes first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another start created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def ensure_sweep_parent(
    client: Any, uri: str, sweep_dir: Path, experiment: str, plan: dict[str, Any]
) -> str:
    """The sweep's parent run id, created once: by `submit`, else by the first element that
    reaches the server (an exclusive lock file keeps two from creating one each)."""
    path = RunDir(sweep_dir).tracking

    def known() -> str | None:  # the parent that tracking.json names on this server
        state = read_state(path)
        return state["run_id"] if state.get("run_id") and state.get("uri") == uri else None

    if parent := known():
        return parent
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                lock.unlink(missing_ok=True)  # its holder died
                deadline = time.monotonic() + 30
                continue
            time.sleep(0.5)
            if parent := known():
                return parent
    try:
        if parent := known():
            return parent
        from mlflow.entities import Param, RunTag

        exp = experiment_id(client, experiment)
        run = client.create_run(exp, run_name=sweep_dir.name, tags={"cifar_job.sweep": "parent"})
        run_id = run.info.run_id
        grid = {k: json.dumps(v) for k, v in plan.get("grid", {}).items()}
        params = [Param(f"sweep.{k}", v[:6000]) for k, v in grid.items()]
        params.append(Param("sweep.seeds", json.dumps(plan.get("seeds", []))))
        client.log_batch(
            run_id,
            params=params,
            tags=[
                RunTag("cifar_job.sweep_dir", str(sweep_dir.resolve())),
                RunTag("cifar_job.elements", str(len(plan.get("elements", [])))),
            ],
        )
        write_json(path, {"uri": uri, "experiment_id": exp, "run_id": run_id})
        return run_id
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def sweep_parent(cfg: TrainConfig, plan: dict[str, Any]) -> str | None:
    """With --tracker mlflow, the sweep's parent run on the server, made now (else the first
    element to reach the server makes it); None if the server or its client is missing."""
    import importlib.util

    if cfg.tracker != "mlflow" or importlib.util.find_spec("mlflow") is None:
        return None
    try:
        client = client_for(str(cfg.tracking_uri))
        return ensure_sweep_parent(
            client, str(cfg.tracking_uri), Path(cfg.run_dir), cfg.experiment, plan
        )
    except Exception as e:  # the server does not answer: the runs will make the parent
        say(
            f"{cfg.tracking_uri} does not answer ({describe(e)}); the sweep's runs will make "
            "its parent run when it does"
        )
        return None
