"""Run every benchmark, check that each printed its figures, and name each one that did not.

    python bench/run.py                 # all of them, one at a time (make bench, ~10 min)
    python bench/run.py --smoke -j 2    # each in its quick mode: checks the scripts (~1 min)
    python bench/run.py ddp_cpu binding # only these

A benchmark has failed when it exits non-zero, runs past its time, or leaves out a figure
line in the format the README's Performance table quotes (a figure from a broken run,
`nan` say, does not match either). A script that needs the test cluster or a GPU may print
"NAME: skipped, WHY" instead: that passes only where the cluster or the GPU is truly
missing. One failure does not stop the rest: every script runs, then the runner exits 1
naming each that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM = r"-?\d[\d,]*(?:\.\d+)?"  # 12, 1,234, 0.95, -0.12; never nan or inf


@dataclass(frozen=True)
class Bench:
    """One benchmark: its script and arguments, and the lines it must print."""

    name: str
    script: str
    figures: tuple[str, ...]  # regular expressions, each matching one line from its start
    args: tuple[str, ...] = ()
    needs: str | None = None  # "cluster" or "gpu": without it, "NAME: skipped, WHY" passes
    alone: bool = False  # starts processes of its own (DDP ranks, srun, the CLI): never shared
    smoke_args: tuple[str, ...] = ("--smoke",)
    timeout_s: float = 1800.0

    @property
    def skip_line(self) -> str:
        return rf"^{re.escape(self.name)}: skipped, \S"


BENCHES = [
    Bench(
        "cli-startup",
        "cli_startup.py",
        (rf"^cli-startup: cifar-job --help {NUM} s, import lightning {NUM} s, ratio {NUM} ",),
        alone=True,
    ),
    Bench(
        "data-path",
        "data_path.py",
        (
            rf"^data-path: torchvision CIFAR10\+transforms, 2 workers {NUM} img/s; ours "
            rf"\(tensor slices, batch augmentation\) {NUM} img/s, ratio {NUM}x ",
            rf"^data-load: the {NUM} training images into memory: ours {NUM} s, torchvision "
            rf"CIFAR10 {NUM} s, ratio {NUM} ",
        ),
    ),
    Bench(
        "lightning-overhead",
        "lightning_overhead.py",
        (
            rf"^lightning-overhead: plain PyTorch {NUM} s/epoch, cifar-job Trainer {NUM} "
            rf"s/epoch, ratio {NUM} \(95% interval of the mean pair ratio {NUM}-{NUM};",
            rf"^lightning-overhead-per-step: {NUM} ms a step over the plain loop",
        ),
    ),
    Bench(
        "ddp-cpu",
        "ddp_cpu.py",
        (
            rf"^ddp-cpu: 1 process {NUM} img/s, 2 processes {NUM} img/s each; per-process ratio "
            rf"{NUM} ",
        ),
        alone=True,
    ),
    Bench(
        "binding",
        "binding.py",
        (
            rf"^binding: unbound, a thread per core, 2 workers: {NUM} img/s a task ",
            rf"^binding: bound \(task/affinity\), sized: {NUM} img/s a task ",
            rf"^binding: bound and sized over before: {NUM}x$",
        ),
        needs="cluster",
        alone=True,
    ),
    Bench(
        "checkpoint",
        "checkpoint_cost.py",
        (
            rf"^checkpoint resnet18 \({NUM} MB with optimizer state\), median of {NUM}: ours "
            rf"\(atomic, fsync\) {NUM} s, plain torch.save {NUM} s, ratio {NUM}; ",
        ),
    ),
    Bench(
        "watchdog",
        "watchdog_cost.py",
        (
            rf"^watchdog: {NUM} steps of ResNet18 on CPU, {NUM} ms a step: hooks {NUM} us a "
            rf"step \({NUM}%\), thread {NUM} ms of CPU in {NUM} s \({NUM}%\); together {NUM}%",
            rf"^ledger: the step counter {NUM} us a step \({NUM}%\); one event-log line {NUM} ms",
        ),
    ),
    Bench(
        "agreement, 1 rank",
        "agreement_cost.py",
        (rf"^agreement, 1 rank on CPU: {NUM} ms a step in the hook, {NUM} ms a step \({NUM}%\)",),
        args=("--one-rank",),
    ),
    Bench(
        "agreement, 2 ranks",
        "agreement_cost.py",
        (
            rf"^agreement, 2 ranks, every step on CPU: {NUM} ms a step in the hook, {NUM} ms a "
            rf"step \({NUM}%\)",
            rf"^agreement, 2 ranks, about 1 s on CPU: {NUM} ms a step in the hook, {NUM} ms a "
            rf"step \({NUM}%\)",
        ),
        alone=True,
    ),
    Bench(
        "tracking",
        "tracking_cost.py",
        (
            rf"^tracking: log_metrics {NUM} us a call \(slowest {NUM} ms\) with a server that "
            rf"never answers, against the CSV logger's {NUM} us",
        ),
    ),
    Bench(
        "gpu",
        "gpu.py",
        (r'^gpu: \{"device": ".*"fast_path_speedup": ' + NUM,),
        needs="gpu",
    ),
]


def cluster_up() -> bool:
    """A Slurm controller answers here (make cluster)."""
    return (
        shutil.which("sinfo") is not None
        and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    )


def gpu_here() -> bool:
    """torch sees a CUDA device."""
    probe = [sys.executable, "-c", "import sys, torch; sys.exit(not torch.cuda.is_available())"]
    return subprocess.run(probe, capture_output=True).returncode == 0


NEEDS: dict[str, Callable[[], bool]] = {"cluster": cluster_up, "gpu": gpu_here}


@dataclass
class Outcome:
    bench: Bench
    seconds: float
    lines: list[str]  # its figure (or skip) lines
    problem: str | None  # why it failed, or None
    tail: str = ""  # the end of its output, where it failed


def run_one(
    bench: Bench, smoke: bool, folder: Path, have: dict[str, Callable[[], bool]]
) -> Outcome:
    """Run one benchmark in a process of its own and judge what it printed."""
    args = [*bench.args, *(bench.smoke_args if smoke else ())]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            [sys.executable, str(folder / bench.script), *args],
            capture_output=True,
            text=True,
            timeout=bench.timeout_s if not smoke else min(bench.timeout_s, 300),
            cwd=folder.parent,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text = out if isinstance(out, str) else out.decode(errors="replace")
        return Outcome(bench, time.perf_counter() - t0, [], f"ran past {e.timeout:.0f} s", text)
    seconds = time.perf_counter() - t0
    return judge(bench, out.returncode, out.stdout, out.stderr, seconds, have)


def run_shared(
    benches: Sequence[Bench], smoke: bool, folder: Path, have: dict[str, Callable[[], bool]]
) -> list[Outcome]:
    """Run benchmarks one after another in one process (`--host`), each as its own
    `__main__`: they then share the start-up (`import lightning` alone is ~10 s on a 2-core
    machine). For --smoke, whose runs are short, and only for scripts that start no
    processes of their own (Bench.alone is False)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(Path(__file__).resolve()), "--host", tmp]
        command += ["--smoke"] * smoke + [b.name for b in benches]
        env = {**os.environ, "CIFAR_JOB_BENCH_DIR": str(folder)}
        t0 = time.perf_counter()
        try:
            host = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            host_tail = host.stdout[-3000:] + host.stderr[-3000:]
        except subprocess.TimeoutExpired:
            host_tail = "the host process ran past 600 s"
        outcomes = []
        for i, bench in enumerate(benches):
            out = Path(tmp, f"{i}.out")
            if not out.exists():
                seconds = time.perf_counter() - t0
                outcomes.append(Outcome(bench, seconds, [], "never ran (the host died)", host_tail))
                continue
            rc, seconds = (float(x) for x in Path(tmp, f"{i}.rc").read_text().split())
            outcomes.append(
                judge(
                    bench,
                    int(rc),
                    out.read_text(),
                    Path(tmp, f"{i}.err").read_text(),
                    seconds,
                    have,
                )
            )
        return outcomes


def host(folder: Path, out_dir: Path, smoke: bool, names: list[str]) -> None:
    """The other end of run_shared: run each named script's `__main__` here, its stdout and
    stderr to files, its exit status (0, or 1 for an exception) and seconds beside them."""
    sys.path.insert(0, str(folder))
    argv = sys.argv
    for i, name in enumerate(names):
        bench = next(b for b in BENCHES if b.name == name)
        sys.argv = [str(folder / bench.script), *bench.args, *(bench.smoke_args if smoke else ())]
        t0, rc = time.perf_counter(), 0
        with open(out_dir / f"{i}.out", "w") as out, open(out_dir / f"{i}.err", "w") as err:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    runpy.run_path(sys.argv[0], run_name="__main__")
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (e.code is not None)
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                    rc = 1
        (out_dir / f"{i}.rc").write_text(f"{int(rc)} {time.perf_counter() - t0}")
    sys.argv = argv


def judge(
    bench: Bench,
    rc: int,
    stdout_text: str,
    stderr_text: str,
    seconds: float,
    have: dict[str, Callable[[], bool]],
) -> Outcome:
    """Whether a benchmark's run printed its figures (or a skip it was entitled to)."""
    stdout = stdout_text.splitlines()
    tail = "\n".join((stdout_text + stderr_text).splitlines()[-15:])
    if rc != 0:
        return Outcome(bench, seconds, [], f"exited with status {rc}", tail)
    skipped = [line for line in stdout if re.match(bench.skip_line, line)]
    if skipped and bench.needs is not None:
        if have[bench.needs]():
            return Outcome(
                bench, seconds, skipped, f"said skipped, but the {bench.needs} is here", tail
            )
        return Outcome(bench, seconds, skipped, None)
    missing = [p for p in bench.figures if not any(re.match(p, line) for line in stdout)]
    # Every line of its figures, the rows no pattern names too (binding.py's middle row).
    heads = {re.split(r"[ :,]", p.lstrip("^"), maxsplit=1)[0] for p in bench.figures}
    found = [line for line in stdout if re.split(r"[ :,]", line, maxsplit=1)[0] in heads]
    if missing:
        first = missing[0].lstrip("^").split(" ")[0].replace("\\", "")
        problem = f"printed no figure line starting {first!r} ({len(missing)} missing)"
        return Outcome(bench, seconds, found, problem, tail)
    return Outcome(bench, seconds, found, None)


def report(outcome: Outcome) -> None:
    """Print one benchmark's verdict and figure lines (and, where it failed, its output's end)."""
    bench = outcome.bench
    status = "ok" if outcome.problem is None else f"FAILED: {outcome.problem}"
    lines = [f"== {bench.name} ({bench.script}, {outcome.seconds:.0f} s): {status}"]
    lines += outcome.lines
    if outcome.problem is not None and outcome.tail:
        lines += ["   " + line for line in outcome.tail.splitlines()]
    print("\n".join(lines), flush=True)


def run_all(
    benches: Sequence[Bench],
    smoke: bool = False,
    jobs: int = 1,
    folder: Path = HERE,
    have: dict[str, Callable[[], bool]] | None = None,
) -> list[Outcome]:
    """Run every benchmark (`jobs` at a time), printing each one's lines as it ends; in
    --smoke, those that start no processes of their own share one."""
    have = have or NEEDS
    shared = [b for b in benches if smoke and not b.alone]
    if len(shared) < 2:
        shared = []

    def one(bench: Bench) -> list[Outcome]:
        outcomes = [run_one(bench, smoke, folder, have)]
        for outcome in outcomes:
            report(outcome)
        return outcomes

    def together() -> list[Outcome]:
        outcomes = run_shared(shared, smoke, folder, have)
        for outcome in outcomes:
            report(outcome)
        return outcomes

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        tasks = [pool.submit(together)] if shared else []
        tasks += [pool.submit(one, b) for b in benches if b not in shared]
        done = {o.bench.name: o for task in tasks for o in task.result()}
    return [done[b.name] for b in benches]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only these (names or script stems)")
    parser.add_argument(
        "--smoke", action="store_true", help="each in its quick mode: checks, not figures"
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, help="scripts at once (for --smoke; figures want 1)"
    )
    parser.add_argument("--host", type=Path, help=argparse.SUPPRESS)  # run_shared's other end
    args = parser.parse_args(argv)
    if args.host:
        host(Path(os.environ["CIFAR_JOB_BENCH_DIR"]), args.host, args.smoke, args.names)
        return 0
    chosen = [
        b
        for b in BENCHES
        if not args.names or b.name in args.names or Path(b.script).stem in args.names
    ]
    if not chosen:
        parser.error(f"no benchmark named {', '.join(args.names)}")
    outcomes = run_all(chosen, smoke=args.smoke, jobs=args.jobs)
    failed = [o for o in outcomes if o.problem is not None]
    if failed:
        names = "; ".join(f"{o.bench.name} ({o.bench.script}): {o.problem}" for o in failed)
        print(f"bench: {len(failed)} of {len(outcomes)} failed: {names}", flush=True)
        return 1
    mode = " in smoke mode" if args.smoke else ""
    print(f"bench: all {len(outcomes)} printed their figures{mode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
