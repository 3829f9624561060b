"""The monitor under DDP: rank zero's numbers (or its failure) handed to every rank."""

from __future__ import annotations

import lightning as L


def share(
    trainer: L.Trainer, scalars: dict[str, float] | None, failure: Exception | None
) -> dict[str, float]:
    """Rank zero's scalars on every rank (one broadcast under DDP, nothing otherwise).

    Every rank must log them: ModelCheckpoint runs on every rank, raises where its
    monitored key is missing, and decides with the other ranks whether to save, so all
    ranks need the same value. Rank zero's are broadcast rather than computed on every
    rank, because each rank's BatchNorm statistics move with its own last batch (the
    values would differ slightly, and the ranks could disagree on the best checkpoint),
    and an expensive method would cost every device the time. A failure on rank zero is
    broadcast too, so the other ranks stop instead of waiting forever. Every rank must
    call it (it is a collective under DDP).
    """
    if trainer.world_size == 1:
        return scalars or {}
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    scalars, message = trainer.strategy.broadcast((scalars, message), src=0)
    if message is not None and not trainer.is_global_zero:
        raise RuntimeError(f"ExplanationMonitor failed on global rank 0: {message}")
    return scalars or {}
