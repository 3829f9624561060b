"""PredictionWriter: ``train.py predict`` results as files beside the run's logs."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from explain.records import atomic_save, atomic_write_bytes

PREDICTIONS_PT = "predictions.pt"
PREDICTIONS_CSV = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` to ``predictions.pt`` and ``.csv``.

    ``train.py predict`` adds one when the config has no prediction writer. The split is
    the datamodule's ``predict_dataloader`` (the test split for this project's data).
    Files, written atomically into ``output_dir`` (default: the run's log directory):

    * ``predictions.pt``: ``index`` ``[N]`` (the item's index in its split), ``label``
      ``[N]`` (-1 where unknown), ``pred`` ``[N]`` (argmax class), ``probs`` ``[N, K]``
      float32 and ``class_names`` (list); readable with ``torch.load(weights_only=True)``;
    * ``predictions.csv``: one row per item: ``index, label, pred, confidence`` (the
      predicted class's probability) and one probability column per class.

    Under DDP each process writes the items it predicted, to ``predictions.rank<R>.pt``
    and ``.csv`` (no collective; a sampler may repeat items to even out the ranks).

    Args:
        output_dir: folder of the files (None: ``trainer.log_dir``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self._dir: str | None = None
        self.written: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: every rank reads it here, together.
        self._dir = self.output_dir or trainer.log_dir or trainer.default_root_dir

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Any,
        batch_indices: Any,
    ) -> None:
        batches = predictions
        if batches and isinstance(batches[0], list):  # several predict dataloaders
            batches = [b for loader in batches for b in loader]
        result = {k: torch.cat([b[k] for b in batches]) for k in ("index", "label", "pred", "probs")}
        dm = trainer.datamodule
        result["class_names"] = list(getattr(dm, "class_names", []) or [])
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        folder = self._dir or trainer.default_root_dir
        pt = os.path.join(folder, PREDICTIONS_PT.replace(".pt", f"{suffix}.pt"))
        table = os.path.join(folder, PREDICTIONS_CSV.replace(".csv", f"{suffix}.csv"))
        atomic_save(result, pt)
        atomic_write_bytes(table, self._csv(result).encode("utf-8"))
        self.written = [pt, table]
        print(f"Predictions of {len(result['pred'])} images: {pt}", flush=True)

    @staticmethod
    def _csv(result: dict[str, Any]) -> str:
        probs = result["probs"]
        names = result["class_names"] or [str(k) for k in range(probs.shape[1])]
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["index", "label", "pred", "confidence", *(f"p_{n}" for n in names)])
        conf = probs.gather(1, result["pred"].view(-1, 1)).squeeze(1)
        for i in range(len(probs)):
            w.writerow([int(result["index"][i]), int(result["label"][i]), int(result["pred"][i]),
                        f"{float(conf[i]):.6g}", *(f"{float(p):.6g}" for p in probs[i])])
        return out.getvalue()
