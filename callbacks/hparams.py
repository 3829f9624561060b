"""HParamsSummary: each fit's hyperparameters in TensorBoard's HParams tab, beside its final
accuracy and shortcut measures, so that runs can be compared by their reliance on a shortcut."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from .tensorboard_layout import SHORTCUTS, scalar_tag

#: The HParams tab's metric columns, the same for every run so that runs line up (a run
#: without one, e.g. without shortcut discovery, leaves its cell empty).
METRICS = ("val/acc", "val/loss", scalar_tag(SHORTCUTS, "confirmed"),
           scalar_tag(SHORTCUTS, "max_margin"))
#: The largest ``margin/<class>`` of the last validation: written by this callback (the
#: monitor logs one curve per class).
MAX_MARGIN = METRICS[-1]
_MARGIN = re.compile("^" + re.escape(scalar_tag(SHORTCUTS, "margin/")))

Scalar = bool | int | float | str


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested options as ``{"a/b/c": scalar}``: what TensorBoard's HParams tab can show.

    ``init_args`` levels (jsonargparse's class entries) are skipped, dataclasses and
    namespaces are opened, ``None`` becomes ``"None"``, a one-element tensor its number,
    anything else (lists, tuples) its ``str``. Keys starting with ``_`` are left out.
    """
    out: dict[str, Scalar] = {}
    for key, value in tree.items():
        key = str(key)
        if key.startswith("_"):
            continue
        name = prefix if key == "init_args" else f"{prefix}/{key}" if prefix else key
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
            value = value.as_dict()
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif torch.is_tensor(value) and value.numel() == 1:
            out[name] = value.item()
        else:
            out[name] = str(value)
    return out


class HParamsSummary(Callback):
    """Write the run's hyperparameters and its final numbers to the HParams tab.

    At the end of training, on rank zero and for every TensorBoardLogger, the model's
    hyperparameters (``model/...``), the datamodule's (``data/...``, when it saves any)
    and ``params`` (train.py gives the parsed ``data`` section and ``seed_everything``),
    flattened by :func:`flatten`, are written as one HParams session whose metrics are
    :data:`METRICS`. TensorBoard reads their values from the run's own scalar curves (the
    last point of ``val/acc`` and so on), so nothing is logged twice; only
    ``explain/shortcuts/max_margin`` is new: the largest shortcut margin the monitor logged
    at the last validation (classes not tested then do not count), one point at that
    validation's step.

    The logger's ``log_hyperparams(params, metrics=...)`` is not used: it logs each metric
    again, a second ``val/acc`` point at the last step, and stores the flattened options
    in ``hparams.yaml``.
    """

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.params = dict(params or {})
        self._before: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._step = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The objects, not the values: Lightning stores a new tensor for every key logged
        # again, so a key still holding the same object was not logged at this validation.
        self._before = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._last = {k: float(v) for k, v in trainer.callback_metrics.items()
                      if self._before.get(k) is not v}
        # Lightning logs a fit's validation at the last training batch's step (see the
        # monitor's _image_step), where val/acc's point is.
        fitting = trainer.state.fn == "fit"
        self._step = max(trainer.global_step - (1 if fitting else 0), 0)

    def metrics(self) -> dict[str, float]:
        """The derived metrics of the last validation: ``{MAX_MARGIN: value}`` or empty."""
        margins = [v for k, v in self._last.items() if _MARGIN.match(k)]
        return {MAX_MARGIN: max(margins)} if margins else {}

    def hyperparameters(self, trainer: L.Trainer, pl_module: L.LightningModule
                        ) -> dict[str, Scalar]:
        """Every option of the run as ``{"model/lr": 0.002, "data/cue/size": 8, ...}``."""
        out = flatten({"model": dict(pl_module.hparams)})
        data = getattr(trainer.datamodule, "hparams", None)
        if data:
            out.update(flatten({"data": dict(data)}))
        out.update(flatten(self.params))
        return out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from torch.utils.tensorboard.summary import hparams

        params = self.hyperparameters(trainer, pl_module)
        experiment, start, end = hparams(params, dict.fromkeys(METRICS, 0.0))
        derived = self.metrics()
        for logger in loggers:
            if derived:
                logger.log_metrics(derived, self._step)
            writer = logger.experiment._get_file_writer()  # as Lightning's log_hyperparams
            for summary in (experiment, start, end):
                writer.add_summary(summary, self._step)
            logger.experiment.flush()
