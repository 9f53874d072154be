"""The run's event log: <run_dir>/events.jsonl, one JSON object a line, appended and flushed
as things happen (a start, its end and why, a hang). Append-only, so a kill at any moment
loses at most the line being written; readers skip a damaged line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cifar_job.rundir import EVENTS


def record(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event; never raises for a filesystem that cannot take it."""
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n"
    try:
        with open(run_dir / EVENTS, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def read(run_dir: Path, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """Every whole event, oldest first; the numbers of the lines that are not one (a line
    a kill cut short, or damage) go into `damaged`."""
    try:
        lines = (run_dir / EVENTS).read_text(errors="replace").splitlines()
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
