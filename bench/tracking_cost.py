"""What --tracker mlflow costs the training step: its logger's log_metrics (an append to the
run directory's spool) against the CSV logger's, side by side in one process, for the same
dicts; and the slowest of its calls while the server never answers (a socket that accepts
and stays silent), to show that nothing in the step waits for the network.

    python bench/tracking_cost.py
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from cifar_job.config import TrainConfig
from cifar_job.tracking import MlflowTracker

warnings.filterwarnings("ignore")
CALLS = 30 if "--smoke" in sys.argv else 3000  # --smoke: a check of the script
METRICS = {"train/loss_step": 1.2345, "train/acc_step": 0.5, "epoch": 3.0, "lr-SGD": 0.05}


def per_call(log, calls: int = CALLS) -> tuple[float, float]:  # noqa: ANN001
    """Mean and slowest seconds of one log_metrics call."""
    slowest, t0 = 0.0, time.perf_counter()
    for step in range(calls):
        t = time.perf_counter()
        log(METRICS, step)
        slowest = max(slowest, time.perf_counter() - t)
    return (time.perf_counter() - t0) / calls, slowest


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = TrainConfig(tracker="mlflow", tracking_uri=uri, run_dir=tmp)
        csv = CSVLogger(tmp, name="logs")
        tracker = MlflowTracker(Path(tmp), cfg)
        tracker.begin({"number": 1, "layout": "bench"})
        time.sleep(0.5)  # the sender is now waiting on the silent server
        per_call(csv.log_metrics, CALLS // 10)  # warm-up
        csv_mean, csv_max = per_call(csv.log_metrics)
        mlflow_mean, mlflow_max = per_call(tracker.log_metrics)
        csv.save()
        tracker._down = "bench"  # no closing line
        tracker.end("finished", wait_s=0.1)
    print(
        f"tracking: log_metrics {mlflow_mean * 1e6:.1f} us a call (slowest "
        f"{mlflow_max * 1e3:.2f} ms) with a server that never answers, against the CSV "
        f"logger's {csv_mean * 1e6:.1f} us (slowest {csv_max * 1e3:.2f} ms): "
        f"{mlflow_mean / csv_mean:.1f}x; of a 10 ms GPU step: {mlflow_mean / 0.01:.2%} when "
        f"every step is logged, {mlflow_mean / 50 / 0.01:.3%} at --log-every-n-steps 50"
    )


if __name__ == "__main__":
    main()
