"""The run directory's one owner: the name of every file in it, the lease, and the store
of checkpoints. Its writes are atomic (config.write_atomic: a temporary name unique to the
host, process and thread, then a rename).

The lease: one job writes a run directory at a time.

Two writers of one run directory overwrite each other's checkpoints and delete each other's
temporary files: a sweep element resubmitted while it still runs, a rerun by hand while the
job runs, two nodes' jobs pointed at one directory. The first start takes `lease.json`,
naming its holder: the Slurm job (every start and rank of one job is the same holder, so a
requeued job takes its own lease back) or, outside Slurm, the host and process of the run.
The holder refreshes it while it runs and gives it up when it ends. Another writer is refused
with a message that names the holder, unless the lease is stale: its process is gone (same
host), or nobody has refreshed it for LEASE_TTL_S (a job that was killed, a node lost). A
stale lease is taken over, and the takeover is said.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cifar_job import CifarJobError
from cifar_job.config import write_atomic, write_json
from cifar_job.slurm import job_id, local_start

# Every file of a run directory, named once. (The checkpoint store's are below; ModelCheckpoint
# names best-epochNNN.ckpt; Lightning's loggers write logs/ and tensorboard/.)
CONFIG = "config.json"  # the resolved config, rewritten by each start
MANIFEST = "manifest.json"  # version, each start, the final metrics
RESULTS = "results.json"  # the final test metrics: the run has finished
DECISION = "decision.json"  # how the last start ended, for the batch script (requeue.sh)
EVENTS = "events.jsonl"  # each start, its end, hangs: appended
HEARTBEATS = "heartbeats"  # each rank's last heartbeat (watchdog.py)
HANG_RECORD = "hang.json"  # the last hang: every rank's heartbeat, the one that stopped
HANG_CLAIM = "hang.claim"  # the rank that acts on a hang (one per start) created it
REACHED = "reached.bin"  # the last completed step and its time (ledger.py)
LOGS = "logs"  # one CSV of metrics per start: logs/version_N/metrics.csv
CURVES = "curves.png"  # cifar-job plot
TRACKING = "tracking.json"  # the MLflow server and run this run logs to (tracking.py)
TRACKING_SPOOL = "tracking-metrics.jsonl"  # what it logged, appended; sent from there
LEASE = "lease.json"
# The holder refreshes every LEASE_REFRESH_S; a lease this old has no live holder (8 missed
# refreshes: a slow shared filesystem is no reason to take over a running job, and a killed
# container, whose successor has another host name, waits no longer than this).
LEASE_REFRESH_S, LEASE_TTL_S = 15.0, 120.0


def holder_name() -> str:
    """Who this process writes for: its Slurm job (array task included), or, outside Slurm,
    the host and the process that started the run (Lightning's local ranks inherit it)."""
    if job := job_id():
        return f"Slurm job {job}"
    host, _, pid = local_start().rpartition(".")
    return f"process {pid} on {host}"


class Lease:
    """This run's claim on its run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEASE
        self.holder = holder_name()
        self.held = False
        self.refreshed = 0.0

    def acquire(self) -> str | None:
        """Take the lease, or raise CifarJobError naming its live holder. Returns a line to
        print when a stale lease was taken over, else None."""
        took_over = None
        current = self.read()
        if current is not None and current.get("holder") != self.holder:
            stale = self.stale(current)
            if stale is None:
                age = time.time() - float(current.get("refreshed", 0))
                raise CifarJobError(
                    f"{self.path.parent} is in use by {current.get('holder')} (host "
                    f"{current.get('host')}, pid {current.get('pid')}, since "
                    f"{current.get('since')}, alive {age:.0f} s ago): a second writer would "
                    "overwrite its checkpoints. Wait for it to end, stop it, or give another "
                    f"--run-dir. If it is gone for sure (a killed container), delete {self.path}; "
                    f"a lease nobody refreshes is taken over after {LEASE_TTL_S:.0f} s."
                )
            took_over = f"{self.path.parent}: taking over from {current.get('holder')} ({stale})"
        self.write(since=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if (self.read() or {}).get("holder") != self.holder:  # another taker came in between
            raise CifarJobError(f"{self.path.parent} was taken by another run as this one started")
        self.held = True
        return took_over

    def stale(self, lease: dict[str, Any]) -> str | None:
        """Why a lease of another holder is stale, or None while that holder may be alive."""
        age = time.time() - float(lease.get("refreshed", 0))
        if lease.get("host") == socket.gethostname() and not lease.get("job"):
            try:
                os.kill(int(lease.get("pid", 0)), 0)
            except ProcessLookupError:
                return f"its process {lease.get('pid')} is gone"
            except (PermissionError, ValueError):
                pass
        if age > LEASE_TTL_S:
            return f"not refreshed for {age:.0f} s"
        return None

    def refresh(self) -> None:
        """Say the holder is alive (from the watchdog's thread), every LEASE_REFRESH_S."""
        if self.held and time.monotonic() - self.refreshed >= LEASE_REFRESH_S:
            try:
                current = self.read() or {}
                self.write(since=current.get("since"))
            except OSError:
                pass  # a stalled filesystem: the next refresh tries again

    def release(self) -> None:
        """Give the lease up, if this run still holds it."""
        if self.held and (self.read() or {}).get("holder") == self.holder:
            self.path.unlink(missing_ok=True)
        self.held = False

    def read(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def write(self, since: str | None) -> None:
        write_json(
            self.path,
            {
                "holder": self.holder,
                "job": os.environ.get("SLURM_JOB_ID"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": since,
                "refreshed": time.time(),
            },
        )
        self.refreshed = time.monotonic()


# ----------------------------------------------------------------------------- checkpoints

# Checkpoints are immutable files named by their step. `latest` names the newest whole one and
# is replaced only after that file and the directory are on disk; `last.ckpt` is a link to
# it, for people and commands that take a file. Retention keeps the newest `keep` step files
# (ModelCheckpoint keeps the best one, best-epochNNN.ckpt, itself).
LATEST = "latest"
LAST = "last.ckpt"
STEP_FILES = "step-*.ckpt"


def step_file(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable, where the OS allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse to fsync a directory: the rename still happened
    finally:
        os.close(fd)


class CheckpointStore:
    """The run directory's checkpoints: step-numbered files, the `latest` pointer, retention."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.run_dir, self.keep = run_dir, max(keep, 1)

    def path_for(self, step: int) -> Path:
        return self.run_dir / step_file(step)

    def steps(self) -> list[Path]:
        """The step files, newest first."""
        return sorted(self.run_dir.glob(STEP_FILES), key=lambda p: p.name, reverse=True)

    def latest(self) -> Path | None:
        """The file `latest` names, or None if it is missing, damaged or names no file."""
        try:
            name = (self.run_dir / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        path = self.run_dir / name
        if "/" in name or not name.startswith("step-") or not path.is_file():
            return None
        return path

    def candidates(self) -> list[Path]:
        """Where to resume from, in order: `latest`'s file, then the step files newest
        first (a damaged pointer, or a newest file cut short)."""
        found = self.steps()
        if (latest := self.latest()) is not None:
            found = [latest, *(p for p in found if p != latest)]
        return found

    def commit(self, path: Path) -> None:
        """Make `path`, just written whole, the one to resume from; then apply retention."""
        fsync_dir(self.run_dir)  # the file's rename first, then the pointer to it
        write_atomic(self.run_dir / LATEST, path.name + "\n")
        link = self.run_dir / f".{LAST}.{socket.gethostname()}.{os.getpid()}.tmp"
        link.unlink(missing_ok=True)
        os.symlink(path.name, link)
        os.replace(link, self.run_dir / LAST)
        fsync_dir(self.run_dir)
        for old in self.steps()[self.keep :]:
            if old != path:
                old.unlink(missing_ok=True)
