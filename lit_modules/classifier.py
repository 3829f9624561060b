"""The LightningModule that trains a backbone as an image classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .backbones import build_backbone


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from the project's dict batches or plain ``(x, y)`` tuples."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


class ImageClassifier(L.LightningModule):
    """A backbone trained with cross-entropy; metrics ``train/loss``, ``val/loss``, ``val/acc``.

    Args:
        backbone: registered backbone name (``resnet18_cifar`` or ``vgg16_gap``).
        num_classes: number of output classes.
        pretrained: start from torchvision's ImageNet weights (see README).
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``; ignored when LightningCLI's
            ``optimizer:`` section is given.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum.
        scheduler: ``onecycle`` (per step), ``cosine`` (per epoch) or ``none``; ignored
            when LightningCLI's ``lr_scheduler:`` section is given.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep weights and inputs in channels-last memory format (faster
            convolutions on recent CPUs and on GPUs).
    """

    # The explanation engine reads the features/head split from this attribute.
    explain_backbone = "backbone"

    def __init__(
        self,
        backbone: str = "resnet18_cifar",
        num_classes: int = 10,
        pretrained: bool = False,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if scheduler not in ("onecycle", "cosine", "none"):
            raise ValueError(f"scheduler must be 'onecycle', 'cosine' or 'none', got {scheduler!r}")
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, num_classes=num_classes, pretrained=pretrained)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def default_layer(self) -> str:
        """Qualified name of the backbone's explanation layer inside this module."""
        return f"{self.explain_backbone}.{self.backbone.default_layer}"

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse a batch the backbone cannot take, naming the expected and actual shape.

        Shape checks only (no device sync), so it is cheap enough for every step; without
        it a wrong input surfaces as a conv or pooling error deep in the backbone.
        """
        c, size = self.backbone.in_channels, self.backbone.min_input_size
        if x.dim() != 4 or x.shape[1] != c or min(x.shape[-2:]) < size:
            name = self.hparams.backbone
            raise ValueError(
                f"{name} expects images [B, {c}, H, W] with H, W >= {size} (32x32 for "
                f"CIFAR-10), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _step(self, batch: Any, stage: str, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = unpack_batch(batch)
        logits = self(x)
        loss = self.criterion(logits, y)
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=x.shape[0])
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "train",
                 batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # No weight decay on BatchNorm and bias parameters (standard for ResNet training).
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "onecycle":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=hp.lr, total_steps=max(total, 1), pct_start=0.25
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.trainer.max_epochs or 1, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
