"""The batch script's half of the stop protocol (cifar_job/requeue.sh), row by row, without a
cluster: stand-ins for `scontrol` and `scancel` on PATH record what the script asks of Slurm
and answer `scontrol show job` as a job in a given state would; the training step is a shell
line that leaves (or not) the marker that Python writes, and exits as the ranks would."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

from cifar_job.rundir import decision_env

RUNNING = "JobId=7 JobState=RUNNING Reason=None PreemptTime=None ExcNodeList=(null)"
PREEMPTED = "JobId=7 JobState=RUNNING Reason=None PreemptTime=2026-12-01T10:00:00"


# srun as the script uses it: a probe (`srun ... --nodelist=NODE ... true`) succeeds for the
# nodes listed in $STUB/answering; anything else runs the command after srun's options.
SRUN = """#!/bin/sh
echo "srun $*" >> "$STUB/calls"
nodes=""
while [ $# -gt 0 ]; do
  case "$1" in --nodelist=*) nodes=${1#--nodelist=} ;; --*) ;; *) break ;; esac
  shift
done
if [ "$1" = true ]; then grep -qx "$nodes" "$STUB/answering"; exit $?; fi
exec "$@"
"""


class Job:
    """A batch job that sources requeue.sh and runs one step, with Slurm stood in for."""

    def __init__(
        self,
        tmp: Path,
        state: str = RUNNING,
        preempt_mode: str = "CANCEL",
        nodes: str = "n1",
        answering: str | None = None,
        **env: str,
    ) -> None:
        self.tmp, self.run_dir = tmp, tmp / "run"
        self.run_dir.mkdir()
        stubs = tmp / "bin"
        stubs.mkdir()
        for tool in ("scontrol", "scancel"):
            (stubs / tool).write_text(
                f'#!/bin/sh\necho "{tool} $*" >> "$STUB/calls"\n'
                f'[ "{tool} $1 $2" = "scontrol show job" ] && cat "$STUB/job"\n'
                f'[ "{tool} $1 $2" = "scontrol show partition" ] && cat "$STUB/partition"\n'
                f'[ "{tool} $1 $2" = "scontrol show hostnames" ] && echo "$3" | tr , "\\n"\n'
                "exit 0\n"
            )
            (stubs / tool).chmod(0o755)
        (stubs / "srun").write_text(SRUN)
        (stubs / "srun").chmod(0o755)
        (tmp / "answering").write_text("\n".join((answering or nodes).split(",")) + "\n")
        (tmp / "job").write_text(state + "\n")
        (tmp / "partition").write_text(
            f"PartitionName=low GraceTime=30 PreemptMode={preempt_mode} State=UP\n"
        )
        self.env = {
            **os.environ,
            "PATH": f"{stubs}:{os.environ['PATH']}",
            "STUB": str(tmp),
            "RUN_DIR": str(self.run_dir),
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": nodes,
            "SLURM_JOB_NUM_NODES": str(len(nodes.split(","))),
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_PARTITION": "low",
            "CIFAR_JOB_SLURM_WINDOW": "2",
            **env,
        }

    def start(self, step: str, srun: bool = False) -> subprocess.Popen[str]:
        """Run the step as the templates do (`run_requeueable srun ...`) where srun is true."""
        launch = "srun --kill-on-bad-exit=1 " if srun else ""
        script = (
            f"set -euo pipefail\nsource {REPO}/slurm/requeue.sh\n"
            f"run_requeueable {launch}bash -c {shlex.quote(step)}\n"
        )
        return subprocess.Popen(
            ["bash", "-c", script],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, step: str, srun: bool = False) -> tuple[int, str]:
        proc = self.start(step, srun)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out

    def marker(self, action: str, **decision: object) -> str:
        """A shell line that writes the decision as Python does (checkpoints.write_marker,
        through rundir.write_decision): decision.env, which the script reads, and
        decision.json, which it quotes."""
        values = {"action": action, **decision}
        env = shlex.quote(decision_env(values))
        text = shlex.quote(json.dumps(values))
        return (
            f"printf %s {env} > {self.run_dir}/decision.env; "
            f"printf '%s\\n' {text} > {self.run_dir}/decision.json"
        )

    def calls(self) -> list[str]:
        path = self.tmp / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def requeued(self) -> bool:
        return "scontrol requeue 7" in self.calls()

    def steps(self) -> list[str]:
        """The training steps' srun lines (not the probes)."""
        return [c for c in self.calls() if c.startswith("srun ") and not c.endswith(" true")]


def test_a_finished_run_ends_the_job_as_it_is(tmp_path):
    job = Job(tmp_path)
    assert job.run("exit 0") == (0, "cifar-job: job 7 start 1 on n1\n")
    assert not job.requeued()


def test_a_failed_run_fails_the_job_without_a_requeue(tmp_path):
    job = Job(tmp_path)
    rc, _ = job.run("exit 1")
    assert rc == 1 and not job.requeued()


def test_exit_75_with_the_marker_requeues_once(tmp_path):
    job = Job(tmp_path)
    rc, out = job.run(f"{job.marker('requeue', step=12, signal='SIGUSR1', saved=True)}; exit 75")
    assert rc == 0 and job.requeued(), out
    assert "requeueing job 7 (restart 1)" in out
    assert len((job.run_dir / "requeues.log").read_text().splitlines()) == 1


def test_exit_75_without_a_marker_requeues(tmp_path):
    """A rank killed while exiting after the save, before rank 0 wrote the marker."""
    job = Job(tmp_path)
    rc, out = job.run("exit 75")
    assert rc == 0 and job.requeued(), out


def test_a_hang_requeues_away_from_the_node_it_names(tmp_path):
    job = Job(tmp_path)
    rc, out = job.run(
        f"{job.marker('requeue', signal='hang', saved=False, exclude='n2')}; exit 124"
    )
    assert rc == 0, out
    assert job.calls()[-3:] == [
        "scontrol requeuehold 7",
        "scontrol update JobId=7 ExcNodeList=n2",
        "scontrol release 7",
    ]


@pytest.mark.parametrize(
    ("mode", "saved"), [("CANCEL", True), ("GANG,SUSPEND", True), ("REQUEUE", False)]
)
def test_a_sigterm_that_slurm_follows_leaves_the_decision_to_slurm(mode, saved, tmp_path):
    """Preemption where Slurm cancels or suspends, or a save that is not whole: the script
    waits for Slurm's SIGKILL at the end of GraceTime and asks for nothing."""
    job = Job(tmp_path, state=PREEMPTED, preempt_mode=mode)
    proc = job.start(f"{job.marker('wait', signal='SIGTERM', saved=saved)}; exit 143")
    assert proc.stdout is not None
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert "waiting for Slurm to end it" in lines[1]
    assert ("after the run saved" in lines[1]) == saved
    time.sleep(3)  # longer than the window: Slurm is ending it, so the script keeps waiting
    assert proc.poll() is None and not job.requeued()
    proc.kill()  # Slurm's SIGKILL
    proc.wait()


def test_a_preemption_that_slurm_would_requeue_is_requeued_at_once(tmp_path):
    """PreemptMode=REQUEUE and a whole save: Slurm would requeue the job at the end of
    GraceTime, so the script does it now and the nodes go to the preempting job."""
    job = Job(tmp_path, state=PREEMPTED, preempt_mode="REQUEUE")
    started = time.monotonic()
    code, out = job.run(f"{job.marker('wait', signal='SIGTERM', saved=True)}; exit 143")
    assert job.requeued() and time.monotonic() - started < 10, out
    assert "preempted, and the save is whole: requeueing job 7 now" in out
    assert "scontrol show partition -o low" in job.calls()
    assert not (job.run_dir / "requeues.log").exists()  # Slurm's requeue, not a time limit's


def test_a_sigterm_that_slurm_does_not_follow_requeues_instead_of_idling(tmp_path):
    """`scancel --signal=TERM` or a health checker: nobody ends the job, and waiting an hour
    would leave the allocation idle. After the window the script requeues it."""
    job = Job(tmp_path)
    proc = job.start(f"sleep 1; {job.marker('wait', signal='SIGTERM', saved=True)}; exit 143")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and job.requeued(), out
    assert "Slurm is not ending job 7; requeueing it" in out


def test_exit_75_without_a_marker_after_a_sigterm_does_not_abort_the_script(tmp_path):
    """`$(cat marker)` with no marker ended the script under `set -e`: the job ended FAILED
    and was never requeued."""
    job = Job(tmp_path)
    proc = job.start("sleep 1; exit 75")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and job.requeued(), out
    assert "the save did not finish; the previous checkpoint stands): no marker" in out


def test_an_error_that_another_start_would_meet_fails_the_job_even_when_signalled(tmp_path):
    job = Job(tmp_path)
    rc, out = job.run(f"kill -USR1 $PPID; sleep 0.5; {job.marker('fail', reason='error')}; exit 1")
    assert rc == 1 and not job.requeued(), out
    assert "another start would meet again; no requeue" in out


@pytest.mark.parametrize(
    ("action", "status", "requeue"), [("finished", 0, False), ("requeue", 75, True)]
)
def test_a_trap_as_the_step_ends_does_not_change_the_decision(action, status, requeue, tmp_path):
    """A USR1 that lands as the step exits interrupts `wait`, which then reports 138, and
    bash may have no status left to give: a run that finished was requeued. The decision
    comes from the marker that Python wrote."""
    job = Job(tmp_path)
    step = f"{job.marker(action, saved=True)}; sleep 0.5; kill -USR1 $PPID; exit {status}"
    for _ in range(3):
        job.tmp.joinpath("calls").unlink(missing_ok=True)
        rc, out = job.run(step)
        assert "scancel --signal=USR1 7" in job.calls(), out  # the trap ran
        assert job.requeued() is requeue, out
        assert rc == 0, out


def test_the_decision_the_script_reads_is_the_one_python_writes(tmp_path):
    """checkpoints.write_marker writes decision.env as this file's helper does, and the
    script reads each key back, whatever the JSON's spacing; a value it could misread is
    refused before it is written."""
    from cifar_job import checkpoints
    from cifar_job.rundir import write_decision

    checkpoints.write_marker(tmp_path, "requeue", signal="hang", saved=False, exclude="n2", step=7)
    written = (tmp_path / "decision.env").read_text()
    assert written == decision_env(
        {"action": "requeue", "signal": "hang", "saved": False, "exclude": "n2", "step": 7}
    )
    assert json.loads((tmp_path / "decision.json").read_text())["exclude"] == "n2"
    read = subprocess.run(
        [
            "bash",
            "-c",
            f"set -euo pipefail; source {REPO / 'cifar_job/requeue.sh'}; RUN_DIR={tmp_path}; "
            'cifar_job_read_decision; echo "$cifar_job_action $cifar_job_saved $cifar_job_exclude"',
        ],
        capture_output=True,
        text=True,
    )
    assert read.stdout.split() == ["requeue", "0", "n2"], read.stderr
    with pytest.raises(ValueError, match="not a value the batch script reads"):
        write_decision(tmp_path, {"action": "requeue", "exclude": "n2; rm -rf /"})


# ----------------------------------------------------------------------------- relaunch
# A start that ends with a fault another start would not meet again is followed by a new
# training step in the same allocation: no `scontrol requeue`, the nodes chosen again.

FIRST = '[ "$CIFAR_JOB_RELAUNCH" = 0 ]'  # the step's first launch in this allocation


def relaunch_once(job: Job, **decision: object) -> str:
    """A step that ends with a relaunch decision on its first launch, and finishes next."""
    return f"if {FIRST}; then {job.marker('relaunch', saved=True, step=20, **decision)}; exit 1; fi"


def test_a_lost_peer_starts_the_step_again_on_the_same_nodes_without_a_requeue(tmp_path):
    job = Job(tmp_path, nodes="n1,n2")
    rc, out = job.run(relaunch_once(job), srun=True)
    assert rc == 0 and not job.requeued(), out
    first, second = job.steps()
    assert "--nodelist" not in first  # as the template asked: the whole allocation
    assert "--nodes=2 --nodelist=n1,n2 --ntasks=4 --ntasks-per-node=2" in second
    assert "relaunching the training step in allocation 7 (relaunch 1" in out
    assert (job.run_dir / "requeues.log").read_text().count("relaunch 1 nodes=n1,n2") == 1


def test_a_spare_takes_the_place_of_the_lost_node(tmp_path):
    job = Job(tmp_path, nodes="n1,n2,n3", answering="n1,n3", SPARE_NODES="1")
    rc, out = job.run(relaunch_once(job, lost="n2"), srun=True)
    assert rc == 0 and not job.requeued(), out
    first, second = job.steps()
    assert "--nodes=2 --nodelist=n1,n2 --ntasks=4" in first
    assert "training on n1,n2; spare: n3" in out
    assert "--nodes=2 --nodelist=n1,n3 --ntasks=4" in second
    assert "without n2 (spare n3 in)" in out


def test_with_leave_it_goes_on_with_fewer_nodes(tmp_path):
    job = Job(tmp_path, nodes="n1,n2", answering="n1", MIN_NODES="1")
    rc, out = job.run(relaunch_once(job), srun=True)  # n2 no longer answers
    assert rc == 0 and not job.requeued(), out
    assert "--nodes=1 --nodelist=n1 --ntasks=2 --ntasks-per-node=2" in job.steps()[1]


def test_too_few_nodes_left_goes_back_through_the_queue(tmp_path):
    job = Job(tmp_path, nodes="n1,n2", answering="n1")
    rc, out = job.run(relaunch_once(job), srun=True)
    assert rc == 0 and job.requeued() and len(job.steps()) == 1, out
    assert "1 of the allocation's 2 node(s) can train" in out and "2 are needed" in out


def test_a_rank_killed_without_a_word_is_relaunched_once_in_a_row(tmp_path):
    job = Job(tmp_path, nodes="n1,n2")
    rc, out = job.run("exit 137", srun=True)  # every launch: killed, no decision
    assert len(job.steps()) == 2 and rc == 137 and not job.requeued(), out


def test_a_node_failure_with_too_few_nodes_left_goes_back_through_the_queue(tmp_path):
    """Slurm killed every task (a node failure in a --no-kill job): no decision, and one
    node of two answers. Without the script, Slurm would have requeued the job itself."""
    job = Job(tmp_path, nodes="n1,n2", answering="n1")
    rc, out = job.run("exit 137", srun=True)
    assert rc == 0 and job.requeued() and len(job.steps()) == 1, out


def test_an_error_of_ours_is_never_relaunched(tmp_path):
    job = Job(tmp_path, nodes="n1,n2")
    rc, out = job.run(f"{job.marker('fail', step=3)}; exit 1", srun=True)
    assert rc == 1 and len(job.steps()) == 1 and not job.requeued(), out
    assert "no requeue" in out


def test_a_stop_that_slurm_asked_for_is_never_relaunched(tmp_path):
    job = Job(tmp_path, state=PREEMPTED, preempt_mode="REQUEUE", nodes="n1,n2")
    step = f"{job.marker('relaunch', saved=True, step=5)}; exit 1"
    rc, out = job.run(step, srun=True)  # Slurm is preempting the job meanwhile
    assert len(job.steps()) == 1 and job.requeued(), out
