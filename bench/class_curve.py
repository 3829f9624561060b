"""How fast does the recipe learn each class from scratch? The clean-test accuracy of every
class after every epoch of ``bench_small`` on the removal benchmark's clean tree.

    python bench/class_curve.py [--seeds 0,1,2] [--epochs 8]

It says how noisy "the cue class's accuracy" is (the removal benchmark's win-back
target): a 100-image class of a 41% model swings from epoch to epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import remove_shortcut as rs  # noqa: E402  (data, recipe)
import shortcut_discovery as sd  # noqa: E402


class ClassCurve(L.Callback):
    """Per-class accuracy on fixed images after every training epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.rows: list[tuple[float, list[float]]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        module.eval()
        with torch.no_grad():
            preds = torch.cat([module(self.images[i:i + 256]).argmax(1)
                               for i in range(0, len(self.images), 256)])
        module.train()
        per = [float((preds[self.labels == c] == c).float().mean())
               for c in range(len(sd.CLASSES))]
        self.rows.append((float((preds == self.labels).float().mean()), per))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    data = {part: sd.load_subset(Path(args.data) / f"cifar10-jpeg-{part}.zip", part, n)
            for part, n in (("train", 200), ("test", 100))}
    root = Path(tempfile.mkdtemp(prefix="class_curve_")) / "nocue"
    sd.write_tree(root, "remove-nocue", data)
    images, labels = rs.split_tensors(rs.datamodule(root), "test")
    print("| seed | epoch | accuracy | " + " | ".join(sd.CLASSES) + " |")
    print("| ---: | ---: | ---: |" + " ---: |" * len(sd.CLASSES))
    for seed in (int(s) for s in args.seeds.split(",")):
        L.seed_everything(seed, verbose=False)
        torch.manual_seed(seed)
        curve = ClassCurve(images, labels)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[curve])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(rs.recipe("bench_small"), datamodule=rs.datamodule(root))
        for epoch, (acc, per) in enumerate(curve.rows):
            print(f"| {seed} | {epoch} | {acc:.1%} | " + " | ".join(f"{v:.0%}" for v in per)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
