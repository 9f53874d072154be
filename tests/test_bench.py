"""The benchmarks behind the README's Performance table keep printing their figures: each runs
in its quick mode (--smoke) through bench/run.py, the runner `make bench` uses; and the runner
runs every script and names each one that fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import run as bench_run  # noqa: E402


@pytest.mark.slow
def test_every_benchmark_prints_its_figures_in_smoke_mode() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for bench in bench_run.BENCHES:
        header = [line for line in lines if line.startswith(f"== {bench.name} (")]
        assert header and header[0].endswith(": ok"), (bench.name, header)
        skipped = any(re.match(bench.skip_line, line) for line in lines)
        if skipped:  # counts only where what it needs is truly missing
            assert bench.needs is not None and not bench_run.NEEDS[bench.needs](), bench.name
            continue
        for pattern in bench.figures:
            assert any(re.match(pattern, line) for line in lines), (bench.name, pattern)
    assert f"bench: all {len(bench_run.BENCHES)} printed their figures in smoke mode" in lines


def script(folder: Path, name: str, body: str) -> str:
    (folder / name).write_text(body)
    return name


def test_runner_runs_every_script_and_names_each_failure(tmp_path: Path, capsys) -> None:
    benches = [
        bench_run.Bench("silent", script(tmp_path, "silent.py", "pass\n"), (r"^silent: \d",)),
        bench_run.Bench(
            "crash", script(tmp_path, "crash.py", "raise SystemExit('boom')\n"), (r"^crash: ",)
        ),
        bench_run.Bench(
            "broken",
            script(tmp_path, "broken.py", "print('broken: nan img/s')\n"),
            (rf"^broken: {bench_run.NUM} img/s",),
        ),
        bench_run.Bench(
            "good",
            script(tmp_path, "good.py", "print('good: 12.5 img/s')\n"),
            (rf"^good: {bench_run.NUM} img/s",),
        ),
    ]
    outcomes = bench_run.run_all(benches, folder=tmp_path)
    assert [o.bench.name for o in outcomes] == ["silent", "crash", "broken", "good"]
    assert "printed no figure line starting 'silent:'" in str(outcomes[0].problem)
    assert outcomes[1].problem == "exited with status 1" and "boom" in outcomes[1].tail
    assert "printed no figure line" in str(outcomes[2].problem)  # nan is no figure
    assert outcomes[3].problem is None and outcomes[3].lines == ["good: 12.5 img/s"]
    printed = capsys.readouterr().out
    assert "== good (good.py" in printed and "good: 12.5 img/s" in printed


def test_a_skip_passes_only_where_the_need_is_missing(tmp_path: Path) -> None:
    name = script(tmp_path, "needy.py", "print('needy: skipped, no cluster here')\n")
    needy = bench_run.Bench("needy", name, (r"^needy: \d",), needs="cluster")
    missing = bench_run.run_all([needy], folder=tmp_path, have={"cluster": lambda: False})
    assert missing[0].problem is None
    present = bench_run.run_all([needy], folder=tmp_path, have={"cluster": lambda: True})
    assert present[0].problem == "said skipped, but the cluster is here"
    plain = bench_run.Bench("needy", name, (r"^needy: \d",))  # needs nothing: never skips
    assert "printed no figure line" in str(bench_run.run_all([plain], folder=tmp_path)[0].problem)


def test_make_bench_runs_the_runner() -> None:
    makefile = (BENCH.parent / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "bench/run.py" in recipe and "|| true" not in recipe
