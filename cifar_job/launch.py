"""The submitit launcher: `cifar-job submit` from a login node.

submitit writes the sbatch script, pickles a TrainJob and runs it in every task of the job.
Stops go through the same protocol as the sbatch templates (checkpoints.py, requeue.sh): USR2
(submitit's time-limit signal) or SIGTERM reaches every rank, the ranks save at the next step
and exit, and the batch script, sourcing the templates' requeue.sh, requeues the job from the
host or leaves it to Slurm. The requeued job runs the same TrainJob, which resumes from the
run directory.

One requeue owner: the batch script. TrainJob is not a submitit `Checkpointable`, and the
training process replaces submitit's signal handlers with its own at once. submitit's way
(rank 0 alone calls `checkpoint()` from the handler, then requeues) cannot save under DDP,
where a save needs every rank, and it ignores SIGTERM, which is what preemption sends.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_job import CifarJobError, OptionError, Preempted
from cifar_job.config import TrainConfig
from cifar_job.rundir import RunDir

if TYPE_CHECKING:  # submitit is imported when a script is made: `--help` stays fast
    import submitit

# The batch-script half of the protocol, shipped in the package (slurm/requeue.sh links to it);
# `submit` writes it into the batch script.
REQUEUE_SCRIPT = Path(__file__).with_name("requeue.sh")


def _slurm(default: Any, help: str, minimum: int | None = None) -> Any:
    """A SlurmOptions field with the help its `submit` option shows (and its least value)."""
    return field(default=default, metadata={"help": help, "min": minimum})


@dataclass
class SlurmOptions:
    """What `cifar-job submit` asks Slurm for; each field is one of its options."""

    nodes: int = _slurm(1, "Nodes to train on (the Trainer's --num-nodes).", 1)
    spare_nodes: int = _slurm(
        0,
        "Spare nodes: the job asks for --nodes plus these, trains on --nodes, and puts a "
        "spare in a lost node's place inside the allocation.",
        0,
    )
    min_nodes: int | None = _slurm(
        None,
        "Go on with this many nodes when nodes are lost and no spare is left (the global "
        "batch and sample order stay). [default: --nodes: never fewer]",
        1,
    )
    gpus_per_node: int = _slurm(1, "GPUs per node.", 0)
    tasks_per_node: int | None = _slurm(None, "Tasks (ranks) per node. [default: one per GPU]", 1)
    cpus_per_task: int = _slurm(8, "CPUs per task.", 1)
    mem: str | None = _slurm(None, "Memory per node, e.g. 64G.")
    time: str = _slurm("24:00:00", "Time limit (minutes, HH:MM:SS or D-HH:MM:SS).")
    partition: str | None = _slurm(None, "Slurm partition.")
    account: str | None = _slurm(None, "Slurm account.")
    qos: str | None = _slurm(None, "Slurm QOS.")
    constraint: str | None = _slurm(None, "Slurm node constraint.")
    container_image: str | None = _slurm(
        None,
        "Run the tasks in this image through pyxis/enroot: a squashfs file, dockerd://IMAGE or "
        "REGISTRY#IMAGE. The current, data and run directories are mounted at their paths.",
    )
    job_name: str = _slurm("cifar-job", "Slurm job name.")
    # 90 s before the limit: Slurm may signal up to 60 s early; saving takes seconds.
    signal_delay_s: int = _slurm(90, "Seconds before the time limit at which to save.", 10)
    extra: dict[str, Any] = field(default_factory=dict)  # --sbatch KEY=VALUE

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def validate(self) -> None:
        """Raise OptionError for a value Slurm would refuse later, after the job was made."""
        time_minutes(self.time)
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise OptionError(
                f"--min-nodes {self.min_nodes} is more than --nodes {self.nodes}: it is the "
                "fewest nodes the job may go on with after losing some"
            )


def time_minutes(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, at least 1."""
    try:
        days, dash, clock = text.strip().rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if len(parts) > 3 or min(parts) < 0 or (dash and not days):
            raise ValueError
        if days:  # D-H, D-H:M, D-H:M:S
            h, m, s = (parts + [0, 0])[:3]
            seconds = int(days) * 86400 + h * 3600 + m * 60 + s
        else:  # M, M:S, H:M:S
            h, m, s = (
                ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, *(parts + [0])[:2])
            )
            seconds = h * 3600 + m * 60 + s
    except ValueError:
        raise OptionError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS") from None
    return max((seconds + 59) // 60, 1)


class TrainJob:
    """`cifar-job train` with one config, run by submitit in every task of a job."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def __call__(self) -> dict[str, Any] | None:
        from cifar_job.train import run  # run() installs the stop-signal handlers first

        try:
            return run(TrainConfig.from_dict(self.config))
        except Preempted as e:
            print(f"cifar-job: {e}", flush=True)
            # SystemExit, not an exception: submitit then writes no result, so a client
            # waiting on the job keeps waiting for the requeued run.
            sys.exit(e.exit_code)


def batch_lines(slurm: SlurmOptions, run_dirs: list[str]) -> tuple[list[str], list[str]]:
    """The batch script's lines before and after submitit's srun: requeue.sh's protocol, for
    one run, or for the element of a job array that this array task runs."""
    if len(run_dirs) == 1:
        where = [f"export RUN_DIR={shlex.quote(run_dirs[0])}"]
    else:  # submitit numbers the array's tasks in the order the runs were submitted
        where = [
            f"RUN_DIRS=({' '.join(shlex.quote(d) for d in run_dirs)})",
            'export RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"',
        ]
    if slurm.container_image:  # the tasks check that they run in it (trainer.check_container)
        where.append(f"export CIFAR_JOB_CONTAINER={shlex.quote(slurm.container_image)}")
    # The protocol itself, not `source` of this host's copy: the nodes may not see this
    # install's path (exit 127, and no requeue), and the script must be the one it was made by.
    protocol = REQUEUE_SCRIPT.read_text().rstrip("\n").splitlines()
    relaunch = [f"export SPARE_NODES={slurm.spare_nodes}"]
    if slurm.min_nodes is not None:
        relaunch.append(f"export MIN_NODES={slurm.min_nodes}")
    # submitit's own srun line runs the training step; this function makes it requeue.sh's
    # step, started again in the allocation after a fault (cifar_job_step).
    wrap = ['srun() { cifar_job_step "$@"; }']
    setup = [*where, *relaunch, *protocol, "cifar_job_before_step", *wrap]
    return setup, ["cifar_job_after_step $?", 'exit "$?"']


def build_executor(
    cfg: TrainConfig,
    slurm: SlurmOptions,
    dry_run: bool = False,
    run_dirs: list[str] | None = None,
    max_parallel: int | None = None,
) -> submitit.SlurmExecutor:
    """A SlurmExecutor whose tasks, nodes and signal fit the Trainer by construction.

    dry_run: only to write the script, which needs no Slurm (a laptop, a CI runner).
    run_dirs: the run directories of a sweep's elements, one array task each, at most
    max_parallel at a time; cfg is then the sweep's (its run_dir holds them all).
    """
    import submitit

    class ScriptOnly(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # submitit refuses to start without srun on PATH
            return 1

    folder = RunDir(cfg.run_dir).submitit
    python = "python3" if slurm.container_image else None  # the image's own Python
    kind = ScriptOnly if dry_run else submitit.SlurmExecutor
    executor = kind(folder=folder, python=python)
    # --kill-on-bad-exit: one rank failing must not leave the others hanging. Append: a step
    # started again in the allocation writes on in the same logs.
    srun_args = ["--kill-on-bad-exit=1", "--open-mode=append"]
    if slurm.container_image:
        cwd = os.getcwd()
        srun_args += [
            f"--container-image={slurm.container_image}",
            f"--container-mounts={container_mounts(cwd, cfg.run_dir, cfg.data_dir)}",
            f"--container-workdir={cwd}",
        ]
    setup, teardown = batch_lines(slurm, run_dirs or [cfg.run_dir])
    params: dict[str, Any] = {
        "job_name": slurm.job_name,
        "nodes": slurm.nodes + slurm.spare_nodes,
        "ntasks_per_node": slurm.ntasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": time_minutes(slurm.time),
        "signal_delay_s": slurm.signal_delay_s,
        "srun_args": srun_args,
        "setup": setup,
        "teardown": teardown,
        # --requeue: allow `scontrol requeue`; submitit already appends to its logs.
        # --no-kill: a lost node does not end the allocation; the batch script goes on
        # without it (requeue.sh's cifar_job_step).
        "additional_parameters": {"requeue": True, "no_kill": True, **slurm.extra},
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if run_dirs and len(run_dirs) > 1:
        params["array_parallelism"] = max_parallel or len(run_dirs)
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    executor.update_parameters(**params)
    return executor


def container_mounts(*dirs: str) -> str:
    """pyxis's --container-mounts for these host directories, each at its own path (a
    directory inside another one is mounted with it)."""
    paths = sorted({Path(d) for d in dirs})
    outer = [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]
    return ",".join(f"{p}:{p}" for p in outer)


def absolute(cfg: TrainConfig) -> TrainConfig:
    """The config with its directories made absolute: the job may start elsewhere."""
    cfg.run_dir, cfg.data_dir = str(Path(cfg.run_dir).resolve()), str(Path(cfg.data_dir).resolve())
    return cfg


def sbatch_text(
    cfg: TrainConfig,
    slurm: SlurmOptions,
    elements: list[dict[str, Any]] | None = None,
    max_parallel: int | None = None,
) -> str:
    """The sbatch script `submit` would send: for the run, or for these elements of a sweep."""
    run_dirs = [e["run_dir"] for e in elements] if elements else None
    executor = build_executor(absolute(cfg), slurm, True, run_dirs, max_parallel)
    if run_dirs and len(run_dirs) > 1:
        executor.parameters["map_count"] = len(run_dirs)  # as submitit's array submission does
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def submit(cfg: TrainConfig, slurm: SlurmOptions) -> submitit.Job:
    """Submit the training job and return its handle."""
    return _live_executor(cfg, slurm).submit(TrainJob(cfg.to_dict()))


def submit_sweep(
    cfg: TrainConfig, slurm: SlurmOptions, elements: list[dict[str, Any]], max_parallel: int | None
) -> list[submitit.Job]:
    """Submit the elements as one job array (one plain job for a single element)."""
    executor = _live_executor(cfg, slurm, [e["run_dir"] for e in elements], max_parallel)
    with executor.batch():
        jobs = [executor.submit(TrainJob(e["config"])) for e in elements]
    return jobs


def _live_executor(
    cfg: TrainConfig,
    slurm: SlurmOptions,
    run_dirs: list[str] | None = None,
    max_parallel: int | None = None,
) -> submitit.SlurmExecutor:
    """The executor of a real submission: Slurm must be there, and, for a container, the data
    directory too (pyxis mounts only directories that exist)."""
    check_slurm()
    executor = build_executor(absolute(cfg), slurm, False, run_dirs, max_parallel)
    if slurm.container_image:
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    return executor


def queued_elements(submissions: list[dict[str, Any]]) -> set[int]:
    """The sweep elements whose array task (or job) Slurm still has pending or running."""
    from cifar_job.slurm import my_queued_jobs

    alive = my_queued_jobs() if submissions else None
    if alive is None:
        return set()
    found = set()
    for s in submissions:
        for task, element in enumerate(s["elements"]):
            name = s["job"] if len(s["elements"]) == 1 else f"{s['job']}_{task}"
            if name in alive:
                found.add(element)
    return found


def check_slurm() -> None:
    """Stop with a clear message where Slurm's commands are missing (a laptop, a container)."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise CifarJobError(
            f"no {' or '.join(missing)} on PATH: `cifar-job submit` runs on a Slurm cluster's "
            "login node. `cifar-job submit --dry-run ...` shows the batch script anywhere."
        )


def plan_sweep(
    cfg: TrainConfig, grid: dict[str, list[Any]], seeds: list[int], allow_many: bool
) -> tuple[dict[str, Any], list[int], set[int]]:
    """`submit --sweep`: the plan of the grid, written to the sweep's directory (a different
    sweep there is refused), the elements to submit now and those Slurm still has."""
    from cifar_job import sweep

    plan = sweep.make_plan(absolute(cfg), grid, seeds, allow_many=allow_many)
    sweep.write_plan(Path(cfg.run_dir), plan)
    busy = queued_elements(plan["submissions"])
    return plan, sweep.to_submit(plan, busy), busy


def submit_planned(
    cfg: TrainConfig,
    slurm: SlurmOptions,
    plan: dict[str, Any],
    indices: list[int],
    max_parallel: int | None,
) -> list[submitit.Job]:
    """Submit these elements as one job array and record the submission in the plan, so a
    later submit of the same sweep knows they are queued. Returns submitit's jobs."""
    from cifar_job import sweep

    jobs = submit_sweep(cfg, slurm, [plan["elements"][i] for i in indices], max_parallel)
    plan["submissions"].append({"job": jobs[0].job_id.split("_")[0], "elements": indices})
    sweep.write_plan(Path(cfg.run_dir), plan)
    return jobs
