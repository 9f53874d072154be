"""`cifar-job hours`: where a run's node-hours went. Here without Slurm (the cluster tests
check the same ledger against `sacct`): the steps a start trains again after a SIGKILL are
counted exactly, every second of a start lands in one category, and damaged or missing
records are unaccounted time, never a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, cifar_job

from cifar_job import events
from cifar_job.ledger import CATEGORIES, hours

# 600 training images in batches of 40: 15 steps an epoch.
ARGS = [
    *("train", "--dataset", "synthetic", "--synthetic-size", "700", "--val-size", "100"),
    *("--batch-size", "40", "--max-epochs", "1", *FAST, "--log-every-n-steps", "1"),
]


def ledger(run_dir: Path, *extra: str) -> dict:
    out = cifar_job("hours", str(run_dir), "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_killed_start_counts_the_steps_the_next_one_trains_again(tmp_path):
    """The process stops itself mid-step 9 (after step 8) and is killed there with SIGKILL,
    as an OOM kill would: no word from it. The rerun resumes from the last periodic save;
    the ledger counts exactly the steps between that save and step 8 as trained again, and
    splits each start's time into its categories with little left unaccounted."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CIFAR_JOB_FAULT": "stop:8"}
    cmd = [sys.executable, "-m", "cifar_job", *ARGS, "--run-dir", str(run_dir)]
    began = time.time()
    proc = subprocess.Popen(
        [*cmd, "--checkpoint-every", "0.01"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "CIFAR_JOB_FAULT: rank 0 stops after step 8" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rerun = cifar_job(*ARGS, "--run-dir", str(run_dir))
    ended = time.time()
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    found = ledger(run_dir)
    first, second = found["starts"]
    resumed = second["resumed_at"]
    assert 0 < resumed <= 8 and first["reached"] == 8 and second["reached"] == 15
    assert second["recomputed_steps"] == 8 - resumed  # exactly the steps the kill lost
    assert first["recomputed_steps"] == 0
    if resumed < 8:
        assert second["node_seconds"]["recomputed"] > 0
    assert found["slurm"].startswith("outside Slurm")
    # Every category adds up to the total, which covers the two processes' lives.
    total = found["node_seconds_total"]
    assert sum(found["node_seconds"].values()) == pytest.approx(total, rel=1e-3)
    assert total <= ended - began + 1
    for start in found["starts"]:
        parts = start["node_seconds"]
        assert parts["kept"] > 0 and parts["startup"] > 0 and parts["checkpoint"] > 0
        # Start 1's unaccounted time: its stopped half-step and the kill, nothing else.
        assert parts["unaccounted"] <= 0.1 * start["node_seconds_total"] + 1.0, start
    assert second["node_seconds"]["evaluation"] > 0
    assert found["goodput"] == pytest.approx(found["node_seconds"]["kept"] / total, abs=1e-3)

    text = cifar_job("hours", str(run_dir), "--plot", str(tmp_path / "hours.png"))
    assert text.returncode == 0, text.stderr
    assert "kept training" in text.stdout and f"start 2: steps {resumed} to 15" in text.stdout
    assert (tmp_path / "hours.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_damaged_or_missing_records_are_unaccounted_never_a_crash(tmp_path):
    """A line cut short by a kill, a start with no end, records with wrong types, an event
    log with no start: the ledger still answers, and what it cannot place is unaccounted."""
    t = 1_800_000_000.0

    def line(**fields) -> str:
        return json.dumps(fields) + "\n"

    (tmp_path / "events.jsonl").write_text(
        line(time=t, event="start", job=None, step=None, nodes=1, process=t - 5)
        + line(time=t + 1, event="train", step=0)
        + line(time=t + 20, event="save", step=40, s="slow")  # a wrong type: skipped
        + line(time=t + 30, event="eval", s=2.0)
        + '{"time": 1800000040.0, "event": "sa'  # cut short by a kill
        + "\n"
        + line(
            time=t + 100,
            event="start",
            job=None,
            step=40,
            nodes="one",  # a wrong type: one node
            process=t + 99,
            reached={"step": "x"},
        )
        + "not json at all\n"
        + line(time=t + 101, event="train", step=40)
        + line(time=t + 160, event="end", reason="finished")
    )
    found = hours(tmp_path)
    first, second = found["starts"]
    # Start 1 has no end and no last step: after its first 1 s of training, unaccounted.
    assert first["node_seconds"]["kept"] == 0
    assert first["node_seconds"]["unaccounted"] > 0
    assert first["node_seconds"]["evaluation"] == 2.0
    # Start 2 has no fit_end either: its training has no known end, so it is unaccounted.
    assert second["node_seconds"]["unaccounted"] > 50
    assert sum(found["node_seconds"].values()) == pytest.approx(
        found["node_seconds_total"], abs=0.05
    )
    assert {k for k, _ in CATEGORIES} == set(found["node_seconds"])

    empty = tmp_path / "empty"
    empty.mkdir()
    events.record(empty, "data")  # no start at all
    assert hours(empty)["starts"] == [] and hours(empty)["goodput"] is None
    out = cifar_job("hours", str(empty))
    assert out.returncode == 0 and "no start recorded yet" in out.stdout, out.stderr
    missing = cifar_job("hours", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_relaunch_in_the_allocation_is_a_start_without_a_queue_wait(tmp_path):
    """A start that the batch script relaunched inside its allocation after a fault: its own
    start in the ledger, beginning where the fault ended the one before, with the time from
    the fault to training again in a category of its own and no queue wait."""
    t = 1_800_000_000.0
    reached = {"step": 12, "time": t + 19.5}
    for fields in [
        dict(event="start", job="5", step=None, nodes=2, process=t - 10, allocated=t - 12),
        dict(event="train", step=0, time=t + 1),
        dict(event="peer-lost", step=12, time=t + 20),
        dict(event="start", job="5", step=12, nodes=2, process=t + 22, relaunch=1, reached=reached),
        dict(event="train", step=12, time=t + 31),
        dict(event="fit_end", step=40, time=t + 60),
        dict(event="end", reason="finished", time=t + 61),
    ]:
        fields.setdefault("time", fields.get("process", t) + 7)
        with open(tmp_path / "events.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")
    found = hours(tmp_path, use_sacct=False)
    first, second = found["starts"]
    assert first["node_seconds_total"] == pytest.approx(2 * (20 - -12))  # to the fault
    assert second["node_seconds"]["recovery"] == pytest.approx(2 * 11)  # the fault to training
    assert second["node_seconds"]["queue"] == 0 and second["node_seconds"]["startup"] == 0
    assert second["recomputed_steps"] == 0
    assert any("relaunch 1 in the allocation" in note for note in second["notes"])


def test_status_tells_each_relaunch_by_its_job_and_number(tmp_path):
    """Relaunch numbers start again in each allocation: a run requeued once has a relaunch 1
    in each job, and `status` gives each its own fault, nodes and seconds."""
    from cifar_job.rundir import RunDir
    from cifar_job.status import relaunches

    t = 1_800_000_000.0
    lines = [
        dict(event="start", job="5", time=t),
        dict(event="peer-lost", step=12, time=t + 20),
        dict(event="start", job="5", step=12, relaunch=1, time=t + 29),
        dict(event="first_step", step=13, time=t + 32.5),
        dict(event="start", job="6", step=30, time=t + 100),  # requeued: a new allocation
        dict(event="fault", kind="kill", step=40, time=t + 120),
        dict(event="peer-lost", step=40, time=t + 120.5),
        dict(event="start", job="6", step=40, relaunch=1, time=t + 130),
        dict(event="first_step", step=41, time=t + 131),
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (tmp_path / "requeues.log").write_text(
        "job 5 2027-01-15T08:00:29 relaunch 1 nodes=n1,n3 left_out=n2 spare=n3\n"
        "job 5 2027-01-15T08:01:00 restart 1\n"
        "job 6 2027-01-15T08:02:10 relaunch 1 nodes=n1,n2 left_out=none spare=none\n"
    )
    first, second = relaunches(RunDir(tmp_path))
    assert first == {
        "relaunch": 1,
        "fault": "peer-lost",
        "step": 12,
        "nodes": "n1,n3",
        "left_out": "n2",
        "spare": "n3",
        "seconds": 12.5,
    }
    assert (second["fault"], second["nodes"], second["left_out"], second["seconds"]) == (
        "fault",
        "n1,n2",
        None,
        11.0,
    )
