"""The hang watchdog's and the ledger's cost per step, with the real Trainer and callbacks.

The watchdog costs the training loop two things: its hooks in the main thread (a clock
reading and a note per step, evaluation batch and save; the counters of the last completed
step and a copy of the BatchNorm statistics, for the save of a hang) and its thread, which
wakes every 2 s to write a heartbeat file and compare clocks, and may hold the GIL
meanwhile. Both are measured in one run of `cifar-job train`'s own Trainer (build_trainer,
ResNet18 on CPU): the time spent inside the watchdog's hooks, timed around each call, and
the CPU time of the watchdog's thread (from /proc), each as a share of the training time.
Goal: under 0.5% together. The ledger's phase records (phases.py) cost a store to the step
counter per step, timed the same way, and an appended, fsynced line per phase.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

from cifar_job import checkpoints, events
from cifar_job.config import TrainConfig
from cifar_job.module import CifarClassifier
from cifar_job.phases import Phases
from cifar_job.train import build_datamodule
from cifar_job.trainer import build_trainer
from cifar_job.watchdog import Watchdog

warnings.filterwarnings("ignore")
# --smoke: 4 steps of 8 images, a check of the script, not a figure.
STEPS, BATCH = (4, 8) if "--smoke" in sys.argv else (120, 50)


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of this process's thread `native_id`."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # in USER_HZ, 100 on Linux


def timed(base: type, names: tuple[str, ...]) -> type:
    """`base` with the time spent in its hooks `names` added up in the class's `spent`."""
    cls = type(f"Timed{base.__name__}", (base,), {"spent": 0.0})

    def wrap(name: str) -> None:
        hook = getattr(base, name)

        def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            hook(self, *args, **kwargs)
            cls.spent += time.perf_counter() - t0

        setattr(cls, name, run)

    for name in names:
        wrap(name)
    return cls


# The watchdog's per-step hooks: a step's end (the heartbeat's note, the last step's
# counters), the forward passes' start (the copy of the BatchNorm statistics), the backward's
# and the optimizer update's. The ledger's: the step counter's store at a step's end.
TimedWatchdog = timed(
    Watchdog,
    ("on_train_batch_end", "_forward_begins", "on_before_backward", "on_before_optimizer_step"),
)
TimedPhases = timed(Phases, ("on_train_batch_end",))


def record_cost(run_dir: Path, n: int = 50) -> float:
    """Seconds one event-log line takes (appended and fsynced): the ledger's other records,
    a few per epoch and save."""
    t0 = time.perf_counter()
    for i in range(n):
        events.record(run_dir, "bench", i=i)
    return (time.perf_counter() - t0) / n


def main() -> None:
    checkpoints.install_signal_handlers()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            dataset="synthetic",
            synthetic_size=STEPS * BATCH + 200,
            val_size=200,
            arch="resnet18",
            stem="imagenet",
            batch_size=BATCH,
            max_epochs=1,
            num_workers=0,
            run_dir=tmp,
            accelerator="cpu",
        )
        watchdog = TimedWatchdog(Path(tmp))
        watchdog.start()
        phases = TimedPhases(Path(tmp))
        trainer = build_trainer(cfg, Path(tmp), callbacks=[watchdog, phases], progress=False)
        t0 = time.perf_counter()
        trainer.fit(CifarClassifier(cfg.to_dict()), datamodule=build_datamodule(cfg))
        wall = time.perf_counter() - t0
        thread = thread_cpu_s(watchdog._thread.native_id)
        watchdog.stop()
        line = record_cost(Path(tmp))
    steps = trainer.global_step
    spent = TimedWatchdog.spent
    print(
        f"watchdog: {steps} steps of ResNet18 on CPU, {wall / steps * 1000:.0f} ms a step: "
        f"hooks {spent / steps * 1e6:.1f} us a step ({spent / wall:.4%}), "
        f"thread {thread * 1000:.0f} ms of CPU in {wall:.0f} s ({thread / wall:.3%}); "
        f"together {(spent + thread) / wall:.3%} of training (goal: under 0.5%)"
    )
    print(
        f"ledger: the step counter {TimedPhases.spent / steps * 1e6:.1f} us a step "
        f"({TimedPhases.spent / wall:.4%}); one event-log line {line * 1000:.2f} ms "
        f"(a few per epoch and save)"
    )


if __name__ == "__main__":
    main()
