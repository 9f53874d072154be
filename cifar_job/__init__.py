"""cifar-job: CIFAR-10 training on PyTorch Lightning, for workstations and Slurm clusters."""

import warnings

__version__ = "0.1.0"


def quiet_deprecations() -> None:
    """Hide deprecation notices from torch, Lightning and the rest: they are for those
    projects' developers, and a user can do nothing about them. Ours still show."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module="cifar_job")


class CifarJobWarning(UserWarning):
    """Something the user should know that does not stop the command (a damaged checkpoint
    skipped): the CLI prints it as one line of its own, `cifar-job: warning: ...`."""


def warnings_as_lines() -> None:
    """Print CifarJobWarnings as the CLI's own lines, not as Python's (file, line, source)."""
    import sys

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, CifarJobWarning):
            print(f"cifar-job: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class CifarJobError(Exception):
    """An error the user can fix; the message says how."""


class OptionError(CifarJobError, ValueError):
    """An option, or a value in a config file, that no run can use: the CLI exits 2."""


class Preempted(CifarJobError):
    """The run stopped on a signal after saving; exit with `exit_code` (see checkpoints.py)."""

    def __init__(self, message: str, exit_code: int, cause: str = "sigterm") -> None:
        super().__init__(message)
        self.exit_code, self.cause = exit_code, cause  # cause: a key of stops.RULES
