"""What the benches share: a bare Trainer that trains and nothing else."""

from __future__ import annotations

from typing import Any

import lightning as L


def bare_trainer(callbacks: list[L.Callback], **options: Any) -> L.Trainer:
    """One device, no logger, checkpoints, progress bar, summary or validation: only the
    training steps (and the callbacks that time them) are left to measure."""
    return L.Trainer(
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **options,
    )
