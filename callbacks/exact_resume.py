"""ExactResume: what a resumed fit needs, beyond Lightning's own checkpoint, to repeat the
uninterrupted one: the global RNGs seeded per training step, and the training loader's
position in its epoch handed back even when Lightning does not."""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lit_modules.data.cue import derive_seed


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The seed of training batch ``batch_idx`` of ``epoch`` on process ``rank``."""
    return derive_seed("step-rng", seed, epoch, batch_idx, rank)


def seed_global_rngs(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's and Python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ExactResume(Callback):
    """Make a fit resumed from any of its checkpoints end with the uninterrupted fit's weights.

    Lightning restores weights, optimiser, schedulers and loop counters, but

    * no RNG state: a resumed process continued with whatever global RNG state it had, so
      dropout masks (and anything else a training step draws from the global RNGs)
      differed. Here the global RNGs (torch CPU and CUDA, NumPy, Python) are seeded before
      every training batch from ``(seed, epoch, batch, rank)``: a function of the position
      only, whatever ran between steps (validation, explanations, a sanity check);
    * the training loader's position in its epoch (``state_dict`` of a resumable loader:
      the classic path's ``EpochDataLoader``, the fast path's ``DeviceLoader``) is stored
      by Lightning but not handed back when the loader was built before the checkpoint was
      read, which is what ``trainer.estimated_stepping_batches`` does (the ``onecycle`` and
      ``warmup_linear`` schedulers call it): a run resumed mid-epoch then started that
      epoch over. This callback keeps its own copy and hands it to the loader when
      training starts.

    The data's order and augmentation are functions of ``(seed, epoch, index)`` in the
    loaders themselves (``lit_modules/data/classic.py``, ``fast.py``). ``train.py`` adds
    this callback to every fit unless the config already has one. Its checkpoint state is
    a few integers (checkpoints load with ``weights_only=True``).

    Args:
        seed: the seed of the per-step draws; None: ``seed_everything``'s
            (``PL_GLOBAL_SEED``), else a random one. A resumed run takes its checkpoint's,
            so it repeats the draws even when it was started without a fixed seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._trainer: L.Trainer | None = None
        self._loader_state: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self.seed = int(env) if env is not None else int.from_bytes(os.urandom(7), "little")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._loader_state = self._loader_state, None
        loader = trainer.train_dataloader
        if state is not None and callable(getattr(loader, "load_state_dict", None)):
            # The loader skips the batches served only if it resumes in the recorded epoch.
            loader.load_state_dict(state)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_global_rngs(step_seed(self.seed, trainer.current_epoch, batch_idx,
                                   trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed}
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        if callable(getattr(loader, "state_dict", None)):
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self._loader_state = state_dict.get("train_loader")
