"""Train an image classifier while watching what it looks at.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/resnet18_cifar10.yaml --data.root /path/to/cifar10
    python train.py --help          # every option, from the classes' signatures

Subcommands: fit, validate, test, predict (LightningCLI). The resolved config is saved as
``config.yaml`` next to the TensorBoard logs; ``audit.py`` reads it back.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_modules import ImageClassifier


class TrainCLI(LightningCLI):
    """LightningCLI that tells the user where everything went when fitting ends."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # argparse takes any unique prefix of an option, so a typo such as
        # --trainer.max_epoch would quietly set max_epochs: every key must be spelled out.
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        log_dir = os.path.abspath(trainer.log_dir or trainer.default_root_dir)
        lines = ["", "Training finished."]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            if ckpt.best_model_path:
                lines.append(f"  best checkpoint : {os.path.abspath(ckpt.best_model_path)}")
            if getattr(ckpt, "last_model_path", ""):
                lines.append(f"  last checkpoint : {os.path.abspath(ckpt.last_model_path)}")
        lines.append(f"  logs and config : {log_dir}")
        maps = os.path.join(log_dir, "explanations")
        if os.path.isdir(maps):
            lines.append(f"  explanation maps: {maps}")
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is not None:
            root = os.path.abspath(tb.root_dir)
            lines.append(f"Look at it with:  tensorboard --logdir {shlex.quote(root)}")
        if ckpt is not None and ckpt.best_model_path:
            best = shlex.quote(os.path.abspath(ckpt.best_model_path))
            lines.append(f"Audit it with:    python audit.py --ckpt {best}")
        print("\n".join(lines), flush=True)


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Build the CLI (``run=False`` only instantiates, which the config tests use)."""
    return TrainCLI(
        ImageClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main(sys.argv[1:] or None)
