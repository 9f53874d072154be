"""Tracking on an MLflow server (--tracker mlflow): one MLflow run for the life of a run
directory, whatever stops and starts it, and never in the way of training.

- One identity. The run directory's tracking.json holds the server's run id from the moment
  the run is first created there; every later start (a requeue, a preemption, a rerun by
  hand, another rank count) resumes that MLflow run. The run is RUNNING while a start runs,
  KILLED or FAILED when a start ends so, FINISHED only when the run has finished; each start
  leaves a tag cifar_job.start.NNN (its job, layout, step and how it ended): the status
  history.
- Nothing blocks on the network. Global rank 0's logger appends each logged dict to
  tracking-metrics.jsonl in the run directory (one flushed line, as the CSV logger writes its
  rows); a thread sends what is new every FLUSH_S. A server that does not answer costs one
  warning line, and the metrics wait in that file until it answers again (at the next start
  at the latest).
- Every step once. Before it sends, the thread asks the server for the last step of every
  metric, and sends only later ones: steps trained again after a hard kill, or lines a start
  sent without living to note it, never add a second value at a step.
- Sweeps: a sweep directory's tracking.json holds a parent run; each element's run is its
  child (mlflow.parentRunId), named after the element.

The client is mlflow-skinny (`pip install 'cifar-job[mlflow]'`, in the image): MLflow's
REST client without the server, pandas or scikit-learn. Lightning's MLFlowLogger is not used:
it opens a new run at every start and talks to the server in the training step.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from cifar_job import __version__
from cifar_job.config import TrainConfig
from cifar_job.mlflow_client import (
    client_for,
    describe,
    ensure_sweep_parent,
    experiment_id,
    read_state,
    say,
)
from cifar_job.rundir import RunDir, read_json, write_json

FLUSH_S = 2.0  # a metric reaches the server this long after it is logged
RETRY_S = (2.0, 5.0, 15.0, 30.0)  # waits between tries while the server does not answer
# The most a start's end waits for the server.
END_WAIT_VAR, END_WAIT_S = "CIFAR_JOB_TRACKING_WAIT", 30.0
BATCH = 1000  # MLflow's limit of metrics per log_batch
# How a start ended (train.record_end's reason) -> the MLflow run's status.
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED", "hang": "FAILED"}


class MlflowTracker(Logger):
    """Lightning's side: append what is logged to the spool. The sender thread's side: the
    server. Only global rank 0 calls begin() and end(); the other ranks' logger does nothing
    (Lightning calls loggers on rank 0 only)."""

    def __init__(self, run_dir: RunDir | Path, cfg: TrainConfig) -> None:
        super().__init__()
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.uri, self.experiment = str(cfg.tracking_uri), cfg.experiment
        run = RunDir(run_dir)
        self.state_path, self.spool_path = run.tracking, run.tracking_spool
        self.state = read_state(self.state_path)
        self._spool: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._client: Any = None
        self._run_id: str | None = None
        self._marks: dict[str, int] = {}  # the server's last step of each metric
        self._offset = 0  # how far the spool has been read
        self._down: str | None = None  # why the server did not answer, while it does not
        self._start: dict[str, Any] | None = None
        self._end: tuple[str, str, list[Path]] | None = None

    # --- Lightning's logger API (the training loop's thread: a file append, no network)

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.state.get("run_id") or ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the whole TrainConfig is logged as params when the MLflow run is created

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._spool is None:
            return  # not begun: a rank other than 0
        values = {k: float(v) for k, v in metrics.items()}
        line = {"s": int(step or 0), "t": int(time.time() * 1000), "m": values}
        self._spool.write(json.dumps(line) + "\n")
        self._spool.flush()

    # --- the start's side

    def begin(self, start: dict[str, Any] | None) -> None:
        """Open the spool and start sending (global rank 0). `start` describes this start:
        its number, Slurm job, layout and step; None only sends what waits (a rerun of a
        finished run)."""
        self._start = start
        self._spool = open(self.spool_path, "a")  # noqa: SIM115 (closed by end())
        self._thread = threading.Thread(target=self._send_loop, name="cifar-job-tracking")
        self._thread.daemon = True
        self._thread.start()

    def end(
        self,
        reason: str,
        message: str | None = None,
        artifacts: Iterable[Path] = (),
        wait_s: float | None = None,
    ) -> None:
        """Send what is left, the artifacts and the status of how this start ended, waiting
        at most wait_s (END_WAIT_S) for the server."""
        if self._thread is None:
            return
        if wait_s is None:
            wait_s = float(os.environ.get(END_WAIT_VAR) or END_WAIT_S)
        self._end = (reason, message or "", [Path(a) for a in artifacts])
        self._stop.set()
        self._thread.join(wait_s)
        if self._thread.is_alive() and self._down is None:  # else it has been said
            say(
                f"{self.uri} did not take this start's end in {wait_s:.0f} s; what is left "
                f"waits in {self.spool_path} for the next start"
            )
        self._thread = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def abort(self, reason: str, message: str | None) -> None:
        """end() for a process that is about to exit at once (the watchdog): a short wait."""
        self.end(reason, message, wait_s=5.0)

    # --- the sender thread

    def _send_loop(self) -> None:
        failures = 0
        while True:
            stopping = self._stop.is_set()
            try:
                if self._run_id is None:
                    self._connect()
                elif self._down is not None:
                    self._marks = self._last_steps()  # what a failed request may have sent
                self._send_new()
                if self._down is not None:
                    say(f"{self.uri} answers again; the metrics that waited are sent")
                    self._down = None
                failures = 0
                if stopping:
                    self._finish()
                    return
            except Exception as e:  # whatever the server or the network did: training goes on
                why = describe(e)
                if self._down is None:
                    say(
                        f"{self.uri} does not take the run ({why}); training goes on, and "
                        f"the metrics wait in {self.spool_path} until it does"
                    )
                self._down = why
                if stopping:
                    return
                failures += 1
                self._stop.wait(RETRY_S[min(failures, len(RETRY_S)) - 1])
                continue
            self._stop.wait(FLUSH_S)

    def _connect(self) -> None:
        """Find (or create) this run directory's MLflow run, learn the last step of each of
        its metrics, mark it RUNNING and tag this start."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        client = self._client or client_for(self.uri)
        self._client = client
        run_id = self.state.get("run_id") if self.state.get("uri") == self.uri else None
        if run_id is not None:
            try:
                client.get_run(run_id)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                say(f"the run {run_id} is not on {self.uri} (deleted?); a new run is made")
                run_id = None
        made = run_id is None
        if run_id is None:
            run_id = self._create(client)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self._start_tags().items()])
        self._run_id = run_id
        try:
            self._log_params()
            self._marks, self._offset = self._last_steps(), 0
        except Exception:
            self._run_id = None  # connect again: nothing is sent before this is done
            raise
        say(f"{'new' if made else 'resumed'} MLflow run {run_id} on {self.uri}")

    def _last_steps(self) -> dict[str, int]:
        """The server's last step of each of the run's metrics."""
        client, run_id = self._client, self._run_id
        return {
            key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in client.get_run(run_id).data.metrics
        }

    def _create(self, client: Any) -> str:
        """A new MLflow run for this run directory; its id saved at once."""
        tags = {"cifar_job.run_dir": str(self.run_dir.resolve()), "cifar_job.version": __version__}
        sweep_dir = self.run_dir.parent
        plan_path = RunDir(sweep_dir).sweep_plan
        if plan_path.exists():
            plan = read_json(plan_path, "the sweep's plan")
            parent = ensure_sweep_parent(client, self.uri, sweep_dir, self.experiment, plan)
            tags["mlflow.parentRunId"] = parent
            element = next(
                (e for e in plan["elements"] if Path(e["run_dir"]).name == self.run_dir.name),
                None,
            )
            if element is not None:
                tags["cifar_job.settings"] = json.dumps(element["settings"])
        exp = experiment_id(client, self.experiment)
        run = client.create_run(exp, run_name=self.run_dir.name, tags=tags)
        run_id = run.info.run_id
        self.state = {"uri": self.uri, "experiment_id": exp, "run_id": run_id}
        write_json(self.state_path, self.state)  # before anything else: one identity
        return run_id

    def _log_params(self) -> None:
        """The settings as params, those the run does not have yet: all of them once, and
        after that only a setting new to it (params never change on an MLflow run; a
        rerun's changed free setting is in its start tag's layout and in manifest.json)."""
        from mlflow.entities import Param

        have = self._client.get_run(self._run_id).data.params
        params = [Param(k, str(v)[:6000]) for k, v in self.cfg.to_dict().items() if k not in have]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            self._client.log_batch(self._run_id, params=params[i : i + 100])

    def _start_tags(self, ended: str | None = None) -> dict[str, str]:
        s = self._start
        if s is None:
            return {}
        text = (
            f"job {s.get('job') or '-'} on {s.get('host')}: {s.get('layout')}, "
            f"from step {s.get('step') or 0}"
        )
        if ended:
            text += f"; ended {ended}"
        tags = {f"cifar_job.start.{int(s.get('number', 0)):03d}": text[:5000]}
        if not ended:
            tags |= {
                "cifar_job.starts": str(s.get("number", 0)),
                "cifar_job.layout": str(s.get("layout")),
                "cifar_job.image": str(s.get("image") or "none (host)"),
                "cifar_job.version": __version__,
                "slurm.job_id": str(s.get("job") or "-"),
                "slurm.job_ids": ",".join(s.get("jobs") or []) or "-",
            }
        return tags

    def _send_new(self) -> None:
        """Send the spool's new lines: each metric's steps after the server's last one."""
        from mlflow.entities import Metric

        try:
            with open(self.spool_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        whole = data[: data.rfind(b"\n") + 1]  # a line being written waits for next time
        batch: list[Any] = []
        marks = dict(self._marks)
        for raw in whole.splitlines():
            try:
                line = json.loads(raw)
                step, stamp, values = int(line["s"]), int(line["t"]), dict(line["m"])
            except (ValueError, KeyError, TypeError):
                continue  # the line a kill cut short
            for key, value in values.items():
                if step <= marks.get(key, -1):
                    continue
                marks[key] = step
                batch.append(Metric(key, float(value), stamp, step))
        for i in range(0, len(batch), BATCH):
            self._client.log_batch(self._run_id, metrics=batch[i : i + BATCH])
            for m in batch[i : i + BATCH]:
                self._marks[m.key] = max(self._marks.get(m.key, -1), m.step)
        self._offset += len(whole)

    def _finish(self) -> None:
        """The start's end: its artifacts, its tag, the run's status."""
        from mlflow.entities import RunTag

        assert self._end is not None
        reason, message, artifacts = self._end
        status = STATUS.get(reason, "FAILED")
        ended = f"{status} ({reason}{': ' + message if message else ''})"
        tags = {**self._start_tags(ended), "cifar_job.exit": ended[:5000]}
        self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for path in artifacts:
            if path.is_file():
                folder = "checkpoints" if path.suffix == ".ckpt" else None
                self._client.log_artifact(self._run_id, str(path), folder)
        self._client.set_terminated(self._run_id, status)
        if status == "FINISHED":
            self._finish_sweep()

    def _finish_sweep(self) -> None:
        """The sweep's parent is FINISHED once every element has finished."""
        from cifar_job.sweep import is_finished, read_plan

        sweep_dir = self.run_dir.parent
        plan = read_plan(sweep_dir)
        parent = read_state(RunDir(sweep_dir).tracking).get("run_id")
        if plan and parent and all(is_finished(e) for e in plan["elements"]):
            self._client.set_terminated(parent, "FINISHED")


def make_tracker(run_dir: RunDir | Path, cfg: TrainConfig) -> MlflowTracker | None:
    return MlflowTracker(run_dir, cfg) if cfg.tracker == "mlflow" else None
