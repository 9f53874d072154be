"""How a start ends, and what follows: every rule Python applies, in one table.

Each row is a cause, what ended the start, and what follows from it: the action the batch
script carries out (rundir.write_decision: finished; relaunch, the training step again in
the same allocation; requeue; wait for Slurm; or fail), the
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
waiting for Slurm and requeueing now. And for a relaunch, where: which of the allocation's
nodes still answer (a lost node cannot say so), and whether enough are left
(SPARE_NODES, MIN_NODES), else the job goes back through the queue.
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
        "relaunch",
        HANG_EXIT,
        True,
        "a rank made no progress for its learned timeout: a healthy rank saved the last "
        "completed step where it could; the script starts the step again in the allocation, "
        "without the hung rank's node where enough nodes are left (else it requeues)",
    ),
    "peer-lost": Rule(
        "relaunch",
        ERROR_EXIT,
        True,
        "a collective failed because a peer is gone (a rank killed or crashed, a node lost, "
        "the network cut): a healthy rank saved the last completed step where it could; the "
        "script starts the step again in the allocation on the nodes that answer",
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
# What gloo, NCCL and c10d's store say, in a RuntimeError or one of PEER_ERRORS, when a peer
# is gone: its process died (the kernel resets or closes its connections), its node or the
# network went (a timeout), or NCCL's watchdog aborted the communicator.
PEER_MESSAGES = (
    "connection reset by peer",
    "connection closed by peer",
    "connection refused",
    "broken pipe",
    "read error",  # gloo: "Read error [10.77.0.12]:36485: Connection reset by peer"
    "write error",
    "socket timeout",
    "timed out",  # gloo "Timed out waiting ...ms for recv operation", c10d store timeouts
    "no route to host",
    "gloo connectfullmesh failed",
    "nccl communicator was aborted",
    "ncclremoteerror",
    "remote process exited or there was a network error",
    "ncclsystemerror",
    "nccl error",  # "NCCL error in: ..., unhandled system error"
    "watchdog caught collective operation timeout",
    "process group watchdog",
)


def decide(cause: str) -> Rule:
    """The rule for a cause (a key of RULES)."""
    return RULES[cause]


def cause_of_error(error: BaseException) -> str:
    """peer-lost for an error that says a peer or the network is gone (one of PEER_ERRORS,
    or a RuntimeError in words of PEER_MESSAGES, anywhere in its chain of causes), error for
    anything else: ours, a bad option, bad data, which another start would meet again."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in PEER_ERRORS:
            return "peer-lost"
        if isinstance(current, RuntimeError):
            text = str(current).lower()
            if any(words in text for words in PEER_MESSAGES):
                return "peer-lost"
        current = current.__cause__ or current.__context__
    return "error"


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
