"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time

import lightning as L


class TrainEpochClock(L.Callback):
    """Seconds of each training epoch, from its start to the end of its last step
    (validation and the epoch-end hooks of later callbacks excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)
