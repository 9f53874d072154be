"""The hang watchdog's cost per step, with the real Trainer and the project's callbacks.

The watchdog costs the training loop two things: its hooks in the main thread (a clock
reading and a note per step, evaluation batch and save) and its thread, which wakes every
2 s to write a heartbeat file and compare clocks, and may hold the GIL meanwhile. Both are
measured in one run of `cifar-job train`'s own Trainer (build_trainer, every callback,
ResNet18 on CPU): the time spent inside the watchdog's hooks, timed around each call, and
the CPU time of the watchdog's thread (from /proc), each as a share of the training time.
Goal: under 0.5% together.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

from cifar_job import checkpoints
from cifar_job.config import TrainConfig
from cifar_job.module import CifarClassifier
from cifar_job.train import build_datamodule
from cifar_job.trainer import build_trainer
from cifar_job.watchdog import Watchdog

warnings.filterwarnings("ignore")
STEPS = 120


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of this process's thread `native_id`."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # in USER_HZ, 100 on Linux


class Timed(Watchdog):
    """The watchdog, with the time spent in its per-step hook counted."""

    spent = 0.0

    def on_train_batch_end(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        Timed.spent += time.perf_counter() - t0


def main() -> None:
    checkpoints.install_signal_handlers()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            dataset="synthetic",
            synthetic_size=STEPS * 50 + 200,
            val_size=200,
            arch="resnet18",
            stem="imagenet",
            batch_size=50,
            max_epochs=1,
            num_workers=0,
            run_dir=tmp,
            accelerator="cpu",
        )
        watchdog = Timed(Path(tmp))
        watchdog.start()
        trainer = build_trainer(cfg, Path(tmp), callbacks=[watchdog], progress=False)
        t0 = time.perf_counter()
        trainer.fit(CifarClassifier(cfg.to_dict()), datamodule=build_datamodule(cfg))
        wall = time.perf_counter() - t0
        thread = thread_cpu_s(watchdog._thread.native_id)
        watchdog.stop()
    steps = trainer.global_step
    print(
        f"watchdog: {steps} steps of ResNet18 on CPU, {wall / steps * 1000:.0f} ms a step: "
        f"hooks {Timed.spent / steps * 1e6:.1f} us a step ({Timed.spent / wall:.4%}), "
        f"thread {thread * 1000:.0f} ms of CPU in {wall:.0f} s ({thread / wall:.3%}); "
        f"together {(Timed.spent + thread) / wall:.3%} of training (goal: under 0.5%); "
        f"{(Timed.spent / steps + thread / wall * 0.01) / 0.01:.3%} of a 10 ms GPU step"
    )


if __name__ == "__main__":
    main()
