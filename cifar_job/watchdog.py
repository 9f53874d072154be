"""The hang monitor: a thread in every rank that notices when the rank stops making progress.

A Python signal handler runs only between bytecodes of the main thread, and a collective
(gloo, NCCL) waits for every rank: one rank that stops (SIGSTOP, a stalled filesystem, a
hung GPU, a peer that died unnoticed) holds every node of the job, silently, until the
backend's timeout (gloo 30 min, NCCL 10 min). This thread does not depend on the main one:

- **Heartbeats.** The main thread notes each finished training step, evaluation batch and
  save: a clock reading and a step, no I/O (a few microseconds). Every few seconds the
  thread writes this rank's heartbeat (node, pid, step, section, seconds since progress) to
  <run_dir>/heartbeats/rank-N.json.
- **Learned timeouts,** per section: start-up (to the first step), training steps,
  evaluation batches and saves. In steps and evaluation the timeout is HANG_FACTOR times
  the slowest of the recent intervals, with a floor per section; --hang-timeout replaces
  them all.
- **On a hang** the first healthy rank to see it claims it (hang.claim) and names the rank
  that stopped from the heartbeats (a stopped or lost process writes none; a stuck one, an
  old step), in one line of the job log and in hang.json. It **saves the last completed
  step** if it can (LastStep): under DDP every rank holds the same weights and optimizer
  state, and a healthy rank waiting in a collective has not updated them since; the one
  thing its next step's forward pass changed, the BatchNorm statistics, is kept as it was
  when the pass began (BufferShadow). Then it records the decision
  (requeue) in the run directory's marker and ends the process with HANG_EXIT. srun
  --kill-on-bad-exit ends the other ranks, the batch script requeues the job, and it resumes
  from that save (0 steps lost) or else from the newest checkpoint, which saves never leave
  half-written.
- **Stop signals** reach it at once through Python's wakeup fd, also while the main thread
  is blocked. After a stop signal, a main thread that makes no progress for the stop budget
  (STOP_FACTOR times the slowest recent interval, at least STOP_FLOOR_S) is stuck and the
  process exits, as it would after saving but without a save. Outside Slurm a second SIGINT
  or SIGTERM ends the process at once.

The save of a hang (LastStep, BufferShadow, Watchdog.save_last_step) is the one place using
private APIs, each pinned by tests/test_private_apis.py and bounded in pyproject.toml:
`trainer._checkpoint_connector.dump_checkpoint`; the fit loop's progress trackers (LastStep
.PROGRESS), copied as their state_dict() gives them; `torch._foreach_copy_`. It reads no
environment: train.py passes Where (rank, node, start, Slurm or not) from slurm.py.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cifar_job import checkpoints, events, stops
from cifar_job.rundir import CheckpointStore, RunDir, write_json

# 124, as timeout(1) exits: this rank saw no progress for its timeout. The batch script
# requeues on the marker written with it.
HANG_EXIT = stops.HANG_EXIT
# A rank is hung after this many times its slowest recent interval without progress.
HANG_FACTOR = 10
# How long the save of a hang may take before the process ends without it (a hung device or
# filesystem would hold it for ever). A periodic save takes well under a second to seconds.
HANG_SAVE_BUDGET_S = 120.0
# Floors, in seconds. Start-up covers imports from a cold shared filesystem, the rendezvous
# of every rank and the data read into memory, and a first --compile step (minutes); a
# save writes up to GBs to a shared filesystem. Steps and evaluation batches take well under
# a second on a GPU and seconds on a CPU: 30 s is 10x a 3 s step.
FLOORS = {"setup": 600.0, "step": 30.0, "eval": 60.0, "checkpoint": 300.0}
# After a stop signal: the next step ends within about one step's time, so 3x the slowest
# recent one, and at least 10 s, is stuck (Slurm's GraceTime or KillWait ends it otherwise).
STOP_FACTOR, STOP_FLOOR_S = 3, 10.0
RECENT = 50  # intervals remembered per section
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# A fault to inject, for fire drills and tests: KIND:STEP[:RANK[:START]], KIND being stop
# (the rank stops itself with SIGSTOP, as a stalled node would), hang (its main thread
# never returns, as in a stuck collective), kill (SIGKILL, as the OOM killer or a segfault
# would) or error (a Python error of ours, which another start would meet again), in the
# backward pass of the step after STEP, on rank RANK (default 0), in the
# START-th start of the job (default every start; Where.start_number counts requeues and
# relaunches in the allocation). A resumed start at STEP meets it again.
FAULT_VAR = "CIFAR_JOB_FAULT"
FAULT_KINDS = ("stop", "hang", "kill", "error")


@dataclass(frozen=True)
class Where:
    """Where this process runs, as its launcher and Slurm say (train.py reads it through
    slurm.py; this module reads no environment): its rank before the process group is up,
    its node, what its start's ranks share (start_key), the start's number in the job, and
    a fire drill's spec (FAULT_VAR)."""

    rank: int = 0
    node: str = field(default_factory=socket.gethostname)
    start_key: str = field(default_factory=lambda: f"{socket.gethostname()}.{os.getpid()}")
    start_number: int = 1
    under_slurm: bool = False
    fault: str = ""


class LastStep:
    """What a healthy rank needs to save its last completed step from the watchdog's thread,
    noted at each training step's end (a few microseconds): the step; how many forward
    passes and optimizer updates had begun (the main thread counts each before it changes
    anything); and the training loop's progress counters as a save at that point would
    record them (Lightning's loops move them on before the next step's collectives).

    None at the epoch's last step (its end, validation and the best checkpoint follow: a
    save there would resume into the next epoch unvalidated) and until the first step."""

    PROGRESS = ("batch_progress", "scheduler_progress", "automatic_optimization.optim_progress")

    def __init__(self, trainer: L.Trainer, forwards: int, updates: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        self.step, self.forwards, self.updates = trainer.global_step, forwards, updates
        self.loops: dict[str, Any] = {"epoch_loop.state_dict": loop.on_save_checkpoint()}
        for name in self.PROGRESS:
            obj: Any = loop
            for part in name.split("."):
                obj = getattr(obj, part)
            self.loops[f"epoch_loop.{name}"] = plain(obj)


class BufferShadow:
    """The module's saved buffers (BatchNorm's running statistics and counts) as they were
    when the current training forward pass began: one fused copy per dtype and device, tens
    of microseconds. A rank that waits in that step's gradient all-reduce has changed
    nothing else, so its last completed step is its weights, its optimizer and these."""

    def __init__(self, module: torch.nn.Module) -> None:
        saved = module.state_dict(keep_vars=True)
        named = [(n, b) for n, b in module.named_buffers() if saved.get(n) is b]
        groups: dict[tuple[Any, Any], list[tuple[str, torch.Tensor]]] = {}
        for name, buffer in named:
            groups.setdefault((buffer.device, buffer.dtype), []).append((name, buffer))
        self.groups = [
            ([n for n, _ in g], [b for _, b in g], [b.detach().clone() for _, b in g])
            for g in groups.values()
        ]

    def copy(self) -> None:
        with torch.no_grad():
            for _, live, shadow in self.groups:
                torch._foreach_copy_(shadow, live)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for names, _, shadow in self.groups for n, t in zip(names, shadow)}


def plain(progress: Any) -> dict[str, Any]:
    """A Lightning progress tracker as its state_dict() has it, in a fraction of the time
    (dataclasses.asdict deep-copies)."""
    return {
        k: plain(v) if hasattr(v, "__dataclass_fields__") else v for k, v in vars(progress).items()
    }


class Watchdog(Callback):
    """The main thread's progress, as Lightning hooks report it, and the thread that
    watches it. start() before anything slow; stop() when the run ends."""

    def __init__(
        self,
        run_dir: Path,
        hang_timeout_s: float = 0.0,
        exclude_node: bool = False,
        where: Where | None = None,
    ):
        self.run_dir, self.fixed_timeout, self.exclude_node = (
            Path(run_dir),
            hang_timeout_s,
            exclude_node,
        )
        self.run = RunDir(run_dir)
        self.where = where or Where()
        self.rank = self.where.rank
        self.section, self.step = "setup", 0
        self.last_progress = time.monotonic()
        self.recent: dict[str, collections.deque[float]] = {
            s: collections.deque(maxlen=RECENT) for s in ("step", "eval")
        }
        self.stop_signals: list[tuple[float, int]] = []  # (when, signal) as the thread saw them
        self.poll_s = 2.0
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the thread at once
        self.fault = parse_fault(self.where.fault, self.where.start_number)
        self.start_key = self.where.start_key
        self.on_beat: Any = None  # also called every heartbeat (rank 0: the lease's refresh)
        # Called with (reason, message) before this process ends at once (rank 0: the tracker).
        self.on_exit: Any = None
        # For the save of a hang: the trainer, its store, the last completed step, and the
        # forward passes begun so far (a hook on the LightningModule counts them).
        self.trainer: L.Trainer | None = None
        self.store: CheckpointStore | None = None
        self.last_step: LastStep | None = None
        self.shadow: BufferShadow | None = None
        # Training forward calls and optimizer updates begun, the call the shadow is of, and
        # whether the next call is a step's first.
        self.forwards = self.updates = self.shadowed = 0
        self.shadow_due = True
        self._hook: Any = None
        self._thread = threading.Thread(target=self._watch, name="cifar-job-watchdog", daemon=True)

    # --- the main thread's side: no I/O, no locks

    def progress(self, section: str, step: int | None = None) -> None:
        """Note progress in `section`; intervals within steps and evaluation are learned."""
        now = time.monotonic()
        if section == self.section and section in self.recent:
            self.recent[section].append(now - self.last_progress)
        self.section, self.last_progress = section, now
        if step is not None:
            self.step = step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank != self.rank:  # the launcher's guess before DDP was up
            self._beat_path().unlink(missing_ok=True)
            self.rank = trainer.global_rank
        self.trainer = trainer
        policies = [c for c in trainer.callbacks if isinstance(c, checkpoints.CheckpointPolicy)]
        self.store = policies[0].store if policies else None
        if self._hook is None:
            # Under DDP it runs after the forward's buffer broadcast (a collective that a
            # healthy rank waits in, unchanged) and before anything changes.
            self._hook = pl_module.register_forward_pre_hook(self._forward_begins)
        self.shadow = None  # made on the device, at training's start
        # Rank 0's write done, a save is a barrier: as quick as a step, unless a rank is gone.
        io = trainer.strategy.checkpoint_io
        if isinstance(io, checkpoints.AtomicCheckpointIO):
            io.after_write = lambda: self.progress("saved")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.last_step = None

    def _forward_begins(self, module: Any, args: Any) -> None:
        if not module.training:  # evaluation changes no saved state
            return
        self.forwards += 1  # first: a save that reads the shadow sees a copy under way
        if self.shadow_due and self.shadow is not None:  # a step's first call (DDP: of two)
            self.shadow.copy()
            self.shadowed, self.shadow_due = self.forwards, False

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        self.updates += 1  # the weights, the optimizer state, the epoch's sums change next

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shadow = BufferShadow(pl_module)
        self.progress("start", trainer.global_step)  # not "step": start-up is not a step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.progress("step", trainer.global_step)
        last = args[-1] + 1 >= trainer.num_training_batches  # batch_idx
        self.last_step = None if last else LastStep(trainer, self.forwards, self.updates)
        self.shadow_due = True

    def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
        # Mid-step, its forward pass done: where a stalled node most often stops a rank.
        if self.fault and self.fault[1:] == (trainer.global_step, trainer.global_rank, True):
            inject(self.fault[0], trainer.global_step, trainer.global_rank, self.run_dir)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress("eval-start")

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.progress("eval")

    on_test_start = on_validation_start
    on_test_batch_end = on_validation_batch_end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress("setup")  # fit's teardown, then test's set-up and loading the best

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Before Lightning tears the trainer down: a healthy rank still holds the last step.
        if isinstance(exception, Exception) and stops.cause_of_error(exception) == "peer-lost":
            said = f"{type(exception).__name__}: {exception}".splitlines()[0]
            self.end_peer_lost(said if len(said) <= 160 else said[:159] + "…")

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        if threading.current_thread() is threading.main_thread():  # not the hang's save
            self.progress("checkpoint")  # every rank dumps its state, rank 0 writes, all wait

    # --- the thread

    def start(self) -> None:
        """Watch from now on (start-up counts, with its own floor)."""
        self.last_progress = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; the heartbeat file goes (a finished rank is not a hung one)."""
        self._done.set()
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 1)
        self._beat_path().unlink(missing_ok=True)

    def timeout(self, stopping: bool = False) -> float:
        """Seconds without progress after which this rank counts as hung (or stuck, once a
        stop signal came) in its current section."""
        section = {"start": "step", "saved": "step", "eval-start": "eval"}.get(
            self.section, self.section
        )
        recent = self.recent.get(section)
        slowest = max(recent) if recent else 0.0
        if stopping and section != "checkpoint":
            return max(STOP_FLOOR_S, STOP_FACTOR * slowest)
        if self.fixed_timeout:
            return self.fixed_timeout
        if section in ("step", "eval") and not recent and self.section != "saved":
            # No interval learned yet: the first steps after start-up, or the first batch
            # of an evaluation, may still be warming up.
            return FLOORS["setup"] if self.section == "start" else FLOORS[section]
        return max(FLOORS[section], HANG_FACTOR * slowest)

    def _watch(self) -> None:
        readers = [self._wake_r]
        if (signals := checkpoints.wakeup_reader()) is not None:
            readers.append(signals)
        self._write_beat(time.monotonic())  # a rank that stops early is still known
        while not self._done.is_set():
            waited = time.monotonic()
            ready, _, _ = select.select(readers, [], [], self.poll_s)
            now = time.monotonic()
            if now - waited > 4 * self.poll_s:
                # A wait of poll_s that took far longer: this whole process was stopped
                # (SIGSTOP) and is continued. Its main thread gets a chance to move before the
                # stop counts against it; if others were held meanwhile, they have acted.
                self.last_progress = max(self.last_progress, now - self.poll_s)
            if signals in ready:
                self._signals(os.read(signals, 64))
            if self._done.is_set():
                return
            self._write_beat(now)
            stopping = bool(self.stop_signals) or checkpoints.pending_signal() is not None
            idle = now - self.last_progress
            if idle > self.timeout(stopping):
                if stopping:
                    self._end_stuck_stop(idle)
                else:
                    self._end_hang(idle)

    def _signals(self, data: bytes) -> None:
        now = time.monotonic()
        for signum in data:
            if signum in checkpoints.SIGNALS or signum in STOP_SIGNALS:
                if self.rank == 0 and not self.stop_signals:  # for the ledger: when it came
                    events.record(self.run_dir, "signal", name=signal.Signals(signum).name)
                self.stop_signals.append((now, signum))
        stops = [s for _, s in self.stop_signals if s in STOP_SIGNALS]
        if len(stops) >= 2 and not self.where.under_slurm:
            name = signal.Signals(stops[-1]).name
            self._exit(128 + stops[-1], f"a second {name}: stopping now, without a save")

    # --- what it writes

    def _beat_path(self) -> Path:
        return self.run.heartbeat(self.rank)

    def _beat(self, now: float) -> dict[str, Any]:
        return {
            "start": self.start_key,
            "rank": self.rank,
            "node": self.where.node,
            "pid": os.getpid(),
            "step": self.step,
            "section": self.section,
            "idle_s": round(now - self.last_progress, 1),
            "timeout_s": round(self.timeout(), 1),
            "time": time.time(),
        }

    def _write_beat(self, now: float) -> None:
        if self.on_beat is not None:
            self.on_beat()
        try:
            self._beat_path().parent.mkdir(exist_ok=True)
            # Not fsynced: a heartbeat is worthless after a power loss, and an fsync on a slow
            # shared filesystem would hold this thread, which must notice hangs.
            write_json(self._beat_path(), self._beat(now), durable=False)
        except OSError:
            pass  # a full or stalled filesystem: the idle time tells, not this

    def _end_hang(self, idle: float) -> None:
        """Name who stopped, record the decision, and end this process."""
        now = time.monotonic()
        beats = self._read_beats()
        me = self._beat(now)
        beats[self.rank] = me
        # A rank whose thread stopped writing (stopped, dead, its node lost) is the cause; else
        # the one that has made no progress the longest.
        # A live rank's thread writes every poll_s; --hang-timeout's least value, 10 s, leaves
        # a stopped rank's last heartbeat older than this.
        stale = [b for b in beats.values() if time.time() - b["time"] > 2.5 * self.poll_s]
        culprits = stale or [max(beats.values(), key=lambda b: (b["idle_s"], -b["step"]))]
        named = "; ".join(
            f"rank {b['rank']} on {b['node']} (pid {b['pid']}), last heard at step {b['step']} "
            f"in {b['section']}, "
            + (
                f"no heartbeat for {time.time() - b['time']:.0f} s"
                if b in stale
                else f"no progress for {b['idle_s']:.0f} s"
            )
            for b in sorted(culprits, key=lambda b: b["rank"])
        )
        record = {
            "detected_by": me,
            "stopped": culprits,
            "ranks": sorted(beats.values(), key=lambda b: b["rank"]),
        }
        exclude = sorted({b["node"] for b in culprits}) if self.exclude_node else []
        if any(b["rank"] == self.rank for b in culprits):
            # Where this rank's own main thread stopped, for the log: the hang's cause. And
            # its children's (DataLoader workers: a rank often waits on one that never
            # answers), which print theirs on SIGQUIT (checkpoints.install_signal_handlers).
            print(
                f"cifar-job: rank {self.rank}'s threads at the hang:", file=sys.stderr, flush=True
            )
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            for child in children():  # one at a time: their dumps would interleave
                signal_children(signal.SIGQUIT, [child])
                time.sleep(0.5)
        # Every healthy rank gets here at about the same time; the first one acts.
        if not self._claim():
            # Its save and record first: srun ends the step at the first exit.
            deadline = time.monotonic() + HANG_SAVE_BUDGET_S + 3 * self.poll_s
            while time.monotonic() < deadline and not self.run.hang_record.exists():
                time.sleep(0.2)
            self._exit(HANG_EXIT, None)
        bound = self.timeout()
        saved = self.save_last_step()
        record["saved_step"] = saved
        try:
            checkpoints.write_marker(
                self.run_dir,
                stops.decide("hang").action,
                step=self.step if saved is None else saved,
                signal="hang",
                saved=saved is not None,
                exclude=",".join(exclude) or None,
                lost=",".join(sorted({b["node"] for b in culprits})),  # not in a relaunch
            )
            write_json(self.run.hang_record, record)
        except OSError:
            pass
        who = ", ".join(f"rank {b['rank']} on {b['node']}" for b in culprits)
        who += f", after step {self.step}"
        events.record(
            self.run_dir, "hang", step=self.step, stopped=who, idle_s=round(idle, 1), saved=saved
        )
        then = (
            f"saved step {saved}, the last completed one"
            if saved is not None
            else "the newest checkpoint stands"
        )
        self._exit(
            HANG_EXIT,
            f"hang: {named}; rank {self.rank} on {me['node']} saw no progress for {idle:.0f} s "
            f"(bound {bound:.0f} s). Ending this start; {then} ({self.run.hang_record})",
        )

    def end_peer_lost(self, error: str) -> None:
        """A collective failed because a peer is gone (stops.cause_of_error): as after a hang,
        the first healthy rank saves the last completed step if it still holds it and
        records the decision (relaunch), and every rank ends at once; its process group is
        broken, and tearing it down may block."""
        rule = stops.decide("peer-lost")
        if not self._claim():
            deadline = time.monotonic() + HANG_SAVE_BUDGET_S + 3 * self.poll_s
            while time.monotonic() < deadline and not self.run.decision_env.exists():
                time.sleep(0.2)
            self._exit(rule.exit_code, f"rank {self.rank}: a peer is lost ({error})")
        saved = self.save_last_step()
        step = self.step if saved is None else saved
        try:
            decision = json.loads(self.run.decision.read_text())
        except (OSError, ValueError):
            decision = {}
        if decision.get("action") == "fail":
            # A rank failed on its own (its error, not a lost peer), and said so first: the
            # others' errors follow from it, and another start would meet it again.
            self._exit(rule.exit_code, f"rank {self.rank}: a peer failed ({error})")
        try:
            checkpoints.write_marker(
                self.run_dir,
                rule.action,
                step=step,
                signal="peer-lost",
                saved=saved is not None,
                message=error,
            )
        except OSError:
            pass
        events.record(self.run_dir, "peer-lost", step=self.step, error=error, saved=saved)
        then = (
            f"saved step {saved}, the last completed one"
            if saved is not None
            else "the newest checkpoint stands"
        )
        self._exit(
            rule.exit_code,
            f"a peer is lost: rank {self.rank} on {self.where.node} saw {error!r} after step "
            f"{self.step}. Ending this start; {then}",
        )

    def _claim(self) -> bool:
        """Whether this rank is the one that acts on this start's hang: the first to create
        hang.claim (atomically, also on a shared filesystem). An earlier start's is taken
        over."""
        path = self.run.hang_claim
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    if path.read_text().strip() == self.start_key:
                        return False
                    path.unlink()  # an earlier start's
                except OSError:
                    pass
                continue
            except OSError:
                return True  # an unwritable directory: act, as before claims existed
            with os.fdopen(fd, "w") as f:
                f.write(self.start_key + "\n")
            return True
        return False

    def save_last_step(self) -> int | None:
        """Save the last completed training step from this thread, if this rank still holds
        it: no forward pass began since (a rank waiting in a collective), no save of the main
        thread's is under way, and the write ends within HANG_SAVE_BUDGET_S. Returns the
        step, or None (then the newest checkpoint stands). Holds the store for good: the
        process ends next, and its main thread, if the collective comes back meanwhile,
        writes nothing more."""
        last, trainer, store, shadow = self.last_step, self.trainer, self.store, self.shadow
        if last is None or trainer is None or store is None or shadow is None:
            return None
        forwards = self.forwards
        # Waiting before the next step's forward pass, or in its backward pass (the shadow
        # holds the buffers of the pass's start); an update begun means too late.
        mid_step = forwards > last.forwards and self.shadowed == last.forwards + 1
        if self.updates != last.updates or not (forwards == last.forwards or mid_step):
            return None
        if not checkpoints.STORE_LOCK.acquire(blocking=False):
            return None  # the main thread is saving: its save, or none
        saved: list[int] = []

        def unchanged() -> bool:
            return self.forwards == forwards and self.updates == last.updates

        def write() -> None:
            try:
                save()
            except Exception as e:  # noqa: BLE001 (the process ends next, saved or not)
                print(f"cifar-job: the hang's save failed: {e!r}", file=sys.stderr, flush=True)

        def save() -> None:
            path = store.path_for(last.step)
            if store.latest() == path:  # the main thread saved this step already
                saved.append(last.step)
                return
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            checkpoint["loops"]["fit_loop"].update(last.loops)
            if mid_step:
                checkpoint["state_dict"].update(shadow.state())
            if checkpoint["global_step"] != last.step or not unchanged():
                return
            if checkpoints.write_checkpoint(checkpoint, path, still_valid=unchanged):
                store.commit(path)
                saved.append(last.step)
                took = round(time.monotonic() - began, 4)
                events.record(self.run_dir, "save", step=last.step, s=took, hang=True)

        began = time.monotonic()
        writer = threading.Thread(target=write, name="cifar-job-hang-save", daemon=True)
        writer.start()
        writer.join(HANG_SAVE_BUDGET_S)
        return saved[0] if saved else None

    def _end_stuck_stop(self, idle: float) -> None:
        """A stop signal came, and the main thread has not moved since: exit as after a
        save (the batch script then requeues or leaves it to Slurm), without one."""
        sig = checkpoints.pending_signal() or self.stop_signals[-1][1]
        requeue = checkpoints.SIGNALS.get(signal.Signals(sig), checkpoints.STOP)
        rule = stops.decide(stops.cause_of_stop(requeue == checkpoints.REQUEUE, stuck=True))
        try:
            if self.rank == 0:
                checkpoints.write_marker(
                    self.run_dir,
                    rule.action,
                    step=self.step,
                    signal=signal.Signals(sig).name,
                    saved=False,
                )
        except OSError:
            pass
        self._exit(
            rule.exit_code,
            f"{signal.Signals(sig).name}: rank {self.rank} made no progress for {idle:.0f} s "
            f"after the signal (stuck, e.g. in a collective); exiting without a save, the "
            "newest checkpoint stands",
        )

    def _read_beats(self) -> dict[int, dict[str, Any]]:
        beats = {}
        for path in self.run.heartbeat_files():
            try:
                beat = json.loads(path.read_text())
                if beat["start"] == self.start_key:  # not a rank of an earlier start
                    beats[int(beat["rank"])] = beat
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return beats

    def _exit(self, code: int, message: str | None) -> None:
        """One line in the job log, the children (DataLoader workers, local DDP ranks) ended,
        and this process gone at once: its main thread may never return."""
        if message:
            print(f"cifar-job: {message}", file=sys.stderr, flush=True)
        if self.on_exit is not None:
            try:
                self.on_exit("hang" if code == HANG_EXIT else "stopped", message)
            except Exception:  # noqa: BLE001 (nothing may keep this process from ending)
                pass
        sys.stdout.flush()
        kill_children()
        os._exit(code)


def children() -> list[int]:
    """This process's children (Linux's /proc; elsewhere none)."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:
            found.append(int(stat.parent.name))
    return sorted(found)


def signal_children(signum: int, pids: list[int] | None = None) -> int:
    """Send signum to this process's children (or to pids of them); how many got it."""
    sent = 0
    for pid in children() if pids is None else pids:
        try:
            os.kill(pid, signum)
            sent += 1
        except OSError:
            pass
    return sent


def kill_children() -> None:
    """SIGKILL this process's children."""
    signal_children(signal.SIGKILL)


def parse_fault(spec: str, this_start: int = 1) -> tuple[str, int, int, bool] | None:
    """(kind, step, rank, whether this start, the job's `this_start`-th, is the one) from
    FAULT_VAR's value, or None."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        kind, step = parts[0], int(parts[1])
        rank = int(parts[2]) if len(parts) > 2 else 0
        start = int(parts[3]) if len(parts) > 3 else None
    except (IndexError, ValueError):
        kind = ""
    if kind not in FAULT_KINDS:
        raise ValueError(
            f"{FAULT_VAR}={spec!r}: use KIND:STEP[:RANK[:START]], KIND one of "
            + ", ".join(FAULT_KINDS)
        )
    return kind, step, rank, start in (None, this_start)


def inject(kind: str, step: int, rank: int, run_dir: Path | None = None) -> None:
    """Fail as FAULT_VAR asked: stop this process, kill it, or never return."""
    does = {"stop": "stops", "hang": "hangs", "kill": "is killed", "error": "fails"}[kind]
    print(f"cifar-job: {FAULT_VAR}: rank {rank} {does} after step {step}", flush=True)
    if kind == "error":
        raise ValueError(f"{FAULT_VAR}: a bug of ours on rank {rank}")
    if kind == "kill":  # as the OOM killer or a segfault would: no word, no save
        if run_dir is not None:  # when, for the seconds to recover (tests, bench/faults.py)
            events.record(run_dir, "fault", kind=kind, rank=rank, step=step)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return  # continued: on into the next collective, as a stalled node that came back
    while True:
        time.sleep(3600)
