"""How a start ends, and what follows: every rule Python applies, in one table.

Each row is a cause, what ended the start, and what follows from it: the action the batch
script carries out (rundir.write_decision: finished, requeue, wait for Slurm, or fail), the
start's exit status, and whether a start that ends so without a new checkpoint counts
toward the progress budget (--max-stalled-starts, checkpoints.check_progress). That is the
one restart budget: a time-limit start counts too where it saved nothing new (a time limit
shorter than start-up and a step would requeue for ever); a SIGTERM never does, since
Slurm, not the script, decides whether the job runs again. Whether the
save is whole travels with the decision (`saved`); where it is not, the newest checkpoint
stands, whatever the row.

Two rules are the batch script's (cifar_job/requeue.sh), because only the host knows their
facts or no Python process is left to apply them: a step that ended with no decision (a
rank killed before rank 0 wrote one) goes by its exit status, REQUEUE_EXIT meaning saved;
and after a SIGTERM, Slurm's own view (is it ending the job; does the partition's
PreemptMode requeue it), which scontrol gives the host and not a container, decides between
waiting for Slurm and requeueing now.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

# EX_TEMPFAIL, "temporary failure, retry": saved after USR1/USR2 or --max-time, requeue me.
REQUEUE_EXIT = 75
# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: saved, stopped.
STOP_EXIT = 128 + signal.SIGTERM
# timeout(1)'s status: a rank stopped making progress (watchdog.py).
HANG_EXIT = 124
ERROR_EXIT = 1


@dataclass(frozen=True)
class Rule:
    """What follows a cause: the batch script's action, the exit status, whether it counts
    toward --max-stalled-starts, and why."""

    action: str
    exit_code: int
    counts: bool
    why: str


RULES: dict[str, Rule] = {
    "finished": Rule("finished", 0, False, "it trained and tested what was asked"),
    "time-limit": Rule(
        "requeue",
        REQUEUE_EXIT,
        True,
        "USR1 or USR2, Slurm's --signal before the time limit: the ranks saved together; the "
        "script requeues the job",
    ),
    "max-time": Rule(
        "requeue",
        REQUEUE_EXIT,
        True,
        "--max-time ran out for this start: saved, as at a time limit",
    ),
    "sigterm": Rule(
        "wait",
        STOP_EXIT,
        False,
        "SIGTERM (preemption, scancel, scontrol requeue, docker stop): saved; Slurm is ending "
        "the job and decides whether it runs again",
    ),
    "stuck-after-time-limit": Rule(
        "requeue",
        REQUEUE_EXIT,
        True,
        "a time-limit signal, and a rank that made no progress since (stuck in a collective): "
        "no save; the newest checkpoint stands",
    ),
    "stuck-after-sigterm": Rule(
        "wait",
        STOP_EXIT,
        True,
        "a SIGTERM, and a rank that made no progress since: no save; Slurm decides",
    ),
    "hang": Rule(
        "requeue",
        HANG_EXIT,
        True,
        "a rank made no progress for its learned timeout: a healthy rank saved the last "
        "completed step where it could; another start may well not meet it",
    ),
    "peer-lost": Rule(
        "requeue",
        ERROR_EXIT,
        True,
        "a collective failed (a peer or the network): another start may well not meet it",
    ),
    "error": Rule(
        "fail",
        ERROR_EXIT,
        True,
        "an error of cifar-job's or a bad option: another start would meet it again",
    ),
}

# The errors torch.distributed raises when a peer or the network failed.
PEER_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")


def decide(cause: str) -> Rule:
    """The rule for a cause (a key of RULES)."""
    return RULES[cause]


def cause_of_error(error: BaseException) -> str:
    """peer-lost for an error of a collective, error for anything else."""
    return "peer-lost" if type(error).__name__ in PEER_ERRORS else "error"


def cause_of_stop(requeue: bool, time_up: bool = False, stuck: bool = False) -> str:
    """The cause of a stop the ranks agreed on (or that a stuck rank ended): a time-limit
    signal (`requeue`), --max-time (`time_up`), or a SIGTERM."""
    if stuck:
        return "stuck-after-time-limit" if requeue or time_up else "stuck-after-sigterm"
    if time_up:
        return "max-time"
    return "time-limit" if requeue else "sigterm"


def rules_table() -> str:
    """RULES as a Markdown table (docs/stops.md holds it; a test checks that it is current)."""
    rows = ["| cause | the batch script | exit | counts toward the budget | why |"]
    rows.append("|---|---|---|---|---|")
    for cause, rule in RULES.items():
        counts = "yes" if rule.counts else "no"
        rows.append(f"| {cause} | {rule.action} | {rule.exit_code} | {counts} | {rule.why} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m cifar_job.stops [PAGE]: print, or rewrite PAGE's table
    import sys

    from cifar_job.config import rewrite_table

    if len(sys.argv) > 1:
        rewrite_table(sys.argv[1], "rules", rules_table())
    else:
        print(rules_table(), end="")
