"""cifar-job: CIFAR-10 training on PyTorch Lightning, for workstations and Slurm clusters."""

__version__ = "0.1.0"


class CifarJobError(Exception):
    """An error the user can fix; the message says how."""


# Exit status of a run that saved a checkpoint on a preemption signal and asks to be requeued
# (EX_TEMPFAIL: "temporary failure, retry"). slurm/requeue.sh and launch.py act on it.
REQUEUE_EXIT = 75
# Written into the run directory before the joint save: a launcher that sees it requeues even
# when srun reports another status (--kill-on-bad-exit may kill a rank that was exiting 75).
PREEMPTED_MARKER = "preempted.json"


class Preempted(CifarJobError):
    """The run saved its state after a preemption signal; requeue it to resume."""
