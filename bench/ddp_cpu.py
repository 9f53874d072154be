"""DDP on CPU: 2 processes (gloo) against 1, in training images/s per process, side by side.

Both run `cifar-job train` on the same synthetic data for one epoch; the rate is the one the
job itself logs (images of all ranks over wall time), divided by the number of processes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

# --smoke: 2 steps a layout, a check of the script (and of DDP over gloo), not a figure.
SMOKE = "--smoke" in sys.argv

ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "200" if SMOKE else "3200",
    "--val-size",
    "72" if SMOKE else "200",
    "--arch",
    "resnet18",
    "--stem",
    "imagenet",
    "--batch-size",
    "64",
    "--num-workers",
    "0",
    "--max-epochs",
    "1",
    "--log-every-n-steps",
    "2" if SMOKE else "10",
    "--accelerator",
    "cpu",
]


def rate(devices: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        extra = ["--devices", str(devices), "--run-dir", run_dir]
        if devices > 1:
            extra += ["--strategy", "ddp"]
        out = subprocess.run(
            [sys.executable, "-m", "cifar_job", *ARGS, *extra],
            capture_output=True,
            text=True,
        )
    rates = [float(r) for r in re.findall(r"(\d+) img/s", out.stdout)]
    if out.returncode != 0 or not rates:
        sys.exit(
            f"ddp-cpu: the {devices}-process job failed or logged no img/s:\n"
            f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return rates[-1] / devices


def main() -> None:
    one, two = rate(1), rate(2)
    print(
        f"ddp-cpu: 1 process {one:.0f} img/s, 2 processes {two:.0f} img/s each; "
        f"per-process ratio {two / one:.2f} (2 cores shared: 0.5 means no loss overall)"
    )


if __name__ == "__main__":
    main()
