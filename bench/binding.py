"""Two one-CPU tasks on one node of the test cluster (`make cluster`), in training images/s
per task, side by side: the job as it ran before it sized itself (tasks free to use every
core, a torch thread per core, 2 loader workers), sized but not bound (`--cpu-bind=none`),
and bound by Slurm's task/affinity as sites do, threads and workers sized from the task's
CPU. Each row is one `srun --ntasks-per-node=2 --cpus-per-task=1` training one epoch of
synthetic data with `--data-loader torch`; the rate is the one the job logs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

# --smoke: the first and last rows on a few steps each, a check of the script, not a figure.
SMOKE = "--smoke" in sys.argv

ARGS = [
    *("train", "--dataset", "synthetic", "--synthetic-size", "200" if SMOKE else "1480"),
    *("--val-size", "72" if SMOKE else "200", "--log-every-n-steps", "2" if SMOKE else "5"),
    *("--arch", "resnet18", "--stem", "imagenet", "--batch-size", "64", "--max-epochs", "1"),
    *("--data-loader", "torch", "--accelerator", "cpu"),
]
ROWS = {
    "unbound, a thread per core, 2 workers": (["--cpu-bind=none"], {"OMP_NUM_THREADS": "2"}, 2),
    "unbound, sized from the task's CPU": (["--cpu-bind=none"], {}, None),
    "bound (task/affinity), sized": ([], {}, None),
}


def rate(srun_args: list[str], env: dict[str, str], workers: int | None) -> tuple[float, str]:
    """img/s per task, and the layout line the job printed (threads and workers)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_"))}
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as run_dir:
        extra = ["--run-dir", run_dir, "--devices", "2"]
        if workers is not None:
            extra += ["--num-workers", str(workers)]
        out = subprocess.run(
            [
                *("srun", "-N1", "--ntasks-per-node=2", "--cpus-per-task=1", *srun_args),
                *(sys.executable, "-m", "cifar_job", *ARGS, *extra),
            ],
            env={**clean, **env},
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        sys.exit(f"binding: the job failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    rates = [float(r) for r in re.findall(r"(\d+) img/s", out.stdout)]
    layout = next(line for line in out.stdout.splitlines() if "process(es) on" in line)
    return rates[-1] / 2, layout.split("device(s), ")[1].split(",")[0]


def main() -> None:
    if shutil.which("srun") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        print("binding: skipped, no Slurm cluster here (make cluster)")
        return
    rows = list(ROWS.items())
    if SMOKE:
        rows = [rows[0], rows[-1]]
    found = {name: rate(*row) for name, row in rows}
    rates = [img_s for img_s, _ in found.values()]  # the first row is before, the last after
    before, after = rates[0], rates[-1]
    for name, (img_s, layout) in found.items():
        print(f"binding: {name}: {img_s:.0f} img/s a task ({layout})")
    print(f"binding: bound and sized over before: {after / before:.1f}x")


if __name__ == "__main__":
    main()
