"""`cifar-job doctor`: what the cluster looks like from inside a job, and the checks that
catch the usual DDP-on-Slurm mistakes before hours are lost. Like slurm.py and launch.py,
this module reads the cluster's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cifar_job.config import parse_devices
from cifar_job.slurm import batch_script, job_environment, job_info

# DataLoader workers pass batches through /dev/shm; Docker's default of 64 MiB crashes them.
MIN_SHM_BYTES = 1 << 30


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # ok, but worth fixing: shown as WARN, does not fail doctor


def environment() -> dict[str, Any]:
    """The cluster environment as Lightning will see it."""
    import torch

    info = job_environment()
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    info["cuda_devices"] = torch.cuda.device_count()
    return info


def checks(
    devices: str,
    num_nodes: int,
    accelerator: str,
    num_workers: int | None,
    data_dir: str,
    dataset: str,
    tracking_uri: str | None = None,
) -> list[Check]:
    """Preflight checks; each failed one says how to fix it."""
    from cifar_job.slurm import layout_problems, loader_workers

    info = environment()
    found: list[Check] = []
    if info["slurm_job"]:
        found.append(
            Check(
                "srun",
                info["srun_step"],
                "running as a task of an srun step"
                if info["srun_step"]
                else "running in the batch script itself: "
                "launch training with `srun cifar-job train ...`, one task per device",
            )
        )
        tasks, nodes = info["tasks_per_node"], info["num_nodes"]
        problems = layout_problems(devices, num_nodes, tasks, nodes)
        found.append(
            Check(
                "devices",
                problems["devices"] is None,
                f"Slurm runs {tasks} tasks per node and --devices is {devices}"
                + (f": {problems['devices']}" if problems["devices"] else ""),
            )
        )
        found.append(
            Check(
                "nodes",
                problems["nodes"] is None,
                f"Slurm gave {nodes} nodes and --num-nodes is {num_nodes}"
                + (f": {problems['nodes']}" if problems["nodes"] else ""),
            )
        )
        if accelerator == "gpu":
            enough = info["cuda_devices"] >= tasks
            found.append(
                Check(
                    "gpus",
                    enough,
                    f"{info['cuda_devices']} CUDA devices visible for "
                    f"{tasks} tasks per node"
                    + ("" if enough else ": ask for --gpus-per-node equal to --ntasks-per-node"),
                )
            )
        job = job_info(info["slurm_job"])
        if job is not None:
            # Slurm requeues a job on a lost node or a preemption only if it may be requeued.
            requeue = "Requeue=1" in job
            found.append(
                Check(
                    "requeue",
                    requeue,
                    "the job may be requeued, so a lost node or a preemption resumes it"
                    if requeue
                    else "the job cannot be requeued: add `#SBATCH --requeue` (the cluster's "
                    "JobRequeue=0 makes that the default), or a lost node or a preemption "
                    "ends the run instead of resuming it",
                )
            )
        script = batch_script(info["slurm_job"], job) if job is not None else None
        if script is not None:
            has_signal = "--signal" in script
            found.append(
                Check(
                    "signal",
                    has_signal,
                    "the batch script asks for a signal before the time limit"
                    if has_signal
                    else "no --signal in the batch "
                    "script: add `#SBATCH --signal=B:USR1@180` (and `--requeue`), or "
                    "the job is killed at its limit without a checkpoint",
                )
            )
    # As training sizes them, for this node's ranks: srun's tasks, else the --devices asked for.
    ranks = info["tasks_per_node"] if info["srun_step"] else parse_devices(devices)
    if not isinstance(ranks, int):
        ranks = len(ranks) if isinstance(ranks, list) else 1  # "auto": one process on CPU
    num_workers = loader_workers(ranks, num_workers)
    shm = shm_bytes()
    shm_ok = num_workers == 0 or shm is None or shm >= MIN_SHM_BYTES
    found.append(
        Check(
            "shm",
            shm_ok,
            f"/dev/shm is {_size(shm)}"
            + (
                ""
                if shm_ok
                else f"; {num_workers} DataLoader workers need more: in Docker add --ipc=host or "
                "--shm-size=8g, or train with --num-workers 0"
            ),
        )
    )
    found.append(binding_check(num_workers))
    found.append(data_check(data_dir, dataset))
    if tracking_uri:
        found.append(tracking_check(tracking_uri))
    return found


def binding_check(workers: int) -> Check:
    """The CPUs this task may run on, the threads and loader workers training would start in
    it, and whether a node's tasks would start more threads than its cores."""
    from cifar_job.slurm import in_srun_step, task_cpus, tasks_per_node

    visible, node = len(os.sched_getaffinity(0)), os.cpu_count() or 1
    tasks = tasks_per_node() if in_srun_step() else 1
    given = task_cpus()
    user = os.environ.get("OMP_NUM_THREADS", "")
    # What train does: the user's OMP_NUM_THREADS, else Slurm's CPUs per task, else
    # Lightning's share of the visible CPUs.
    threads = int(user) if user.isdigit() else given or max(1, visible // tasks)
    bound = visible < node
    detail = (
        f"this task may run on {visible} of the node's {node} CPUs "
        f"({'bound' if bound else 'not bound'}); Slurm gave it "
        f"{given if given else 'no count of'} CPUs; training runs {threads} thread(s) a task "
        f"(and {workers} DataLoader worker(s) with --data-loader torch), {tasks} task(s) a node"
    )
    over = threads > visible if bound else tasks * threads > node
    if not over:
        return Check("binding", True, detail)
    return Check(
        "binding",
        True,
        f"{detail}: more than the {visible if bound else node} CPUs they share, which slows "
        "every task. Ask for --cpus-per-task (threads follow it), or lower OMP_NUM_THREADS",
        warn=True,
    )


def tracking_check(uri: str) -> Check:
    """Whether the MLflow server answers from here: compute nodes often reach fewer hosts and
    ports than the login node that started it. Training would go on without it, tracking
    nothing."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return Check("tracking", True, f"{uri}: not a server, nothing to reach")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as answer:
            ok, why = answer.status == 200, f"HTTP {answer.status}"
    except urllib.error.HTTPError as e:
        ok, why = False, f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        ok, why = False, str(getattr(e, "reason", e))
    if ok:
        return Check("tracking", True, f"the MLflow server {uri} answers from this node")
    return Check(
        "tracking",
        False,
        f"the MLflow server {uri} does not answer from this node ({why}): training would run "
        "but track nothing. Start it where compute nodes reach it (mlflow server --host "
        "0.0.0.0 --port 5000 on the login node) and use that host's name",
    )


def data_check(data_dir: str, dataset: str) -> Check:
    """Whether the data is present and verified."""
    if dataset == "synthetic":
        return Check("data", True, "synthetic data: generated, nothing to download")
    from cifar_job import CifarJobError
    from cifar_job.dataset import read_verified, verify

    try:
        summary = read_verified(data_dir) or verify(data_dir)
    except CifarJobError as e:
        return Check("data", False, str(e))
    return Check(
        "data",
        True,
        f"{data_dir}: {summary['train']} training and {summary['test']} test images, verified",
    )


def shm_bytes() -> int | None:
    """The size of /dev/shm, or None where there is none."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


def _size(n: int | None) -> str:
    return (
        "absent" if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
    )
