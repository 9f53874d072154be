"""The stop-and-resume protocol, in one place.

How a run stops, and how the next start picks up where it stopped:

- **Signals.** USR1 (the sbatch templates' --signal) and USR2 (submitit's) ask for a requeue:
  the job is about to hit its time limit. SIGTERM means the job is being stopped from outside
  (preemption, `scancel`, `scontrol requeue`, `docker stop`, a node going down). The handlers
  only note the signal: saving from inside one would deadlock under DDP, because
  `Trainer.save_checkpoint` ends in a barrier that ranks without the signal never reach.
- **Agreement.** About once a second of training (every K optimizer steps, K chosen by rank
  0 and carried by the agreement itself, so every rank agrees at the same step) the ranks
  agree, with one tiny all-reduce over a gloo group of their own, on whether any of them was
  signalled, whether --max-time is up and whether a periodic save is due (rank 0's clock
  decides both). So they all save the same step, together.
- **Saves** go to the run directory's checkpoint store (rundir.py): an immutable file per
  step (`step-NNNNNNNN.ckpt`, written to a temporary file, fsynced and renamed into place),
  then the `latest` pointer and the `last.ckpt` link, then retention (the newest
  --keep-checkpoints files, and the best). A kill mid-write leaves the previous checkpoint
  whole. Every epoch's end is saved, after the epoch's best is tracked; periodic saves
  (--checkpoint-every) land mid-epoch with the loader's exact position, which bounds what a
  stop without warning (SIGKILL, a lost node, an OOM) can lose.
- **Exit.** Before the save, rank 0 writes the marker `decision.json` (the action for the
  batch script, the step, the signal), and marks it saved once the save is whole. Every rank
  then exits with REQUEUE_EXIT (75) after USR1/USR2, or STOP_EXIT (143, as for a SIGTERM)
  after SIGTERM: never 0, so no stop looks like a finished run. The batch script
  (cifar_job/requeue.sh) carries out the marker's action: it requeues after a time limit and
  leaves a SIGTERM to Slurm, which requeues a preempted job itself, cancels a cancelled one,
  and so on.
- **Resume.** Rank 0 reads the store's pointer (or, if it is damaged, takes the newest file
  that loads) and every rank loads that one; the other ranks read no checkpoint to choose.
  Checkpoints that exist but none of which loads stop the run, rather than train from
  scratch over them.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from cifar_job import CifarJobError, CifarJobWarning, Preempted, events, stops
from cifar_job.rundir import (
    LAST,
    CheckpointStore,
    RunDir,
    clear_decision,
    write_atomic,
    write_decision,
)

# The exit statuses, and what follows each way a start ends, are stops.py's table.
REQUEUE_EXIT, STOP_EXIT = stops.REQUEUE_EXIT, stops.STOP_EXIT
# Why a run stops. A higher code wins when ranks disagree: a SIGTERM anywhere means Slurm is
# stopping the whole job. TIME_UP is --max-time running out (rank 0's clock); it ends the
# start as a time limit does: saved, exit 75, rerun or requeue to continue.
TIME_UP, REQUEUE, STOP = 1, 2, 3
# The ranks agree on stops and saves about once a second of training, not on every step, and
# at least every 100 steps (a collective on every step kept the ranks in lockstep, and its
# latency grows with the world size).
AGREE_EVERY_S, AGREE_MAX_STEPS = 1.0, 100
SIGNALS = {signal.SIGUSR1: REQUEUE, signal.SIGUSR2: REQUEUE, signal.SIGTERM: STOP}
# Held while this process saves to the store: by the main thread for a save, and for good by
# the watchdog's thread once it saves after a hang (the process then ends): never two
# writers, and never a save of the main thread's after the hang's.
STORE_LOCK = threading.Lock()


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
    # SIGQUIT (kill -QUIT PID) prints every thread's stack and goes on, here and in the
    # DataLoader workers forked from here: where a stuck process is, without a debugger.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
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
        self.events_dir: Path | None = None  # a training run's: loads go to its event log

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        write_checkpoint(checkpoint, Path(path))
        if self.after_write is not None:
            self.after_write()

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        chosen = self.resume_path or path
        began = time.monotonic()
        checkpoint = super().load_checkpoint(
            chosen, map_location=map_location, weights_only=weights_only
        )
        run_dir = os.path.realpath(Path(chosen).parent)
        if self.events_dir is not None and rank_zero_only.rank == 0:  # for the ledger
            took = round(time.monotonic() - began, 4)
            events.record(self.events_dir, "load", step=checkpoint.get("global_step"), s=took)
        return rebase(checkpoint, run_dir)


def write_checkpoint(checkpoint: dict[str, Any], target: Path, still_valid: Any = None) -> bool:
    """Write `checkpoint` to `target` atomically and durably (rundir.write_atomic), unless
    `still_valid()` (asked once the file is whole) says that what was written may no longer
    be one state: then the file goes and False is returned."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, lambda f: torch.save(checkpoint, f), still_valid=still_valid)


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


def find_resume_checkpoint(
    run_dir: RunDir | Path, verify: bool = True
) -> tuple[str | None, int | None, dict[str, Any] | None]:
    """The checkpoint in run_dir to resume from, its step and its settings (the config it
    was trained with), or Nones if there is none.

    The store's `latest` first, then its step files newest first: the first that loads
    wins, so a damaged pointer or a newest file cut short costs one file, not the run; unless
    another training checkpoint in the directory (the best one, best-epochNNN.ckpt, or one
    copied in by hand) holds a later step. Skipped files are warned about; if files exist
    but none loads, the run stops instead of training from scratch over them.

    verify=False (every rank but 0) only says whether there is one: rank 0's choice is the
    one every rank loads (CheckpointPolicy.setup), so the others read no checkpoint here.
    """
    run_dir = Path(run_dir)
    store = CheckpointStore(run_dir)
    candidates = store.candidates()
    others = sorted(p for p in run_dir.glob("*.ckpt") if not p.is_symlink() and p not in candidates)
    if not verify:
        first = (candidates or others or [None])[0]
        return (str(first) if first else None), None, None
    found: list[tuple[int, int, str, Any]] = []  # (step, preference, path, settings)
    for path in candidates:
        if (ckpt := _loadable(path)) is not None:
            step, settings = int(ckpt.get("global_step", 0)), ckpt.get("hyper_parameters")
            found.append((step, 2, str(path), settings))
            break
    # The best checkpoint may be newer than the store's: the epoch's best is written before
    # the epoch's step file, and a kill between the two would otherwise cost that epoch.
    for path in others:
        if (ckpt := _loadable(path)) is not None:
            step, preference = int(ckpt.get("global_step", 0)), int(path.name == LAST)
            found.append((step, preference, str(path), ckpt.get("hyper_parameters")))
    if found:
        step, _, path, settings = max(found, key=lambda f: f[:2])
        return path, step, settings
    if candidates or others:
        names = ", ".join(sorted(p.name for p in [*candidates, *others]))
        raise CifarJobError(
            f"{run_dir} holds checkpoints, but none loads ({names})."
            " Move them away to train this run from scratch, or use another --run-dir."
        )
    return None, None, None


def _loadable(path: Path) -> dict[str, Any] | None:
    """The checkpoint at path (memory-mapped: its tensors are not read), or None with a
    warning if it does not load or is no training checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(ckpt, dict) and "state_dict" in ckpt and "loops" in ckpt:
            return ckpt
        reason = "not a training checkpoint"
    except Exception as e:  # a truncated file raises whatever the unpickler hits first
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    warnings.warn(f"skipping unreadable checkpoint {path}: {reason}", CifarJobWarning, stacklevel=3)
    return None


# What the batch script (requeue.sh) does once the step has ended, as Python decided it:
# the run finished; requeue it (a time limit, a hang); wait for Slurm, which is ending the
# job (SIGTERM: preemption, scancel, scontrol requeue); or fail without a requeue (an error
# that another start would meet again).
ACTIONS = ("finished", "relaunch", "requeue", "wait", "fail")


def write_marker(run_dir: Path, action: str, **details: Any) -> None:
    """Record how this start ends, for the batch script, atomically: the action, and the
    step, the signal (or "hang"), whether the save is whole, nodes to exclude. Written
    before a joint save (and again once it is whole): the batch script acts on it even when
    srun reports another status (--kill-on-bad-exit may kill a rank that was exiting after
    the others)."""
    assert action in ACTIONS, action
    write_decision(run_dir, {"action": action, **details})


def clear_leftovers(run_dir: Path) -> None:
    """What an earlier start left that this one takes over (rank 0, before training): its
    marker and hang record, and the temporary files of saves that a kill interrupted (40-90
    MB each). Heartbeats stay: this start's ranks are writing theirs already, and the
    watchdog tells earlier starts' apart."""
    clear_decision(run_dir)
    run = RunDir(run_dir)
    run.hang_record.unlink(missing_ok=True)
    run.hang_claim.unlink(missing_ok=True)
    for tmp in CheckpointStore(run_dir).leftovers():
        tmp.unlink(missing_ok=True)


def check_progress(run_dir: Path, job: str | None, resume_step: int | None, budget: int) -> None:
    """Stop, with one message that names the repeated failure, when the last `budget` starts
    of this Slurm job each ended without a new checkpoint.

    What counts is stops.RULES's: a SIGTERM (preemption, scancel) is Slurm's call and
    neither counts nor breaks the run of failures; anything else that saved nothing new
    counts, a time-limit stop too. A new job (a resubmission, a rerun by hand) starts a new
    count. This is the only restart budget.
    """
    if job is None or budget <= 0:
        return
    starts: list[dict[str, Any]] = []
    for event in events.read(run_dir):
        if event["event"] == "start":
            starts.append({**event, "ends": []})
        elif event["event"] in ("end", "hang", "peer-lost") and starts:
            starts[-1]["ends"].append(event)
    stalled = []
    later = resume_step or 0
    for start in reversed(starts):
        if start.get("job") != job or later > (start.get("step") or 0):
            break  # another job's, or it made a checkpoint
        if any(not stops.decide(e["cause"]).counts for e in start["ends"] if e.get("cause")):
            continue  # Slurm's own stop: nobody's failure
        stalled.append(start)
    if len(stalled) < budget:
        return
    why = [_failure(start["ends"]) for start in reversed(stalled)]
    one = len(stalled) == 1
    each = "it" if one else "each"
    said = f"{each} ended with {why[0]}" if len(set(why)) == 1 else "; ".join(why)
    starts = "start" if one else f"{len(stalled)} starts"
    raise CifarJobError(
        f"the last {starts} of job {job} made no new checkpoint ({each} resumed from step "
        f"{later}): {said}. Stopping instead of requeueing again "
        f"(--max-stalled-starts {budget}). Fix the cause, then resubmit: a new job counts anew."
    )


def _failure(ends: list[dict[str, Any]]) -> str:
    """How a failed start ended, from its events."""
    for event in ends:
        if event["event"] == "hang":
            return f"a hang ({event.get('stopped')})"
        if event["event"] == "peer-lost":
            return f"a lost peer ({event.get('error')})"
    for event in ends:
        if event.get("reason") == "error":
            return f"an error ({event.get('message')})"
    return "no word (killed: out of memory, a lost node, SIGKILL?)"


# ----------------------------------------------------------------------------- the callback


class CheckpointPolicy(Checkpoint):
    """Stops on a signal after saving, saves periodically, and makes every rank resume from
    the checkpoint rank 0 chose. One instance per Trainer; see the module docstring.

    A Checkpoint, so that Lightning calls it after the ModelCheckpoints: at an epoch's end a
    stop then comes after that epoch's best checkpoint and last.ckpt, and a stop signal that
    lands during validation tests the checkpoint an uninterrupted run tests. (Lightning 2.6
    calls the other callbacks' on_train_epoch_end before the checkpoints'.)
    """

    def __init__(
        self,
        run_dir: RunDir | Path,
        every_minutes: float,
        resume_from: str | None,
        max_time_s: float | None = None,
        keep: int = 2,
    ) -> None:
        self.run_dir, self.resume_from = Path(run_dir), resume_from
        self.store = CheckpointStore(run_dir, keep)
        self.saved_step: int | None = None  # the step of this start's newest save
        self.every_s = every_minutes * 60
        # Per start, unlike Lightning's max_time (whose clock a resumed run restores, so a
        # rerun with the same value stopped at once and then reported an unfinished run).
        self.max_time_s = max_time_s
        self.last_save = self.started = time.monotonic()
        self.group: Any = None
        # The step at which the ranks agree next, the same on every rank, and when and at
        # which step they last did (rank 0's clock sets the interval).
        self.next_agreement = 0
        self.agreed = (time.monotonic(), 0)

    # --- agreement

    def _agree(self, trainer: L.Trainer) -> tuple[int, bool]:
        """(the most serious stop code on any rank, whether rank 0 says a save is due).

        Under DDP it is one all-reduce over the ranks' own gloo group, which also carries
        rank 0's choice of the next step to agree at: about AGREE_EVERY_S of steps later, so
        that the collective stays off most steps (a stop waits that long at most, against the
        90-180 s of warning that Slurm's signals give).
        """
        sig = pending_signal()
        code = SIGNALS[sig] if sig is not None else 0
        now = time.monotonic()
        if code == 0 and self.max_time_s is not None and trainer.training:
            code = TIME_UP if now - self.started >= self.max_time_s else 0
        due = bool(trainer.training) and 0 < self.every_s <= now - self.last_save
        if self.group is None:
            return code, due
        step = trainer.global_step
        then, at = self.agreed
        every = 1  # no step timed yet (the first agreement of a start): next step
        if step > at:
            per_step = (now - then) / (step - at)
            every = min(max(int(AGREE_EVERY_S / max(per_step, 1e-6)), 1), AGREE_MAX_STEPS)
        mine = [code, int(due and trainer.is_global_zero), every if trainer.is_global_zero else 0]
        flags = torch.tensor(mine, dtype=torch.int32)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.agreed, self.next_agreement = (now, step), step + int(flags[2])
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
        trainer.strategy.checkpoint_io.events_dir = self.run_dir  # type: ignore[union-attr]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.strategy.checkpoint_io.resume_path = None  # type: ignore[union-attr]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_save = self.started = time.monotonic()  # clocks count training, not start-up
        self.agreed = (self.started, trainer.global_step)
        code, _ = self._agree(trainer)
        if code:  # signalled during start-up: nothing new to save
            self._stop(trainer, code, save=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step < self.next_agreement:
            return  # every rank skips the same steps
        if args[-1] + 1 >= trainer.num_training_batches:
            # The epoch's last step (batch_idx, the same on every rank): its end comes next,
            # and stops there, after validation and the best checkpoint. A stop here would
            # resume into the next epoch with this one never validated.
            return
        code, due = self._agree(trainer)
        if code:
            self._stop(trainer, code, save=True)
        elif due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the ModelCheckpoints: the epoch's best is tracked. Every epoch's end is saved,
        # then a signal that came during validation stops the run here.
        if not trainer.fast_dev_run:
            self.save(trainer)
        code, _ = self._agree(trainer)
        if code:
            self._stop(trainer, code, save=not trainer.fast_dev_run)

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
        """A checkpoint of this step now, from every rank together (rank 0 writes; the
        others wait in the save's barrier), and then the one to resume from."""
        if self.saved_step != trainer.global_step:  # the same on every rank
            path = self.store.path_for(trainer.global_step)
            began = time.monotonic()
            with STORE_LOCK:
                trainer.save_checkpoint(path, weights_only=False)  # (quiets a log line)
                if trainer.is_global_zero:
                    self.store.commit(path)
            if trainer.is_global_zero:  # for the ledger
                took = round(time.monotonic() - began, 4)
                events.record(self.run_dir, "save", step=trainer.global_step, s=took)
            self.saved_step = trainer.global_step
        self.last_save = time.monotonic()

    def _stop(self, trainer: L.Trainer, code: int, save: bool) -> None:
        sig = pending_signal()
        name = signal.Signals(sig).name if sig is not None else "a signal on another rank"
        if code == TIME_UP:
            name = "--max-time reached"
        cause = stops.cause_of_stop(requeue=code == REQUEUE, time_up=code == TIME_UP)
        rule = stops.decide(cause)
        requeue = rule.action == "requeue"
        marker = {
            "action": rule.action,
            "step": trainer.global_step,
            "signal": name,
            "saved": False,
        }
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
        raise Preempted(f"{name}: {what}; {then} the same command to resume", rule.exit_code, cause)
