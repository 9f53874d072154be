"""The stop-and-resume protocol, in one place.

How a run stops, and how the next start picks up where it stopped:

- **Signals.** USR1 (the sbatch templates' --signal) and USR2 (submitit's) ask for a requeue:
  the job is about to hit its time limit. SIGTERM means the job is being stopped from outside
  (preemption, `scancel`, `scontrol requeue`, `docker stop`, a node going down). The handlers
  only note the signal: saving from inside one would deadlock under DDP, because
  `Trainer.save_checkpoint` ends in a barrier that ranks without the signal never reach.
- **Agreement.** After every optimizer step the ranks agree, with one tiny all-reduce over a
  gloo group of their own, on whether any of them was signalled, whether --max-time is up
  and whether a periodic save is due (rank 0's clock decides both). So they all save the
  same step, together.
- **Saves.** `last.ckpt` is written to a temporary file, fsynced and renamed into place: a
  kill mid-write leaves the previous checkpoint whole. Periodic saves (--checkpoint-every)
  land mid-epoch with the loader's exact position, which bounds what a stop without warning
  (SIGKILL, a lost node, an OOM) can lose.
- **Exit.** Before the save, rank 0 writes the marker `preempted.json` (step, signal, whether
  to requeue), and marks it saved once the save is whole. Every rank then exits with
  REQUEUE_EXIT (75) after USR1/USR2, or STOP_EXIT (143, as for a SIGTERM) after SIGTERM:
  never 0, so no stop looks like a finished run.
  The batch script (cifar_job/requeue.sh) requeues on 75 and leaves a SIGTERM to Slurm,
  which requeues a preempted job itself, cancels a cancelled one, and so on.
- **Resume.** Rank 0 chooses the checkpoint to resume from (the highest step that loads) and
  every rank loads that one. Checkpoints that exist but none of which loads stop the run,
  rather than train from scratch over them.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from cifar_job import CifarJobError, Preempted, events
from cifar_job.config import write_json

# EX_TEMPFAIL, "temporary failure, retry": saved after USR1/USR2, requeue me.
REQUEUE_EXIT = 75
# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: saved, stopped.
STOP_EXIT = 128 + signal.SIGTERM
# Written before the joint save: the batch script acts on it even when srun reports another
# status (--kill-on-bad-exit may kill a rank that was exiting after the others).
MARKER = "preempted.json"
LAST = "last.ckpt"
# Why a run stops. A higher code wins when ranks disagree: a SIGTERM anywhere means Slurm is
# stopping the whole job. TIME_UP is --max-time running out (rank 0's clock); it ends the
# start as a time limit does: saved, exit 75, rerun or requeue to continue.
TIME_UP, REQUEUE, STOP = 1, 2, 3
SIGNALS = {signal.SIGUSR1: REQUEUE, signal.SIGUSR2: REQUEUE, signal.SIGTERM: STOP}


# ----------------------------------------------------------------------------- signals

_received: list[int] = []  # the signals this process got, oldest first


_wakeup: list[int] = []  # the read end of the signals' wakeup pipe, once installed


def install_signal_handlers() -> None:
    """Note USR1, USR2 and SIGTERM from now on, for the whole process (main thread only).

    Installed once, before anything slow, so a signal during start-up or evaluation is not
    lost either, and submitit's own handlers (which would requeue from rank 0 alone) never
    act: the batch script is the one requeue owner. Every signal is also written, as it
    arrives, to a pipe that the watchdog's thread reads (wakeup_reader): the handlers run
    only when the main thread runs Python, which a rank stuck in a collective never does.
    """
    for sig in SIGNALS:
        signal.signal(sig, _note)
    if not _wakeup:
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        _wakeup.append(reader)


def wakeup_reader() -> int | None:
    """The file descriptor on which each signal's number arrives as a byte, or None."""
    return _wakeup[0] if _wakeup else None


def _note(signum: int, frame: Any) -> None:
    _received.append(signum)


def pending_signal() -> int | None:
    """The most serious signal received so far, or None."""
    return max(_received, key=lambda s: SIGNALS[s], default=None)


class _SignalsOwnedByCifarJob(_SignalConnector):
    """Lightning's signal connector, minus its SIGTERM handler.

    Lightning 2.6 handles SIGTERM by calling `dist.broadcast` inside the handler (which hung
    both ranks when the signal landed during a checkpoint's barrier) and then ending the
    process with status 0, unsaved, which Slurm records as a completed job.
    """

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = {}


# ----------------------------------------------------------------------------- saving


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, fsyncs, then renames it into place,
    and loads the checkpoint that rank 0 chose to resume from (see CheckpointPolicy.setup).
    """

    def __init__(self) -> None:
        super().__init__()
        self.resume_path: str | None = None
        self.after_write: Any = None  # the watchdog's: what follows is the save's barrier

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; others in the project may read it
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if self.after_write is not None:
            self.after_write()

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        chosen = self.resume_path or path
        checkpoint = super().load_checkpoint(
            chosen, map_location=map_location, weights_only=weights_only
        )
        return rebase(checkpoint, os.path.realpath(Path(chosen).parent))


def rebase(checkpoint: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The checkpoint with the paths its ModelCheckpoint states hold moved into run_dir.

    They are absolute. In a run directory that was moved or copied, Lightning would keep the
    old best_model_path (and test a checkpoint of the old directory, or one that is gone)
    and forget which best-epoch file to replace.
    """
    for state in checkpoint.get("callbacks", {}).values():
        old = state.get("dirpath") if isinstance(state, dict) else None
        if not isinstance(old, str) or old == run_dir:
            continue

        def moved(value: Any, old: str = old) -> Any:
            if isinstance(value, str) and value.startswith(old + os.sep):
                return run_dir + value[len(old) :]
            return value

        for key, value in list(state.items()):
            if isinstance(value, dict):
                state[key] = {moved(k): v for k, v in value.items()}
            else:
                state[key] = moved(value)
        state["dirpath"] = run_dir
    return checkpoint


def find_resume_checkpoint(run_dir: Path) -> tuple[str | None, int | None]:
    """The checkpoint in run_dir to resume from and its step, or (None, None) if there is none.

    The highest step that loads wins (last.ckpt on a tie with a best-epoch file): by content,
    not by modification time, which a shared filesystem may report differently on each node.
    A corrupt file is skipped with a warning; if none loads, the run stops instead of training
    from scratch over them.
    """
    found: list[tuple[int, bool, str]] = []
    paths = sorted(run_dir.glob("*.ckpt"))
    for path in paths:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if "state_dict" in ckpt and "loops" in ckpt:
                found.append((int(ckpt.get("global_step", 0)), path.name == LAST, str(path)))
                continue
            reason = "not a training checkpoint"
        except Exception as e:  # a truncated file raises whatever the unpickler hits first
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"skipping unreadable checkpoint {path}: {reason}", stacklevel=2)
    if not found:
        if paths:
            raise CifarJobError(
                f"{run_dir} holds checkpoints, but none loads ({', '.join(p.name for p in paths)})."
                " Move them away to train this run from scratch, or use another --run-dir."
            )
        return None, None
    step, _, path = max(found)
    return path, step


def write_marker(run_dir: Path, **decision: Any) -> None:
    """Record how this start ends (the step, the signal or "hang", whether to requeue,
    whether the save is whole, nodes to exclude) for the batch script, atomically."""
    write_json(run_dir / MARKER, decision, indent=None)  # one line: the job log quotes it


def clear_leftovers(run_dir: Path) -> None:
    """What an earlier start left that this one takes over (rank 0, before training): its
    marker and hang record, and the temporary files of saves that a kill interrupted (40-90
    MB each). Heartbeats stay: this start's ranks are writing theirs already, and the
    watchdog tells earlier starts' apart."""
    (run_dir / MARKER).unlink(missing_ok=True)
    (run_dir / "hang.json").unlink(missing_ok=True)
    for tmp in run_dir.glob(".*.ckpt.*.tmp"):
        tmp.unlink(missing_ok=True)


def check_progress(run_dir: Path, job: str | None, resume_step: int | None, budget: int) -> None:
    """Stop, with one message that names the repeated failure, when the last `budget` starts
    of this Slurm job each ended without a new checkpoint.

    A stop that Slurm announced (preemption, a time limit) is nobody's failure and neither
    counts nor breaks the run of failures. A new job (a resubmission, a rerun by hand) starts
    a new count.
    """
    if job is None or budget <= 0:
        return
    starts: list[dict[str, Any]] = []
    for event in events.read(run_dir):
        if event["event"] == "start":
            starts.append({**event, "ends": []})
        elif event["event"] in ("end", "hang") and starts:
            starts[-1]["ends"].append(event)
    stalled = []
    later = resume_step or 0
    for start in reversed(starts):
        if start.get("job") != job or later > (start.get("step") or 0):
            break  # another job's, or it made a checkpoint
        if any(e.get("reason") == "stopped" for e in start["ends"]):
            continue
        stalled.append(start)
    if len(stalled) < budget:
        return
    why = [_failure(start["ends"]) for start in reversed(stalled)]
    said = f"each ended with {why[0]}" if len(set(why)) == 1 else "; ".join(why)
    raise CifarJobError(
        f"the last {len(stalled)} starts of job {job} made no new checkpoint (each resumed "
        f"from step {later}): {said}. Stopping instead of requeueing again "
        f"(--max-stalled-starts {budget}). Fix the cause, then resubmit: a new job counts anew."
    )


def _failure(ends: list[dict[str, Any]]) -> str:
    """How a failed start ended, from its events."""
    for event in ends:
        if event["event"] == "hang":
            return f"a hang ({event.get('stopped')})"
    for event in ends:
        if event.get("reason") == "error":
            return f"an error ({event.get('message')})"
    return "no word (killed: out of memory, a lost node, SIGKILL?)"


# ----------------------------------------------------------------------------- the callback


class CheckpointPolicy(Callback):
    """Stops on a signal after saving, saves periodically, and makes every rank resume from
    the checkpoint rank 0 chose. One instance per Trainer; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        every_minutes: float,
        resume_from: str | None,
        max_time_s: float | None = None,
    ) -> None:
        self.run_dir, self.resume_from = run_dir, resume_from
        self.every_s = every_minutes * 60
        # Per start, unlike Lightning's max_time (whose clock a resumed run restores, so a
        # rerun with the same value stopped at once and then reported an unfinished run).
        self.max_time_s = max_time_s
        self.last_save = self.started = time.monotonic()
        self.group: Any = None

    # --- agreement

    def _agree(self, trainer: L.Trainer) -> tuple[int, bool]:
        """(the most serious stop code on any rank, whether rank 0 says a save is due)."""
        sig = pending_signal()
        code = SIGNALS[sig] if sig is not None else 0
        now = time.monotonic()
        if code == 0 and self.max_time_s is not None and trainer.training:
            code = TIME_UP if now - self.started >= self.max_time_s else 0
        due = bool(trainer.training) and 0 < self.every_s <= now - self.last_save
        if self.group is None:
            return code, due
        flags = torch.tensor([code, int(due and trainer.is_global_zero)], dtype=torch.int32)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    # --- hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer._signal_connector = _SignalsOwnedByCifarJob(trainer)
        if trainer.world_size > 1 and torch.distributed.is_initialized() and self.group is None:
            # Host memory only: on the training backend (NCCL on GPUs) the per-step agreement
            # would make the host wait for each step's kernels, and the GPU would idle.
            self.group = torch.distributed.new_group(backend="gloo")  # every rank calls it
        if stage == "fit" and self.group is not None:
            choices: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(choices, self.resume_from, group=self.group)
            if len({c is None for c in choices}) > 1:
                raise CifarJobError(
                    f"the ranks see different checkpoints in {self.run_dir} ({choices}): "
                    "--run-dir must be on a filesystem that every node shares"
                )
            # Every rank loads rank 0's choice, whatever its own view of the directory.
            trainer.strategy.checkpoint_io.resume_path = choices[0]  # type: ignore[union-attr]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.strategy.checkpoint_io.resume_path = None  # type: ignore[union-attr]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_save = self.started = time.monotonic()  # clocks count training, not start-up
        code, _ = self._agree(trainer)
        if code:  # signalled during start-up: nothing new to save
            self._stop(trainer, code, save=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        code, due = self._agree(trainer)
        if code:
            self._stop(trainer, code, save=True)
        elif due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # last.ckpt was just written at the epoch's end; a signal during validation stops here.
        self.last_save = time.monotonic()
        code, _ = self._agree(trainer)
        if code:
            self._stop(trainer, code, save=True)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        # No collective per evaluation batch: each rank stops on its own signal (Slurm
        # signals every task). Training is over and saved; a rerun tests again.
        sig = pending_signal()
        if sig is not None:
            self._stop(trainer, SIGNALS[sig], save=False)

    # --- actions

    def save(self, trainer: L.Trainer) -> None:
        """last.ckpt now, from every rank together (rank 0 writes; the others wait)."""
        trainer.save_checkpoint(self.run_dir / LAST, weights_only=False)  # (quiets a log line)
        self.last_save = time.monotonic()

    def _stop(self, trainer: L.Trainer, code: int, save: bool) -> None:
        sig = pending_signal()
        name = signal.Signals(sig).name if sig is not None else "a signal on another rank"
        if code == TIME_UP:
            name = "--max-time reached"
        requeue = code in (TIME_UP, REQUEUE)
        marker = {"step": trainer.global_step, "signal": name, "requeue": requeue, "saved": False}
        if trainer.is_global_zero:  # before the save, whose barrier holds the other ranks
            write_marker(self.run_dir, **marker)
        if save:
            self.save(trainer)
            if trainer.is_global_zero:  # a stop that dies mid-save must not claim a save
                write_marker(self.run_dir, **{**marker, "saved": True})
        what = f"saved {self.run_dir / LAST} at step {trainer.global_step}" if save else "stopped"
        then = "requeue or rerun" if requeue else "rerun (or let Slurm requeue)"
        # An exception, not trainer.should_stop: stopping would still run the epoch-end
        # validation and checkpoints, and those would overwrite this mid-epoch last.ckpt.
        raise Preempted(
            f"{name}: {what}; {then} the same command to resume",
            REQUEUE_EXIT if requeue else STOP_EXIT,
        )
