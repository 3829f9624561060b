"""InterruptCheckpoint: save a resumable checkpoint when fitting is interrupted."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class InterruptCheckpoint(Callback):
    """Write ``<checkpoint dir>/interrupted.ckpt`` when fitting ends in an exception.

    Covers SIGTERM (what schedulers send before they kill a job: Lightning turns it into an
    exception at the next batch boundary), Ctrl-C, and errors such as out-of-memory. The
    file is written atomically (Lightning saves through a temporary file), so a second kill
    during the save leaves the previous checkpoint intact. ``train.py fit --ckpt_path last``
    picks the newer of ``last.ckpt`` and this file. A fit that completes removes it.

    Not saved when the interrupt falls after an epoch's last training batch but before its
    validation: Lightning would resume from such a checkpoint straight into the next epoch
    and never validate (or explain) the interrupted one, leaving a hole in the history;
    ``last.ckpt`` of the previous epoch is used instead and that epoch is trained again.

    With several processes it saves only on SIGTERM (an error on one rank would leave the
    others waiting in the collective save). Lightning's own DDP launcher forwards a
    SIGTERM of the main process to the other ranks, which sometimes die before reaching
    the save; the run then resumes from ``last.ckpt`` (tested).
    ``train.py`` adds this callback to every fit unless the config already has one.

    Args:
        filename: name of the checkpoint file inside the checkpoint folder.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        super().__init__()
        if not filename.endswith(".ckpt") or os.sep in filename:
            raise ValueError(f"filename must be a bare '*.ckpt' name, got {filename!r}")
        self.filename = filename

    def path(self, trainer: L.Trainer) -> str:
        """Where the checkpoint goes: next to ModelCheckpoint's files when there is one."""
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None)
        if not folder:
            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, self.filename)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            rank_zero_warn(
                f"InterruptCheckpoint: {type(exception).__name__} with {trainer.world_size} "
                "processes; not saving (the other ranks may never reach the save). Resume "
                "from last.ckpt."
            )
            return
        if self._epoch_trained_not_validated(trainer):
            rank_zero_warn(
                f"InterruptCheckpoint: {type(exception).__name__} between the last training "
                f"batch of epoch {trainer.current_epoch} and its validation; not saving (a "
                "resume would skip that validation). --ckpt_path last resumes from the "
                "previous epoch's last.ckpt."
            )
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"{type(exception).__name__} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: saved {path}. Resume with: python train.py fit "
            "--config <the same config> --ckpt_path last"
        )

    @staticmethod
    def _epoch_trained_not_validated(trainer: L.Trainer) -> bool:
        # After the last training batch: either the epoch's validation has not finished
        # (resuming here would skip it) or it has, and then ModelCheckpoint's last.ckpt
        # already holds this very state. Either way last.ckpt is the one to resume from,
        # provided validation (and so that save) is due this epoch.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return False
        every = trainer.check_val_every_n_epoch
        due = trainer.enable_validation and (
            every is None or (trainer.current_epoch + 1) % every == 0
        )
        return bool(due)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A finished fit has a newer last.ckpt; a stale interrupt file would only confuse.
        path = self.path(trainer)
        if trainer.is_global_zero and os.path.isfile(path):
            os.remove(path)

    def state_dict(self) -> dict[str, Any]:
        return {}
