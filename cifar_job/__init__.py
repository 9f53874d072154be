"""cifar-job: CIFAR-10 training on PyTorch Lightning, for workstations and Slurm clusters."""

import warnings

__version__ = "0.1.0"


def quiet_deprecations() -> None:
    """Hide deprecation notices from torch, Lightning and the rest: they are for those
    projects' developers, and a user can do nothing about them. Ours still show."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module="cifar_job")


class CifarJobError(Exception):
    """An error the user can fix; the message says how."""


class OptionError(CifarJobError, ValueError):
    """An option, or a value in a config file, that no run can use: the CLI exits 2."""


class Preempted(CifarJobError):
    """The run stopped on a signal after saving; exit with `exit_code` (see checkpoints.py)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
