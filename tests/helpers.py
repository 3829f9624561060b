"""Shared test helpers: tiny training runs through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, *, epochs: int = 2, monitor: dict | None = None,
                data: dict | None = None, logger: bool = True, backbone: str = "resnet18_cifar",
                name: str = "tiny") -> Path:
    """Write a seconds-long synthetic-data training config and return its path."""
    monitor_args = {"methods": ["gradcam"], "num_images": 10, "classes": "true"}
    monitor_args.update(monitor or {})
    data_args = {
        "num_train": 64, "num_val": 40, "num_test": 40, "batch_size": 16, "seed": 0,
        "cue_classes": [0, 1], "cue_p_train": 1.0, "cue_p_eval": 1.0,
    }
    data_args.update(data or {})
    trainer: dict = {
        "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "limit_train_batches": 2,
        "limit_val_batches": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False,
        "default_root_dir": str(tmp_path / "runs"),
        "callbacks": [
            {"class_path": "callbacks.ExplanationMonitor", "init_args": monitor_args},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True}},
        ],
    }
    trainer["logger"] = (
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}}
        if logger else False
    )
    cfg = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"backbone": backbone, "lr": 0.05, "scheduler": "none"},
        "data": {"class_path": "lit_modules.data.SyntheticShapesDataModule", "init_args": data_args},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(args: list[str], run: bool = True):
    """Run train.py's CLI in-process from the repository root; return the CLI object.

    ``run=False`` only parses and instantiates (no subcommand in ``args`` then).
    """
    import train

    cwd = os.getcwd()
    os.chdir(ROOT if run else cwd)
    try:
        return train.main(args, run=run)
    finally:
        os.chdir(cwd)


TINY_BACKBONE = "tiny_test_backbone"


def register_tiny_backbone() -> str:
    """Register (once per process) a millisecond-cheap backbone; return its name.

    For tests that need many epochs or only care about the pipeline around the model:
    conv, BatchNorm, in-place ReLU and max-pool like the real ones, an 8x8 map at 32x32.
    """
    import torch
    from torch import nn

    from lit_modules.backbones import BACKBONES, SplitBackbone, register_backbone

    class TinyBackbone(SplitBackbone):
        default_layer = "trunk"
        min_input_size = 4

        def __init__(self, num_classes: int = 10, pretrained: bool = False) -> None:
            trunk = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            )
            super().__init__(trunk, 16, num_classes)

    if TINY_BACKBONE not in BACKBONES:
        register_backbone(TINY_BACKBONE)(TinyBackbone)
    assert torch.is_tensor(BACKBONES[TINY_BACKBONE]().classifier.weight)
    return TINY_BACKBONE
