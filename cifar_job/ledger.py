"""`cifar-job hours`: where a run's node-hours went, from what its starts recorded
(events.py: events.jsonl and reached.bin, written by phases.py, checkpoints.py and the
watchdog) and, where `sacct` answers, Slurm's accounting. It splits each start's allocation
into kept and recomputed training, saves and loads, start-up, evaluation, stops, queue waits,
hangs and what no record explains, and renders the table and the plot. It reads; the job's
recording is events.py's.

Slurm's view: where `sacct` answers, each start's allocation (start, end, nodes) and the
queue wait before it come from Slurm's accounting; elsewhere the ledger says so and uses the
run directory's records alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_job import events
from cifar_job.events import read_reached
from cifar_job.rundir import RunDir
from cifar_job.slurm import sacct_allocations

# Kept training first: the one useful share. Then what the allocation spent otherwise.
CATEGORIES = (
    ("kept", "kept training"),
    ("recomputed", "recomputed training"),
    ("checkpoint", "checkpoint save and load"),
    ("startup", "start-up"),
    ("evaluation", "evaluation"),
    ("stop", "stop and grace"),
    ("queue", "queue wait between starts"),
    ("hang", "hang"),
    ("recovery", "fault to training again"),  # a relaunch inside the allocation
    ("unaccounted", "unaccounted"),
)


# ----------------------------------------------------------------------------- Slurm


@dataclass
class Allocation:
    """One start's allocation as Slurm's accounting has it."""

    start: float
    end: float | None  # None while it runs
    nodes: int
    state: str


def sacct(job: str) -> tuple[list[Allocation], str | None]:
    """Every allocation of the job (each requeue is one), oldest first, or [] and why sacct
    gave none."""
    rows, why = sacct_allocations(job)
    if why is not None:
        return [], why
    found: list[Allocation] = []
    for start_text, end_text, state, nodes in sorted(rows, key=lambda row: row[0]):
        start = _slurm_time(start_text)
        if start is None:
            continue  # never started (pending, or cancelled while pending)
        last = found[-1] if found else None
        if last and last.state == "RESIZING" and last.end is not None and start - last.end <= 1:
            # A --no-kill job that lost a node goes on in the same allocation: Slurm's
            # accounting ends a RESIZING record there and starts another. One allocation,
            # counted with the nodes it began with.
            last.end, last.state = _slurm_time(end_text), state
            continue
        found.append(Allocation(start, _slurm_time(end_text), nodes, state))
    if not found:
        return [], f"sacct has no allocation of job {job}"
    return found, None


def _slurm_time(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None  # Unknown, None


# ----------------------------------------------------------------------------- the ledger


@dataclass
class Start:
    """One start's records, and its share of the hours once computed."""

    number: int
    job: str | None
    nodes: int
    begin: float  # the allocation's start (Slurm's), else the process's
    process: float
    resumed: int
    relaunch: int = 0  # > 0: started again inside the previous start's allocation
    records: list[dict[str, Any]] = field(default_factory=list)
    # What reached.bin held as it began: the last step of the newest start that trained.
    found_reached: dict[str, Any] | None = None
    reached: dict[str, Any] | None = None  # this start's last completed step, and when
    end: float | None = None  # the allocation's end (Slurm's), else the last record
    seconds: dict[str, float] = field(default_factory=dict)
    recomputed_steps: int = 0
    notes: list[str] = field(default_factory=list)


def split_starts(run_dir: Path, damaged: list[int] | None = None) -> list[Start]:
    """The run's starts from its event log (damaged lines are skipped, their numbers put in
    `damaged`: their time counts as unaccounted)."""
    starts: list[Start] = []
    for event in events.read(run_dir, damaged):
        if event["event"] == "start":
            t = _number(event.get("time")) or 0.0
            process = _number(event.get("process")) or t
            reached = event.get("reached")
            starts.append(
                Start(
                    number=len(starts) + 1,
                    job=event.get("job"),
                    nodes=int(_number(event.get("nodes")) or 1),
                    begin=_number(event.get("allocated")) or process,
                    process=process,
                    resumed=int(_number(event.get("step")) or 0),
                    relaunch=int(_number(event.get("relaunch")) or 0),
                    found_reached=reached if _is_reached(reached) else None,
                )
            )
        elif starts:
            starts[-1].records.append(event)
    return starts


def _is_reached(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("step"), int)
        and isinstance(value.get("time"), (int, float))
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def hours(run_dir: str | Path, use_sacct: bool = True) -> dict[str, Any]:
    """The run's ledger: per start and in total, node-seconds per category and goodput."""
    run_dir = Path(run_dir)
    damaged: list[int] = []
    starts = split_starts(run_dir, damaged)
    slurm = _attach_slurm(starts) if use_sacct else "not asked"
    last_reached = read_reached(run_dir)
    for i, start in enumerate(starts):
        # A start's last step is what the next start found in reached.bin (or, for the
        # newest, what it holds now), if this start wrote it: after its process began.
        found = starts[i + 1].found_reached if i + 1 < len(starts) else last_reached
        if found is not None and found["time"] >= start.process:
            start.reached = found
    _link_relaunches(starts)
    for i, start in enumerate(starts):
        _account(start, starts[:i])
    total = {key: sum(s.seconds.get(key, 0.0) * s.nodes for s in starts) for key, _ in CATEGORIES}
    whole = sum(total.values())
    return {
        "run_dir": str(run_dir),
        "slurm": slurm or "sacct",
        "starts": [
            {
                "start": s.number,
                "job": s.job,
                "nodes": s.nodes,
                "resumed_at": s.resumed,
                "reached": s.reached["step"] if s.reached else None,
                "recomputed_steps": s.recomputed_steps,
                "node_seconds": {
                    k: round(s.seconds.get(k, 0.0) * s.nodes, 3) for k, _ in CATEGORIES
                },
                "node_seconds_total": round(sum(s.seconds.values()) * s.nodes, 3),
                "notes": s.notes,
            }
            for s in starts
        ],
        "node_seconds": {k: round(v, 3) for k, v in total.items()},
        "node_seconds_total": round(whole, 3),
        "goodput": round(total["kept"] / whole, 4) if whole > 0 else None,
        "damaged": [f"{RunDir(run_dir).events}: line {n} is not a whole record" for n in damaged],
    }


def _attach_slurm(starts: list[Start]) -> str | None:
    """Each start's allocation from sacct, matched by time: the allocation that holds the
    process's start. Returns why Slurm's view is missing, or None."""
    jobs = sorted({s.job for s in starts if s.job})
    if not jobs:
        return "outside Slurm: allocations from the run directory's records"
    allocations: list[Allocation] = []
    for job in jobs:
        found, why = sacct(job)
        if why is not None:
            return f"{why}: allocations and queue waits from the run directory's records"
        allocations += found
    for start in starts:
        for a in allocations:
            if a.start - 1 <= start.process and (a.end is None or start.process <= a.end + 1):
                start.begin, start.nodes = a.start, a.nodes
                start.end = a.end if a.end is not None else time.time()
                start.notes.append(f"Slurm: {a.state}")
                break
        else:
            start.notes.append("no Slurm allocation holds this start: its records alone")
    return None


def _last_record(start: Start) -> float:
    times = [r["time"] for r in start.records if _number(r.get("time")) is not None]
    if start.reached is not None:
        times.append(start.reached["time"])
    return max(times, default=start.process)


def _link_relaunches(starts: list[Start]) -> None:
    """A start relaunched inside the allocation of the one before it shares that allocation:
    the earlier start ends at its last record (the fault), the later one begins there, with
    no queue wait between them."""
    for before, start in zip(starts, starts[1:]):
        if start.relaunch > 0 and start.job == before.job:
            before.end = _last_record(before)
            start.begin = before.end


def _account(start: Start, earlier: list[Start]) -> None:
    """Split one start's allocation, [begin, end], and the queue wait before it, into the
    categories (seconds)."""
    recs = start.records
    last_record = max((r["time"] for r in recs if _number(r.get("time"))), default=start.process)
    if start.reached is not None:
        last_record = max(last_record, start.reached["time"])
    if start.end is None:
        start.end = last_record  # without Slurm: the allocation as far as the records go
        start.notes.append("no end from Slurm: counted to its last record")
    seconds = start.seconds
    spans = {  # (begin, end) of each timed record, by kind
        kind: [(r["time"] - r["s"], r["time"]) for r in recs if r["event"] == kind and _timed(r)]
        for kind in ("load", "save", "eval")
    }
    seconds["checkpoint"] = sum(b - a for a, b in spans["load"] + spans["save"])
    seconds["evaluation"] = sum(b - a for a, b in spans["eval"])
    timed = spans["load"] + spans["save"] + spans["eval"]
    train = _first(recs, "train")
    train_t = train["time"] if train else None
    ready = train_t or last_record  # start-up: to training's beginning, less what is timed
    # After a relaunch, from the fault to training again (the step's end, the new one's
    # start, imports, rendezvous, data, the checkpoint load): the recovery, not a start-up.
    kind = "recovery" if start.relaunch > 0 else "startup"
    seconds[kind] = max(0.0, ready - start.begin - _overlap(timed, start.begin, ready))
    if start.relaunch > 0:
        start.notes.append(
            f"relaunch {start.relaunch} in the allocation: training again "
            f"{seconds[kind]:.1f} s after the fault"
        )
    # Training lasts from its beginning until it stopped: a hang (from its last progress), a
    # stop signal, the end of fit; or, for a start killed without a word, its last step.
    # From a hang's last progress, or a stop signal, to the allocation's end: the hang, or
    # the stop and its grace (less the saves and evaluations in it).
    hang, signal, fit_end = (_first(recs, kind) for kind in ("hang", "signal", "fit_end"))
    stopped: tuple[float, str] | None = None
    if hang is not None:
        stopped = (hang["time"] - (_number(hang.get("idle_s")) or 0.0), "hang")
    elif signal is not None:
        stopped = (signal["time"], "stop")
    if stopped is not None:
        t, kind = stopped
        seconds[kind] = max(0.0, start.end - t - _overlap(timed, t, start.end))
    ends = [t for t in (stopped and stopped[0], fit_end and fit_end["time"]) if t is not None]
    if not ends and start.reached is not None:
        ends = [start.reached["time"]]  # killed without a word: its last step
    training = 0.0
    if train_t is not None and ends and min(ends) > train_t:
        training = min(ends) - train_t - _overlap(timed, train_t, min(ends))
    # Steps trained again: those past the resumed step that an earlier start had reached.
    reached_before = [s.reached["step"] for s in earlier if s.reached is not None]
    start.recomputed_steps = max(0, max(reached_before, default=0) - start.resumed)
    trained = start.reached["step"] - start.resumed if start.reached is not None else 0
    share = min(1.0, start.recomputed_steps / trained) if trained > 0 else 0.0
    seconds["recomputed"] = training * share
    seconds["kept"] = training - seconds["recomputed"]
    if earlier and earlier[-1].end is not None:
        seconds["queue"] = max(0.0, start.begin - earlier[-1].end)
    known = sum(v for k, v in seconds.items() if k != "queue")
    seconds["unaccounted"] = max(0.0, (start.end - start.begin) - known)


def _timed(record: dict[str, Any]) -> bool:
    duration = _number(record.get("s"))
    return _number(record.get("time")) is not None and duration is not None and duration >= 0


def _overlap(spans: list[tuple[float, float]], begin: float, end: float) -> float:
    """Seconds of `spans` (which do not overlap one another) inside [begin, end]."""
    return sum(max(0.0, min(b, end) - max(a, begin)) for a, b in spans)


def _first(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for r in records:
        if r["event"] == name and _number(r.get("time")) is not None:
            return r
    return None


# ----------------------------------------------------------------------------- a sweep


def sweep_hours(run_dirs: list[Path], use_sacct: bool = True) -> dict[str, Any]:
    """Every run's ledger and the sweep's totals."""
    runs = [hours(d, use_sacct) for d in run_dirs if RunDir(d).events.exists()]
    total = {k: round(sum(r["node_seconds"][k] for r in runs), 3) for k, _ in CATEGORIES}
    whole = sum(total.values())
    return {
        "runs": runs,
        "node_seconds": total,
        "node_seconds_total": round(whole, 3),
        "goodput": round(total["kept"] / whole, 4) if whole > 0 else None,
    }


# ----------------------------------------------------------------------------- output


def _cell(node_seconds: float) -> str:
    return f"{node_seconds:,.1f}"


def render(ledger: dict[str, Any]) -> list[str]:
    """One run's ledger as a table: node-seconds per category, per start and in total."""
    starts = ledger["starts"]
    whole = ledger["node_seconds_total"]
    nodes = sorted({s["nodes"] for s in starts})
    lines = [
        f"{ledger['run_dir']}: {len(starts)} start(s) on {'/'.join(map(str, nodes)) or '?'} "
        f"node(s), {_cell(whole)} node-seconds ({whole / 3600:.3f} node-hours); "
        f"Slurm's view: {ledger['slurm']}"
    ]
    lines += [
        f"  warning: {problem} (its time counts as unaccounted)" for problem in ledger["damaged"]
    ]
    if not starts:
        return [*lines, "  no start recorded yet"]
    heads = [f"start {s['start']}" for s in starts] + ["total", "share"]
    width = max(11, *(len(_cell(v)) + 2 for v in ledger["node_seconds"].values()))
    lines.append(f"  {'node-seconds':<28}" + "".join(f"{h:>{width}}" for h in heads))
    for key, name in CATEGORIES:
        cells = [_cell(s["node_seconds"][key]) for s in starts]
        total = ledger["node_seconds"][key]
        share = f"{100 * total / whole:.1f}%" if whole > 0 else "-"
        row = "".join(f"{c:>{width}}" for c in [*cells, _cell(total), share])
        lines.append(f"  {name:<28}{row}")
    totals = [_cell(s["node_seconds_total"]) for s in starts] + [_cell(whole), "100%"]
    lines.append(f"  {'total':<28}" + "".join(f"{c:>{width}}" for c in totals))
    goodput = ledger["goodput"]
    lines.append(
        "  goodput (kept training / total): "
        + (f"{100 * goodput:.1f}%" if goodput is not None else "-")
    )
    for s in starts:
        reached = s["reached"] if s["reached"] is not None else "?"
        said = f"  start {s['start']}: steps {s['resumed_at']} to {reached}"
        if s["recomputed_steps"]:
            said += f", {s['recomputed_steps']} of them trained again"
        lines.append(said + "".join(f"; {n}" for n in s["notes"]))
    return lines


def render_sweep(sweep: dict[str, Any]) -> list[str]:
    """A sweep's runs, one line each, and its totals per category."""
    whole = sweep["node_seconds_total"]
    lines = [
        f"{len(sweep['runs'])} run(s), {_cell(whole)} node-seconds ({whole / 3600:.3f} node-hours)"
    ]
    for run in sweep["runs"]:
        good = f"{100 * run['goodput']:.1f}%" if run["goodput"] is not None else "-"
        lines.append(
            f"  {run['run_dir']}: {len(run['starts'])} start(s), "
            f"{_cell(run['node_seconds_total'])} node-seconds, goodput {good}"
        )
    for key, name in CATEGORIES:
        total = sweep["node_seconds"][key]
        share = f"{100 * total / whole:.1f}%" if whole > 0 else "-"
        lines.append(f"  {name:<28}{_cell(total):>14}{share:>8}")
    good = f"{100 * sweep['goodput']:.1f}%" if sweep["goodput"] is not None else "-"
    lines.append(f"  goodput (kept training / total): {good}")
    return lines


def plot(bars: list[tuple[str, dict[str, float]]], out: Path, title: str) -> Path:
    """A stacked bar of node-seconds per category for each (label, node_seconds)."""
    from cifar_job.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(bars) + 3), 4.5))
    bottoms = [0.0] * len(bars)
    labels = [label for label, _ in bars]
    for key, name in CATEGORIES:
        heights = [ns.get(key, 0.0) for _, ns in bars]
        ax.bar(labels, heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("node-seconds")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, out)
