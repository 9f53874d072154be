"""The sbatch templates and `cifar-job submit` on a real Slurm cluster (tests/cluster/start.sh):
a time limit mid-epoch that saves, requeues and resumes at the same step, for both launch
paths, and doctor inside an allocation. (The templates' uninterrupted runs are shared with
test_preemption.py, which compares every stopped run with them.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, cifar_job
from slurmjobs import (
    STEPS_PER_EPOCH,
    SUBMIT_TWO_NODES,
    TRAIN,
    assert_no_rank_left,
    ckpt_step,
    job_env,
    sbatch,
    wait_done,
    wait_for_text,
)

from cifar_job.rundir import write_decision

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sbatch_job_preempted_mid_epoch_resumes_at_the_same_step(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
        "--cpus-per-task=1",
        str(REPO / "slurm/ddp_4gpu.sh"),
        *TRAIN,
        "--max-epochs",
        "1",
        cwd=tmp_path,
        RUN_DIR=str(run_dir),
    )
    log_path = tmp_path / f"slurm-cifar-job-{job}.out"
    wait_for_text(log_path.name, tmp_path, f"step 12/{STEPS_PER_EPOCH}")
    # What Slurm does ahead of a time limit with --signal=B:USR1@N: signal the batch shell.
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)
    assert wait_done(job) == "COMPLETED", log_path.read_text()
    log = log_path.read_text()
    assert "requeueing job" in log and "start 2 on" in log, log[-3000:]
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    assert len(starts) == 2 and starts[1]["job_id"] == job, starts
    resumed = starts[1]["step"]
    assert 12 <= resumed < STEPS_PER_EPOCH, starts  # mid-epoch: not scratch, not epoch start
    assert f"saved {run_dir}/last.ckpt at step {resumed}" in log, log[-3000:]
    assert ckpt_step(run_dir) == STEPS_PER_EPOCH  # same total as an uninterrupted run
    # Every rank stopped with 75, as the job records it (srun reports task exits on one line
    # or several, depending on timing).
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    exits = [(e["rank"], e["code"]) for e in events if e["event"] == "exit"]
    assert sorted(exits) == [(0, 75), (1, 75)], events
    # The restart took the stop's decision over; the finished run left its own.
    assert json.loads((run_dir / "decision.json").read_text())["action"] == "finished"
    assert_no_rank_left(run_dir)


def test_submit_two_nodes_waits_for_a_job_stopped_at_its_time_limit_and_returns_the_result(
    cluster, tmp_path
):
    """`cifar-job submit --nodes 2 --wait`: the job gets submitit's time-limit signal
    mid-epoch, saves, requeues itself, resumes at the saved step and finishes; --wait follows
    it through the requeue and prints the result."""
    run_dir = tmp_path / "run"
    submit = subprocess.Popen(
        [sys.executable, "-m", "cifar_job", *SUBMIT_TWO_NODES, "--wait", "--accelerator", "cpu"]
        + [*TRAIN, "--max-epochs", "2", "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert submit.stdout is not None
    first = submit.stdout.readline()
    assert first.startswith("submitted job "), first + submit.stderr.read()
    job = first.split("submitted job ")[1].split()[0]
    wait_for_text(f"submitit/{job}_0_log.out", run_dir, "step 3/")
    running = cifar_job("status", str(run_dir))
    assert "running (job" in running.stdout
    # submitit asks Slurm for --signal=USR2@90: the same signal, sent now, to every task.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out = first + submit.stdout.read()  # the same reader: what it buffered is not lost
    err = submit.stderr.read() if submit.stderr else ""
    assert submit.wait(timeout=60) == 0, out + err
    assert f"run dir: {run_dir}" in out and f"job {job} finished: test/acc" in out
    assert wait_done(job, timeout=60) == "COMPLETED"
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob(f"{job}_*_log.*"))
    assert "requeueing job" in logs
    starts = json.loads((run_dir / "manifest.json").read_text())["starts"]
    # Resumed where the stop saved: not from scratch, not the end.
    assert len(starts) == 2 and 3 <= starts[1]["step"] < 2 * STEPS_PER_EPOCH
    assert ckpt_step(run_dir) == 2 * STEPS_PER_EPOCH
    assert json.loads((run_dir / "decision.json").read_text())["action"] == "finished"
    assert_no_rank_left(run_dir)
    info = json.loads(cifar_job("status", str(run_dir), "--json").stdout)
    assert info["state"] == "finished" and info["restarts"] == 1
    assert info["step"] == 2 * STEPS_PER_EPOCH


def test_doctor_catches_ntasks_devices_mismatch(cluster, tmp_path):
    srun = [
        "srun",
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
        "--cpus-per-task=1",
        sys.executable,
        "-m",
        "cifar_job",
        "doctor",
        "--dataset",
        "synthetic",
    ]
    bad = subprocess.run(
        [*srun, "--devices", "4"], capture_output=True, text=True, env=job_env(), cwd=tmp_path
    )
    assert bad.returncode != 0
    assert "FAIL  devices: Slurm runs 2 tasks per node and --devices is 4" in bad.stdout
    assert "--ntasks-per-node=4" in bad.stdout
    good = subprocess.run(
        [*srun, "--devices", "2"],
        capture_output=True,
        text=True,
        env=job_env(),
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    node = good.stdout.split("nodes: ")[1].split()[0]  # n1 or n2, whichever Slurm chose
    assert f"master_addr: {node}" in good.stdout and "ok  srun" in good.stdout
    # The binding: the cluster binds each task to the 1 CPU it was given, so training runs
    # 1 thread and 1 loader worker in each.
    assert "ok  binding: this task may run on 1 of the node's" in good.stdout
    assert "CPUs (bound); Slurm gave it 1 CPUs" in good.stdout
    assert "training runs 1 thread(s) a task (and 1 DataLoader worker(s)" in good.stdout
    assert "2 task(s) a node" in good.stdout
    # A user's OMP_NUM_THREADS wins, and doctor warns that the tasks then oversubscribe.
    crowded = subprocess.run(
        [*srun, "--devices", "2", "--num-workers", "0"],
        capture_output=True,
        text=True,
        env=job_env(OMP_NUM_THREADS="8"),
        cwd=tmp_path,
    )
    assert crowded.returncode == 0, crowded.stdout + crowded.stderr  # a warning, not a failure
    assert "WARN  binding: " in crowded.stdout and "8 thread(s) a task" in crowded.stdout


def test_training_refuses_devices_that_contradict_the_allocation(cluster, tmp_path):
    out = subprocess.run(
        [
            "srun",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            sys.executable,
            "-m",
            "cifar_job",
            "train",
            *TRAIN,
            "--devices",
            "2",
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=job_env(),
    )
    assert out.returncode != 0
    assert "--devices 2 disagrees with Slurm's 1 tasks per node" in out.stderr
    assert "Traceback" not in out.stderr


def test_doctor_flags_a_batch_script_without_signal_or_requeue(cluster, tmp_path):
    script = tmp_path / "no_signal.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks-per-node=1\n"
        f"srun {sys.executable} -m cifar_job doctor --dataset synthetic --num-workers 0\n"
    )
    out_file = str(tmp_path / "out.txt")
    job = sbatch("--no-requeue", "--output", out_file, str(script), cwd=tmp_path)
    assert wait_done(job, timeout=120) == "FAILED"
    out = (tmp_path / "out.txt").read_text()
    assert "FAIL  signal: no --signal in the batch script" in out
    assert "#SBATCH --signal=B:USR1@180" in out  # the fix
    assert "FAIL  requeue: the job cannot be requeued: add `#SBATCH --requeue`" in out


def test_stale_marker_from_an_earlier_start_causes_no_requeue(cluster, tmp_path):
    """A decision left behind (a start that crashed after writing it) must not make a
    later, unrelated failure look like a save to requeue: that would loop until the budget."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_decision(run_dir, {"action": "requeue", "step": 3, "signal": "SIGUSR1", "saved": True})
    job = sbatch(
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        str(REPO / "slurm/ddp_4gpu.sh"),
        *TRAIN,
        "--val-size",
        "5000",  # more than the 1,200 images: the run fails at once, on its own
        cwd=tmp_path,
        RUN_DIR=str(run_dir),
    )
    assert wait_done(job) == "FAILED"
    log = (tmp_path / f"slurm-cifar-job-{job}.out").read_text()
    assert "leaves no training images" in log and "requeueing" not in log, log[-2000:]
    assert not (run_dir / "requeues.log").exists()
