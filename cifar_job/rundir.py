"""The run directory's one owner: the name of every file in it, the one atomic write and
its JSON, the lease, and the store of checkpoints. `RunDir` is a run directory: the commands
that read a run (status, hours, plot, compare) open one with `RunDir.existing`, which
refuses a directory that is not a run; nothing else spells a file name of it
(tests/test_rundir.py checks the package for them).

Every write is atomic and durable (write_atomic): a temporary name unique to the host,
process and thread (every rank of every node writes into one shared directory, and two
nodes' processes may share a pid), write, flush, fsync, rename, fsync of the directory. A
rename can reach the disk before the data it names: without the first fsync a node that
loses power can leave config.json, the manifest, the decision or the lease empty.

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
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cifar_job import CifarJobError

# Every file of a run directory, named once: the attribute of RunDir, and its name.
FILES = {
    "config": "config.json",  # the resolved config, rewritten by each start
    "manifest": "manifest.json",  # version, each start, the final metrics
    "results": "results.json",  # the final test metrics: the run has finished
    "decision": "decision.json",  # how the last start ended (the job log quotes it)
    "decision_env": "decision.env",  # the same as KEY=value lines: what requeue.sh reads
    "requeue_log": "requeues.log",  # a line per requeue and relaunch of requeue.sh's
    "events": "events.jsonl",  # each start, its phases, its end, hangs: appended
    "heartbeats": "heartbeats",  # each rank's last heartbeat (watchdog.py): rank-N.json
    "hang_record": "hang.json",  # the last hang: every rank's heartbeat, the one that stopped
    "hang_claim": "hang.claim",  # the rank that acts on a hang (one per start) created it
    "reached": "reached.bin",  # the last completed step and its time (events.py)
    "logs": "logs",  # one CSV of metrics per start: logs/version_N/metrics.csv
    "tensorboard": "tensorboard",  # --tensorboard
    "curves": "curves.png",  # cifar-job plot
    "compare": "compare.png",  # cifar-job compare --plot, in the first run directory
    "tracking": "tracking.json",  # the MLflow server and run this run logs to (tracking.py)
    "tracking_spool": "tracking-metrics.jsonl",  # what it logged, appended; sent from there
    "sweep_plan": "sweep.json",  # a sweep's directory: its grid and elements (sweep.py)
    "submitit": "submitit",  # cifar-job submit: submitit's scripts and the jobs' logs
    "lease": "lease.json",  # who writes the run directory now
}
BEST = "best-epoch{epoch:03d}"  # ModelCheckpoint's name for the best epoch's checkpoint
# The holder refreshes every LEASE_REFRESH_S; a lease this old has no live holder (8 missed
# refreshes: a slow shared filesystem is no reason to take over a running job, and a killed
# container, whose successor has another host name, waits no longer than this).
LEASE_REFRESH_S, LEASE_TTL_S = 15.0, 120.0


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this host, process and thread."""
    host, pid, thread = socket.gethostname(), os.getpid(), threading.get_ident()
    return path.with_name(f".{path.name}.{host}.{pid}.{thread}.tmp")


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


def write_atomic(
    path: Path,
    data: str | bytes | Callable[[IO[bytes]], None],
    durable: bool = True,
    still_valid: Callable[[], bool] | None = None,
) -> bool:
    """Replace path's content at once: a reader sees the old file or the new one, whole.

    `data` is text, bytes, or a function that writes to the open file (torch.save). With
    `durable` (the default) the data is fsynced before the rename, and the directory after
    it. `still_valid`, asked once the file is whole, may say that what was written is no
    longer one state: the file then goes and False is returned. The file's mode follows the
    umask, as any new file's."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if still_valid is not None and not still_valid():
            return False
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any, indent: int | None = 2, durable: bool = True) -> None:
    """Write JSON atomically (write_atomic)."""
    write_atomic(path, json.dumps(data, indent=indent) + "\n", durable=durable)


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run directory; a damaged one is an error that names it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CifarJobError(
            f"{path} is damaged ({e}); it holds {what}. Restore it from a copy, or move it "
            "away to carry on without it."
        ) from None


# The decision's keys that the batch script (requeue.sh) reads from decision.env, and the
# characters their values may hold there: it reads the file line by line, never sources it.
DECISION_KEYS = ("action", "saved", "step", "exclude", "lost")
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:@\[\]-]*")


def decision_env(decision: dict[str, Any]) -> str:
    """The decision as the batch script reads it: KEY=value lines, booleans as 1 or 0, one
    line per key it knows (a value it could misread is refused)."""
    lines = []
    for key in DECISION_KEYS:
        value = decision.get(key)
        if value is None:
            continue
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if not SAFE_VALUE.fullmatch(text):
            raise ValueError(f"decision {key}={text!r}: not a value the batch script reads")
        lines.append(f"{key}={text}\n")
    return "".join(lines)


def write_decision(run_dir: Path, decision: dict[str, Any]) -> None:
    """How this start ends, for the batch script: decision.env (what it reads), then
    decision.json (what the job log quotes), each atomically."""
    run = RunDir(run_dir)
    write_atomic(run.decision_env, decision_env(decision))
    write_json(run.decision, decision, indent=None)  # one line: the job log quotes it


def clear_decision(run_dir: Path) -> None:
    """Remove an earlier start's decision."""
    run = RunDir(run_dir)
    for path in (run.decision_env, run.decision):
        path.unlink(missing_ok=True)


class RunDir:
    """A run directory: the path of each of its files (an attribute per FILES entry)."""

    config: Path
    manifest: Path
    results: Path
    decision: Path
    decision_env: Path
    requeue_log: Path
    events: Path
    heartbeats: Path
    hang_record: Path
    hang_claim: Path
    reached: Path
    logs: Path
    tensorboard: Path
    curves: Path
    compare: Path
    tracking: Path
    tracking_spool: Path
    sweep_plan: Path
    submitit: Path
    lease: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)  # a RunDir too: it is a path-like object
        for attribute, name in FILES.items():
            setattr(self, attribute, self.path / name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        """The directory, wherever a path is taken (Path(run_dir), open, Lightning's dirpath)."""
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def heartbeat(self, rank: int) -> Path:
        """Rank `rank`'s heartbeat file."""
        return self.heartbeats / f"rank-{rank:05d}.json"

    def heartbeat_files(self) -> list[Path]:
        """Every rank's heartbeat file."""
        return sorted(self.heartbeats.glob("rank-*.json"))

    def metrics_files(self) -> list[Path]:
        """The CSV logs of every start, oldest first (logs/version_N/metrics.csv)."""
        paths = self.logs.glob("version_*/metrics.csv")
        return sorted(paths, key=lambda p: int(p.parent.name.removeprefix("version_")))

    def is_run(self) -> bool:
        """Whether a run has started here (a start writes its config and events first)."""
        return self.path.is_dir() and any(
            p.exists() for p in (self.manifest, self.events, self.config)
        )

    def is_sweep(self) -> bool:
        """Whether this is a sweep's directory (`submit --sweep` wrote its plan)."""
        return self.sweep_plan.is_file()

    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        """The run directory of `train`: made if missing, and checked to be writable by
        this process before anything slow."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise CifarJobError(f"--run-dir {run.path} is a file; give a directory")
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = temp_path(run.path / ".write-test")
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CifarJobError(f"--run-dir {run.path} cannot be written: {e.strerror}") from None
        return run

    @classmethod
    def existing(cls, path: str | Path, sweep_ok: bool = True) -> RunDir:
        """The run directory at `path`, for a command that reads one: a directory that is
        not a run (nor, with `sweep_ok`, a sweep's) is refused with one line naming it."""
        run = cls(path)
        if not run.path.exists():
            raise CifarJobError(f"{run.path} does not exist")
        if not run.path.is_dir():
            raise CifarJobError(f"{run.path} is a file, not a run directory")
        if not (run.is_run() or (sweep_ok and run.is_sweep())):
            kinds = "a run directory" + (" or a sweep's" if sweep_ok else "")
            has_no = f"{run.manifest.name}, {run.events.name} or {run.config.name}"
            if sweep_ok:
                has_no += f" (nor {run.sweep_plan.name})"
            raise CifarJobError(
                f"{run.path} is not {kinds}: it has no {has_no}. Give the --run-dir of a run "
                "that started."
            )
        return run

    def read(self, path: Path, what: str, default: Any = None) -> Any:
        """One of its JSON files, or `default` where it is missing; a damaged one is an
        error that names it."""
        return read_json(path, what) if path.exists() else default


class Lease:
    """This run's claim on its run directory."""

    def __init__(self, run_dir: RunDir | Path, holder: str, job: str | None = None) -> None:
        """`holder` names who writes (slurm.holder_name: the Slurm job, or the process that
        started a local run); `job`, the Slurm job, if any."""
        self.path = RunDir(run_dir).lease
        self.holder, self.job = holder, job
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
                "job": self.job,
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


class CheckpointStore:
    """The run directory's checkpoints: step-numbered files, the `latest` pointer, retention."""

    def __init__(self, run_dir: RunDir | Path, keep: int = 2) -> None:
        self.run_dir, self.keep = Path(run_dir), max(keep, 1)

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

    def leftovers(self) -> list[Path]:
        """The temporary files of checkpoint writes that a kill interrupted (temp_path's)."""
        return list(self.run_dir.glob(".*.ckpt.*.tmp"))

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
        link = temp_path(self.run_dir / LAST)
        link.unlink(missing_ok=True)
        os.symlink(path.name, link)
        os.replace(link, self.run_dir / LAST)
        fsync_dir(self.run_dir)
        for old in self.steps()[self.keep :]:
            if old != path:
                old.unlink(missing_ok=True)
