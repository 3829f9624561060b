"""Images per second of the input pipeline and of a training epoch: fast vs classic data path.

    python bench/data_path.py [--images 5000] [--batch-size 256] [--train-images 256]
                              [--train-batch-size 64] [--backbone resnet18_cifar] [--threads 1]

Data: synthetic shapes (no files) with CIFAR-10's training augmentation (reflect-padded
random crop of 4 pixels and a horizontal flip) and a spurious cue on two classes, so both
paths do all their per-image work. Each path is timed in three settings: ``fast`` (the
split in memory on the training device, here the CPU, batched augmentation), ``classic``
with ``num_workers`` 0 and 2.

* pipeline: one epoch of training batches and nothing else, after a warm-up epoch (so
  worker start-up is not counted: the classic loader's workers persist between epochs);
  the median of ``--repeats`` epochs.
* training: a Lightning fit of two epochs on ``--train-images`` images, the second one
  timed (from its start to the end of its last step; no validation).

On a CPU the model dominates a training epoch; the pipeline column is what the data path
itself costs, and what it would leave to the model on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings

import lightning as L
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

from timing import TrainEpochClock  # noqa: E402

from lit_modules import ImageClassifier  # noqa: E402
from lit_modules.data import SplitDataset, SyntheticShapesDataModule  # noqa: E402

SETTINGS = [("fast", 0), ("classic", 0), ("classic", 2)]


class CifarStyleShapes(SyntheticShapesDataModule):
    """Synthetic shapes with CIFAR-10's crop (padding 4) added to the flip on train."""

    def _build(self, splits: list[str]) -> dict[str, SplitDataset]:
        out = super()._build(splits)
        if "train" in out:
            out["train"].crop_padding = 4
        return out


def datamodule(images: int, batch_size: int, path: str, workers: int) -> CifarStyleShapes:
    dm = CifarStyleShapes(num_train=images, num_val=16, num_test=16, batch_size=batch_size,
                          num_workers=workers, data_path=path, cue={"classes": [0, 1]}, seed=0)
    dm.setup("fit")  # generation is not part of the pipeline's cost
    return dm


def pipeline_rate(images: int, batch_size: int, path: str, workers: int, repeats: int) -> float:
    """Training images per second served by the loader alone (median epoch)."""
    loader = datamodule(images, batch_size, path, workers).train_dataloader()
    times = []
    for epoch in range(repeats + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        t = time.perf_counter()
        served = sum(batch["image"].shape[0] for batch in loader)
        if epoch > 0:  # the first epoch starts the workers / copies the split: warm-up
            times.append(time.perf_counter() - t)
        assert served == images
    return images / statistics.median(times)


def training_rate(images: int, batch_size: int, path: str, workers: int, backbone: str) -> float:
    """Training images per second of the second of two epochs."""
    L.seed_everything(0, verbose=False)
    clock = TrainEpochClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, callbacks=[clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    model = ImageClassifier(backbone=backbone, scheduler="none", channels_last=True)
    trainer.fit(model, datamodule=datamodule(images, batch_size, path, workers))
    return images / clock.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000, help="images in the pipeline test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed pipeline epochs")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier timings on shared cores)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Only the table: Lightning's banners and tips would bury it.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    rows = []
    for path, workers in SETTINGS:
        pipe = pipeline_rate(args.images, args.batch_size, path, workers, args.repeats)
        train = None
        if not args.skip_training:
            train = training_rate(
                args.train_images, args.train_batch_size, path, workers, args.backbone
            )
        rows.append((path, workers, pipe, train))

    print(f"torch {torch.__version__}, lightning {L.__version__}, Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"pipeline: {args.images} images 32x32, batch {args.batch_size}, median of "
          f"{args.repeats} epochs; training: {args.backbone}, {args.train_images} images, "
          f"batch {args.train_batch_size}, 2nd epoch")
    print()
    print("| data path | workers | pipeline img/s | training img/s |")
    print("| --- | ---: | ---: | ---: |")
    for path, workers, pipe, train in rows:
        train_text = "-" if train is None else f"{train:.1f}"
        print(f"| {path} | {workers} | {pipe:,.0f} | {train_text} |")


if __name__ == "__main__":
    main()
