"""What the job knows of Slurm and of the container it was meant to run in: the layout of
the srun step (tasks per node, nodes), the job and array ids, and whether the task runs in
the image the job asked for. Ranks themselves come from Lightning's SLURMEnvironment.
Imports no torch or Lightning: `doctor` and `status` use it too."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from cifar_job import CifarJobError
from cifar_job.config import TrainConfig, parse_devices


def slurm_layout(cfg: TrainConfig) -> tuple[int | str | list[int], int]:
    """(devices, num_nodes) for the Trainer: from the Slurm allocation inside an srun step.

    Lightning hangs at DDP init, or runs with the wrong world size, when they disagree with
    --ntasks-per-node and --nodes; so under srun they are read from Slurm, and a value the
    user set that contradicts the allocation is an error that says what to change.
    """
    devices = parse_devices(cfg.devices)
    if not in_srun_step():
        return devices, cfg.num_nodes
    tasks, nodes = tasks_per_node(), slurm_nodes()
    # A step started again in the allocation may run on fewer nodes (MIN_NODES): Slurm's.
    asked = cfg.num_nodes if relaunch_count() == 0 else 1
    problems = layout_problems(cfg.devices, asked, tasks, nodes)
    if problems["devices"]:
        raise CifarJobError(
            f"--devices {cfg.devices} disagrees with Slurm's {tasks} tasks per node: "
            + problems["devices"]
        )
    if problems["nodes"]:
        raise CifarJobError(
            f"--num-nodes {cfg.num_nodes} disagrees with Slurm's {nodes} nodes: "
            + problems["nodes"]
        )
    return (tasks if devices == "auto" else devices), nodes


def layout_problems(devices: str, num_nodes: int, tasks: int, nodes: int) -> dict[str, str | None]:
    """The fix for --devices and for --num-nodes against Slurm's tasks and nodes, or None.

    One place for the rule that training enforces and `cifar-job doctor` reports.
    """
    wanted = parse_devices(devices)
    count = len(wanted) if isinstance(wanted, list) else wanted
    return {
        "devices": None
        if count in ("auto", tasks)
        else f"give sbatch --ntasks-per-node={count}, or --devices {tasks} (auto: one per task)",
        "nodes": None
        if num_nodes in (1, nodes)
        else f"give sbatch --nodes={num_nodes}, or --num-nodes {nodes} (or leave it out)",
    }


def slurm_nodes() -> int:
    """How many nodes this step runs on (a step may use some of the job's nodes: spares,
    a relaunch without a lost node), else the job's."""
    env = os.environ
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    return int(nodes or env.get("SLURM_JOB_NUM_NODES") or 1)


def in_srun_step() -> bool:
    """Whether this process is a task of an srun step (not the batch script itself)."""
    step = os.environ.get("SLURM_STEP_ID", "")
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and step.isdigit()


def tasks_per_node() -> int:
    """Slurm's tasks per node for this step (SLURM_STEP_TASKS_PER_NODE looks like "2(x2)")."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if match := re.match(r"\d+", os.environ.get(var, "")):
            return int(match.group())
    return 1


def task_cpus() -> int | None:
    """The CPUs Slurm gave this task: --cpus-per-task, else, where the site binds tasks
    (task/affinity, cgroups) to fewer CPUs than the node has, the size of its mask. None
    outside an srun step, or where nothing says."""
    if not in_srun_step():
        return None
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        return int(cpus)
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return mask if mask < (os.cpu_count() or mask) else None


def size_threads() -> int | None:
    """Give torch as many intra-op threads as Slurm gave this task CPUs, unless the user set
    OMP_NUM_THREADS; returns the number set, or None.

    Without it each task starts a thread per core it can see: without binding, every core of
    the node, so N tasks on a node run N times too many threads (Lightning divides the cores
    it sees among a node's tasks, but two tasks of one CPU each on nodes of 2 cores still
    ran 2 threads each). Where Slurm binds tasks, the count it passes is the mask's size.
    """
    cpus = task_cpus()
    if cpus is None or "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    os.environ["OMP_NUM_THREADS"] = str(cpus)  # also what Lightning's launcher then keeps
    torch.set_num_threads(cpus)
    return cpus


# More loader workers than this add start-up time and memory, not images per second: one
# worker crops and flips some 5,000 CIFAR images a second (bench/data_path.py).
MAX_LOADER_WORKERS = 8


def loader_workers(local_ranks: int, wanted: int | None = None) -> int:
    """DataLoader workers for one rank: `wanted` (--num-workers) where set, else the CPUs the
    task was given (Slurm's count or its mask, else the CPUs this process may use shared
    among the node's ranks), less one for the training process; at least 1, at most
    MAX_LOADER_WORKERS.

    Lightning's suggested_max_num_workers is the last of these alone: where Slurm binds
    tasks, it would share a task's own mask among the node's ranks once more."""
    if wanted is not None:
        return wanted
    cpus = task_cpus() or len(os.sched_getaffinity(0)) // max(local_ranks, 1)
    return min(max(cpus - 1, 1), MAX_LOADER_WORKERS)


# The image (docker/Dockerfile) writes its version and revision here; nothing else does.
IMAGE_MARKER = Path("/etc/cifar-job/image.json")


# Set by the container templates and `submit --container-image` to the image the tasks were
# meant to run in.
CONTAINER_VAR = "CIFAR_JOB_CONTAINER"


def running_image() -> dict[str, Any] | None:
    """The cifar-job image this process runs in (its version and revision), or None."""
    try:
        return json.loads(IMAGE_MARKER.read_text())
    except (OSError, ValueError):
        return None


def check_container() -> None:
    """Refuse to train on the host when the job asked for a container.

    pyxis loaded as `optional` (and other runtimes' fallbacks) runs the task on the host when
    the container cannot start: the run would go on with the host's Python and packages, and
    nothing would say so.
    """
    wanted = os.environ.get(CONTAINER_VAR)
    if wanted and running_image() is None:
        raise CifarJobError(
            f"this task was to run in the container {wanted}, but it runs on the host "
            f"{socket.gethostname()} ({sys.executable}): the container did not start. "
            "See the container runtime's error above in the job log (pyxis: 'container was "
            "not started successfully'); nothing was trained."
        )


def job_id() -> str | None:
    """The scheduler's job id (with the array task, if any), or None outside a job."""
    jid = os.environ.get("SLURM_JOB_ID")
    if jid and os.environ.get("SLURM_ARRAY_TASK_ID"):
        jid = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return jid


def local_start() -> str:
    """Outside Slurm, the host and pid of the process that started the run, as HOST.PID:
    Lightning's local ranks inherit it through the environment, so they all name one run."""
    return os.environ.setdefault("CIFAR_JOB_START", f"{socket.gethostname()}.{os.getpid()}")


def restart_count() -> int:
    """How many times Slurm requeued this job (0 for its first start, and outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def relaunch_count() -> int:
    """How many times the batch script started the training step again inside this
    allocation (requeue.sh's CIFAR_JOB_RELAUNCH; 0 for its first step, and outside Slurm)."""
    return int(os.environ.get("CIFAR_JOB_RELAUNCH") or 0)


def start_number() -> int:
    """This start's number in the job, from 1: every requeue and every relaunch inside an
    allocation is a start."""
    return restart_count() + relaunch_count() + 1


def under_slurm() -> bool:
    """Whether this process runs in a Slurm job."""
    return "SLURM_JOB_ID" in os.environ


def start_id() -> str:
    """What this start's ranks share, and earlier starts' lack: Slurm's job, restart count
    and relaunch count, or a name the first process of a local run passes on to the ranks
    that Lightning launches (they inherit its environment)."""
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"{job}.{restart_count()}.{relaunch_count()}"
    return local_start()


def node_name() -> str:
    """The Slurm node this process runs on (what --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, srun, Lightning), before
    the process group says: 0 where none did."""
    env = os.environ
    return int(env.get("RANK") or env.get("SLURM_PROCID") or env.get("LOCAL_RANK") or 0)


def holder_name() -> str:
    """Who this process writes a run directory for: its Slurm job (array task included) or,
    outside Slurm, the host and the process that started the run (Lightning's local ranks
    inherit it)."""
    if job := job_id():
        return f"Slurm job {job}"
    host, _, pid = local_start().rpartition(".")
    return f"process {pid} on {host}"


def allocation_started() -> float | None:
    """When Slurm started this job's allocation (this start's), if it says."""
    try:
        return float(os.environ["SLURM_JOB_START_TIME"])
    except (KeyError, ValueError):
        return None


def job_state(job: str) -> str:
    """The job's Slurm state (running, pending, ...), or "stopped" once Slurm forgot it."""
    if not shutil.which("squeue"):
        return "unknown (no squeue here)"
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip().lower() or "stopped"


def sacct_allocations(job: str) -> tuple[list[tuple[str, str, str, int]], str | None]:
    """Every allocation of the job as Slurm's accounting has it (each requeue is one:
    --duplicates), as (start, end, state, nodes) in sacct's own spelling, or [] and why sacct
    gave none."""
    fields = "JobID,Start,End,State,NNodes"
    cmd = ["sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", fields]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"sacct: {e}"
    if out.returncode != 0:
        return [], (out.stderr.strip().splitlines() or ["sacct failed"])[-1]
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5 and parts[0] == job:
            rows.append((parts[1], parts[2], parts[3], int(parts[4] or 1)))
    return rows, None


def job_environment() -> dict[str, Any]:
    """This job as Slurm and Lightning see it: job, ranks, nodes, master address and port."""
    env = os.environ
    info: dict[str, Any] = {"slurm_job": env.get("SLURM_JOB_ID"), "srun_step": in_srun_step()}
    if info["slurm_job"]:
        info |= {
            "job_name": env.get("SLURM_JOB_NAME"),
            "nodes": env.get("SLURM_JOB_NODELIST"),
            "num_nodes": slurm_nodes(),
            "tasks_per_node": tasks_per_node(),
            "global_rank": env.get("SLURM_PROCID"),
            "local_rank": env.get("SLURM_LOCALID"),
            "node_rank": env.get("SLURM_NODEID"),
            "restarts": restart_count(),
        }
        if info["srun_step"]:
            from lightning.pytorch.plugins.environments import SLURMEnvironment

            slurm = SLURMEnvironment(auto_requeue=False)
            info |= {"master_addr": slurm.main_address, "master_port": slurm.main_port}
    return info


def job_info(job_id: str) -> str | None:
    """`scontrol show job -o` for the job, or None where there is no scontrol."""
    if not shutil.which("scontrol"):
        return None
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def batch_script(job_id: str, info: str) -> str | None:
    """The job's batch script as Slurm stored it, or None (not a batch job, or unreadable)."""
    if "BatchFlag=1" not in info:  # srun or salloc: there is no batch script
        return None
    out = subprocess.run(
        ["scontrol", "write", "batch_script", job_id, "-"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout if out.returncode == 0 else None


def my_queued_jobs() -> set[str] | None:
    """The ids (array tasks as JOB_TASK) of this user's jobs that Slurm has pending or
    running; None where there is no squeue. Raises CifarJobError where squeue fails."""
    import getpass

    if shutil.which("squeue") is None:
        return None
    # The user's jobs, filtered by the caller: `squeue -j` fails outright on an id Slurm has
    # forgotten.
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()], capture_output=True, text=True
    )
    if out.returncode:
        # Not "none is queued": the elements still running would be submitted again, and two
        # jobs would write one run directory.
        raise CifarJobError(
            f"squeue failed, so which sweep elements still run is unknown: "
            f"{out.stderr.strip() or out.returncode}. Try again once squeue answers."
        )
    return set(out.stdout.split())
