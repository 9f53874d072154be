"""CLI start-up: `cifar-job --help` against `python -c "import lightning"`, side by side.

Goal: under 0.3 s, and under 0.1x the import. Runs alternate, medians of 9 each (--smoke: 1).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(runs: int = 1 if "--smoke" in sys.argv else 9) -> None:
    cli = [str(Path(sys.executable).with_name("cifar-job")), "--help"]
    lightning = [sys.executable, "-c", "import lightning"]
    if runs > 1:
        timed(cli), timed(lightning)  # warm the page cache for both
    help_s, import_s = [], []
    for _ in range(runs):
        help_s.append(timed(cli))
        import_s.append(timed(lightning))
    h, i = statistics.median(help_s), statistics.median(import_s)
    print(
        f"cli-startup: cifar-job --help {h:.3f} s, import lightning {i:.3f} s, "
        f"ratio {h / i:.3f} (goal < 0.3 s and < 0.1; medians of {runs})"
    )


if __name__ == "__main__":
    main()
