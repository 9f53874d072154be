"""What a start records for `cifar-job hours` (ledger.py reads it), as it happens.

The event log, <run_dir>/events.jsonl: one JSON object a line, appended and fsynced (a kill
at any moment loses at most the line being written; readers skip a damaged line). Rank 0
records, with the wall-clock time:

- `start`: the process's own start (from /proc, so the interpreter and imports count), the
  allocation's start as Slurm gives it, the nodes, the step it resumes from, and the step
  and time the previous start last reached (read from reached.bin, below);
- `data` once the data is in memory, `train` when training begins, `first_step`
  (phases.py); `load` and `save`, with their durations (checkpoints.py); `eval`, with its
  duration, per validation or test;
- `signal` when a stop signal arrives (the watchdog's thread sees it at once), `hang` with
  the time without progress, `exit` and `end` as the process ends.

The last step a start completed must be known exactly even after a SIGKILL, to count the
steps the next start trains again: rank 0 writes it, with its time, into a memory-mapped
16-byte file, reached.bin, at every step (StepCounter: a store to memory, no system call).
The kernel keeps the page when the process dies; the next start reads it before training.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

from cifar_job.rundir import RunDir

_COUNTER = struct.Struct("<qd")  # the last completed step and its wall-clock time


def record(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event; never raises for a filesystem that cannot take it."""
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n"
    try:
        with open(RunDir(run_dir).events, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def read(run_dir: Path, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """Every whole event, oldest first; the numbers of the lines that are not one (a line
    a kill cut short, or damage) go into `damaged`."""
    try:
        lines = RunDir(run_dir).events.read_text(errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            events.append(event)
        elif damaged is not None:
            damaged.append(number)
    return events


# ----------------------------------------------------------------------------- reached.bin


def process_started() -> float:
    """This process's start, wall clock (Linux's /proc; elsewhere now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StepCounter:
    """reached.bin: the last completed step and when, written at every step through a
    memory map (a few hundred nanoseconds), read by the next start and by `hours`."""

    def __init__(self, run_dir: Path) -> None:
        path = RunDir(run_dir).reached
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, _COUNTER.size)
            self.map = mmap.mmap(fd, _COUNTER.size)
        finally:
            os.close(fd)

    def write(self, step: int) -> None:
        _COUNTER.pack_into(self.map, 0, step, time.time())

    def close(self) -> None:
        self.map.close()


def read_reached(run_dir: Path) -> dict[str, Any] | None:
    """The step the newest start last completed and its time, or None."""
    try:
        data = RunDir(run_dir).reached.read_bytes()
        step, when = _COUNTER.unpack(data[: _COUNTER.size])
    except (OSError, struct.error):
        return None
    return {"step": step, "time": when} if when > 0 else None
