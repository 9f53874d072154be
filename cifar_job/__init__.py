"""cifar-job: CIFAR-10 training on PyTorch Lightning, for workstations and Slurm clusters."""

__version__ = "0.1.0"


class CifarJobError(Exception):
    """An error the user can fix; the message says how."""


class Preempted(CifarJobError):
    """The run stopped on a signal after saving; exit with `exit_code` (see checkpoints.py)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
