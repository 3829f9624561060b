"""What the explanation monitor costs: quickstart epochs with and without it.

    python bench/monitor_cost.py [--epochs 2] [--config configs/quickstart.yaml] [--methods gradcam]
    python bench/monitor_cost.py --backbone bench_small --num-train 45000 --data-path fast \
        --methods gradcam --num-images 16          # a CIFAR-10-sized epoch

Builds the quickstart's model and data from its YAML (options override the model's
backbone, the number of training images, the data path and the monitor's methods and
image count), trains twice from the same seed (monitor off, monitor on) and prints the
mean epoch time of each and their ratio. The monitor's own time per epoch is measured
around its hook.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import lightning as L
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import small_model  # noqa: E402,F401  (registers bench_small)
from timing import TrainEpochClock  # noqa: E402

from callbacks import ExplanationMonitor  # noqa: E402
from lit_modules import ImageClassifier  # noqa: E402


class EpochClock(TrainEpochClock):
    """Wall time of each epoch (training and validation), from train start to val end."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the epoch ends with validation (and the monitor's hook) here

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._t)


class TimedMonitor(ExplanationMonitor):
    """The monitor, with the time spent in its epoch-end hook recorded."""

    seconds: list[float]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        t = time.perf_counter()
        super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.seconds = getattr(self, "seconds", []) + [time.perf_counter() - t]


def build_data(cfg: dict) -> L.LightningDataModule:
    module, _, name = cfg["data"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**cfg["data"]["init_args"])


def fit(
    cfg: dict, epochs: int, monitor: bool, root: str, overrides: dict | None = None
) -> tuple[list[float], list[float]]:
    L.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    clock = EpochClock()
    callbacks: list[L.Callback] = []
    timed = None
    if monitor:
        args = next(
            c["init_args"] for c in cfg["trainer"]["callbacks"] if "ExplanationMonitor" in c["class_path"]
        )
        timed = TimedMonitor(**{**args, **(overrides or {})})
        callbacks.append(timed)
    callbacks.append(clock)  # last, so its epoch end comes after the monitor's
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks,
        logger=L.pytorch.loggers.TensorBoardLogger(root, name="bench"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ImageClassifier(**cfg["model"]), datamodule=build_data(cfg))
    return clock.times, (timed.seconds if timed else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default=None, help="comma-separated; default: the config's")
    parser.add_argument("--num-images", type=int, default=None, help="the monitor's images")
    parser.add_argument("--backbone", default=None, help="e.g. bench_small (bench/small_model.py)")
    parser.add_argument("--num-train", type=int, default=None, help="training images an epoch")
    parser.add_argument("--data-path", choices=["classic", "fast"], default=None)
    args = parser.parse_args()
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    if args.backbone:
        cfg["model"]["backbone"] = args.backbone
    for key, value in (("num_train", args.num_train), ("data_path", args.data_path)):
        if value is not None:
            cfg["data"]["init_args"][key] = value
    overrides: dict = {}
    if args.methods:
        overrides["methods"] = args.methods.split(",")
    if args.num_images:
        overrides["num_images"] = args.num_images
    print(f"model {cfg['model']['backbone']}, data {cfg['data']['init_args']}, monitor {overrides}")
    with tempfile.TemporaryDirectory() as root:
        off, _ = fit(cfg, args.epochs, monitor=False, root=root)
        on, hook = fit(cfg, args.epochs, monitor=True, root=root, overrides=overrides)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs")
    print(f"epoch without monitor: {mean(off):.1f} s  {[round(t, 1) for t in off]}")
    print(f"epoch with monitor:    {mean(on):.1f} s  {[round(t, 1) for t in on]}")
    print(f"monitor hook:          {mean(hook):.2f} s an epoch  {[round(t, 2) for t in hook]}")
    print(f"ratio with/without:    {mean(on) / mean(off):.3f}")
    print(f"hook share of an epoch with it: {mean(hook) / mean(on):.1%}")


if __name__ == "__main__":
    main()
