"""cifar-job: CIFAR-10 training on PyTorch Lightning, for workstations and Slurm clusters."""

__version__ = "0.1.0"


class CifarJobError(Exception):
    """An error the user can fix; the message says how."""
