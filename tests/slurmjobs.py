"""Helpers for tests on the local Slurm cluster (tests/cluster/start.sh): submit as a user
would, wait for jobs and log lines, read checkpoints, check that nothing is left running."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO

# 1,000 training images in global batches of 40: 25 optimizer steps per epoch on any layout.
TRAIN = [
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "1200",
    "--val-size",
    "200",
    "--arch",
    "resnet18",
    "--stem",
    "imagenet",
    "--batch-size",
    "40",
    "--lr",
    "0.05",
    "--log-every-n-steps",
    "1",
]
STEPS_PER_EPOCH = 25
ONE_NODE_TWO_TASKS = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
RUN = [*TRAIN, "--max-epochs", "2", "--deterministic"]
TOTAL = 2 * STEPS_PER_EPOCH
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
TEMPLATE = str(REPO / "slurm/ddp_4gpu.sh")
MULTINODE = str(REPO / "slurm/ddp_multinode.sh")
# `cifar-job submit` of a 2-node job, one CPU task per node, for 10 minutes at most.
SUBMIT_TWO_NODES = [
    *("submit", "--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1"),
    *("--time", "10"),
]


def job_env(**extra: str) -> dict[str, str]:
    """What a user's login shell has: the venv's cifar-job on PATH (sbatch exports it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {
        **os.environ,
        "PATH": path,
        "PYTHONUNBUFFERED": "1",
        "CIFAR_JOB_HOME": str(REPO),
        "ACCELERATOR": "cpu",
        **extra,
    }


# An ordinary user, as jobs run on a site (tests/cluster/start.sh makes it): not root, and
# a home directory that does not exist, so nothing may write there. Its jobs run with a
# site's stricter umask.
USER = "cifarjob"
USER_UMASK = 0o027


def as_user(path: Path) -> None:
    """Give a test's directory, and what it holds, to USER, and let USER through its
    parents, as a site's project directory would be. USER runs this venv's Python too: where
    it lives under a directory only root may enter (pyenv's, in /root), that directory is
    opened to be passed through (not listed or read)."""
    pw = pwd.getpwnam(USER)
    for p in [path, *path.rglob("*")]:
        os.lchown(p, pw.pw_uid, pw.pw_gid)
    python = Path(os.path.realpath(sys.executable))
    let_through([*path.parents, *python.parents, *REPO.parents])


def let_through(dirs: list[Path]) -> None:
    """Let every user pass through dirs (o+x), not list or read them."""
    for d in dirs:
        d.chmod(d.stat().st_mode | 0o001)


def readable_by_user(path: Path) -> Path:
    """Let USER read path and what it holds, as a site's shared dataset; returns path."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o005 if p.is_dir() else 0o004))
    let_through(list(path.parents))
    return path


def user_command(*cmd: str) -> list[str]:
    """cmd run as USER, with its own groups."""
    pw = pwd.getpwnam(USER)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *cmd]


def run_as_user(*cmd: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """cmd run from cwd (given to USER) as USER would run it: USER's HOME, the venv's
    cifar-job on PATH, umask USER_UMASK."""
    as_user(cwd)
    pw = pwd.getpwnam(USER)
    return subprocess.run(
        user_command(*cmd),
        cwd=cwd,
        env=job_env(HOME=pw.pw_dir, USER=USER, LOGNAME=USER, **env),
        capture_output=True,
        text=True,
        umask=USER_UMASK,
    )


def assert_owned_by_user(run_dir: Path) -> None:
    """Every file and directory the job wrote belongs to USER, and none gives more than the
    umask allows."""
    uid = pwd.getpwnam(USER).pw_uid
    for p in [run_dir, *run_dir.rglob("*")]:
        st = p.lstat()
        assert st.st_uid == uid, f"{p} belongs to uid {st.st_uid}"
        if not p.is_symlink():
            assert not st.st_mode & USER_UMASK, f"{p}: mode {oct(st.st_mode)}"


def sbatch(*args: str, cwd: Path, as_ordinary_user: bool = False, **env: str) -> str:
    """Submit as a user would, from cwd; returns the job id. as_ordinary_user: as USER."""
    if as_ordinary_user:
        out = run_as_user("sbatch", "--parsable", *args, cwd=cwd, **env)
        assert out.returncode == 0, out.stderr
    else:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env=job_env(**env),
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return out.stdout.split("JobState=")[1].split()[0] if "JobState=" in out.stdout else "GONE"


def wait_done(job_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.25)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout} s")


def wait_for_text(path_glob: str, base: Path, text: str, timeout: float = 180) -> None:
    wait_for_log(path_glob, base, lambda log: text in log, repr(text), timeout)


def wait_for_step(path_glob: str, base: Path, step: int, after: str, timeout: float = 180) -> None:
    """Wait until a log shows training at `step` or later, past the last line holding `after`
    (a start that resumed beyond `step` counts as soon as it trains)."""

    def reached(log: str) -> bool:
        log = log[log.rindex(after) :] if after in log else ""
        return any(int(n) >= step for n in re.findall(r" step (\d+)/", log))

    wait_for_log(path_glob, base, reached, f"step {step} after {after!r}", timeout)


def wait_for_log(
    path_glob: str, base: Path, found: Callable[[str], bool], what: str, timeout: float
) -> None:
    """Poll the logs matching path_glob until one satisfies `found`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(found(p.read_text(errors="replace")) for p in base.glob(path_glob)):
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} never appeared in {base}/{path_glob}")


def ckpt_step(run_dir: Path) -> int:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def assert_no_rank_left(run_dir: Path) -> None:
    """No process of the run survives its job (Slurm reaps a finished step within seconds)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"processes still running for {run_dir}: {out.stdout}")


def preempt(cwd: Path) -> str:
    """A job in the `high` partition that needs both nodes whole: Slurm preempts `low`.
    Returns its job id."""
    return sbatch(
        "-p", "high", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1", cwd=cwd
    )


def seconds_to_start(job_id: str) -> int:
    """How long the job waited from its submission to its start (whole seconds, as Slurm
    keeps them): for a `preempt` job, the time until the preempted job gave its nodes up."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    times = dict(re.findall(r"(SubmitTime|StartTime)=(\S+)", out.stdout))
    submit, start = (
        time.mktime(time.strptime(times[k], "%Y-%m-%dT%H:%M:%S"))
        for k in ("SubmitTime", "StartTime")
    )
    return int(start - submit)


def saved_steps(log: str) -> list[int]:
    """The steps the ranks saved at on each stop, in order (every rank reports the same)."""
    steps = [int(s) for s in re.findall(r"SIGTERM: saved \S+last\.ckpt at step (\d+)", log)]
    return sorted(set(steps))


def manifest_starts(run_dir: Path) -> list[dict]:
    """What manifest.json records of each start of the run."""
    return json.loads((run_dir / "manifest.json").read_text())["starts"]


def resumed_steps(run_dir: Path) -> list[int | None]:
    return [s["step"] for s in manifest_starts(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@dataclass
class Uninterrupted:
    """A run trained whole by a template: the weights every stopped run must end with, and
    the run itself, which is also the template's own test (see the first tests below)."""

    weights: dict[str, torch.Tensor]
    run_dir: Path
    log: str
    job: str


def assert_same_weights(run_dir: Path, reference: Uninterrupted) -> None:
    got, expected = weights(run_dir), reference.weights
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert got.keys() == expected.keys() and not different, f"{len(different)} tensors differ"


def uninterrupted(tmp: Path, *layout_and_template: str) -> Uninterrupted:
    """The training run whole, in the never-preempted `debug` partition."""
    job = sbatch(*layout_and_template, *RUN, cwd=tmp, RUN_DIR=str(tmp / "run"))
    log = (tmp / f"slurm-cifar-job-{job}.out").read_text
    assert wait_done(job) == "COMPLETED", log()
    assert ckpt_step(tmp / "run") == TOTAL
    return Uninterrupted(weights(tmp / "run"), tmp / "run", log(), job)


def last_step_of_start(log: str, start: int) -> int:
    """The last training step a start's log shows (rank 0 prints every step here)."""
    begin = log.index(f"start {start} on")
    end = log.find(f"start {start + 1} on", begin)
    return max(int(s) for s in re.findall(r" step (\d+)/", log[begin : end if end > 0 else None]))


def ledger(run_dir: Path, *extra: str) -> dict:
    """`cifar-job hours --json`, as a user runs it on the login node."""
    out = subprocess.run(
        [sys.executable, "-m", "cifar_job", "hours", str(run_dir), "--json", *extra],
        capture_output=True,
        text=True,
        env=job_env(),
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sacct_allocations(job: str) -> list[tuple[float, float, int]]:
    """The job's allocations as Slurm's accounting has them, oldest first: (start, end,
    nodes), a RESIZING record (a --no-kill job that lost a node) joined to the one after it
    with the nodes it began with. Waits until the last one's end has reached the database."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            ["sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "Start,End,NNodes,State"],
            capture_output=True,
            text=True,
        )
        rows = [line.split("|") for line in out.stdout.split()]
        if rows and all(r[1] not in ("Unknown", "None") for r in rows):
            break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.5)

    def seconds(text: str) -> float:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))

    found: list[tuple[float, float, int]] = []
    resizing = False
    for a, b, n, state in sorted(rows):
        if resizing and found[-1][1] == seconds(a):  # the same allocation, after a lost node
            found[-1] = (found[-1][0], seconds(b), found[-1][2])
        else:
            found.append((seconds(a), seconds(b), int(n)))
        resizing = state == "RESIZING"
    return found


def assert_ledger_agrees_with_sacct(run_dir: Path, job: str) -> dict:
    """The run's ledger against Slurm's accounting: one start per allocation, the queue wait
    before each start to the second, every category adding up to the allocations and waits
    within 1%, and little left unaccounted. Returns the ledger."""
    allocations = sacct_allocations(job)
    found = ledger(run_dir)
    assert found["slurm"] == "sacct", found["slurm"]
    starts = found["starts"]
    assert len(starts) == len(allocations), (starts, allocations)
    whole = 0.0
    for i, (start, (begin, end, nodes)) in enumerate(zip(starts, allocations)):
        assert start["nodes"] == nodes
        wait = (begin - allocations[i - 1][1]) * nodes if i else 0.0
        assert abs(start["node_seconds"]["queue"] - wait) <= nodes, (i, start, wait)
        whole += (end - begin) * nodes + wait
    assert found["node_seconds_total"] == pytest.approx(whole, rel=0.01, abs=nodes)
    assert sum(found["node_seconds"].values()) == pytest.approx(
        found["node_seconds_total"], abs=0.05
    )
    assert found["node_seconds"]["unaccounted"] <= 0.1 * whole, found
    return found


def tcp_peers(pid: int) -> set[tuple[str, str]]:
    """(local address, remote address) of the process's established TCP connections, as its
    own network namespace sees them (/proc/PID/net/tcp)."""

    def address(hex_port: str) -> str:
        ip = hex_port.split(":")[0]
        return ".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0))

    peers = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01":  # ESTABLISHED
            peers.add((address(fields[1]), address(fields[2])))
    return peers


def task_pid(job: str, rank: int) -> int:
    """The process of one training rank of a job, found by the variables Slurm gave it."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in env
            and f"SLURM_PROCID={rank}".encode() in env
            and b"train" in cmdline
            and b"srun" not in cmdline
        ):
            return int(proc.name)
    raise AssertionError(f"no rank {rank} of job {job} is running")
