"""The LightningModule that trains a backbone as an image classifier."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .backbones import build_backbone
from .head_refit import FeatureBank, fit_head
from .shortcut_projection import recording_head_inputs
from .shortcut_removal import Remover, ShortcutRemoval

SCHEDULERS = ("onecycle", "cosine", "warmup_cosine", "warmup_linear", "none")


def warmup_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """LR multiplier at optimiser step ``step`` of ``total``: linear warm-up, then decay.

    Warm-up climbs ``1/warmup, 2/warmup, ..., 1`` over the first ``warmup`` steps; the rest
    decays towards 0 (``cosine`` or ``linear``) without reaching it, so no step is wasted
    at a zero rate and the peak is held for one step only.
    """
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    if step < warmup:
        return (step + 1) / warmup
    # The decay starts one step after the warm-up's peak (at the peak without a warm-up).
    t = (step - warmup + 1) / (total - warmup + 1) if warmup > 0 else step / total
    t = min(t, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t


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
        scheduler: ``onecycle`` (per step), ``cosine`` (per epoch), ``warmup_cosine`` or
            ``warmup_linear`` (per step: linear warm-up to ``lr``, then cosine or linear
            decay; for large batches) or ``none``; ignored when LightningCLI's
            ``lr_scheduler:`` section is given.
        warmup_fraction: share of all optimiser steps spent warming up (``warmup_*``).
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep weights and inputs in channels-last memory format (faster
            convolutions on recent CPUs and on GPUs).
        compile: run the training, validation and test steps through
            ``torch.compile(backbone)``. ``forward`` (what the explanation engine, the
            monitor and the audit call) stays eager on the same weights, so hooks and layer
            names work as usual; the checkpoint's keys do not change.
        init_weights: a checkpoint whose model weights a ``fit`` starts from (not its
            optimizer, scheduler or epoch counter: a fine-tuning run, unlike
            ``--ckpt_path``, which resumes). Read when fitting starts, so a model built from
            the config elsewhere (an audit) never needs the file.
        shortcut_removal: fine-tune away confirmed shortcuts (class and box each, or a
            class's filter) with a counter-measure: decorrelating augmentation, an
            attribution penalty, both, or
            a re-fit of the head on a frozen backbone (``refit``; see
            ``lit_modules/shortcut_removal.py``). ``audit.py`` writes this option
            into ``remove_shortcuts.yaml`` when it confirms a shortcut.

    Logging is sync-free per step: losses are logged as tensors, accuracy as a torchmetrics
    state, and ``train/loss`` is kept off the progress bar, because Lightning converts
    every progress-bar value to a Python float at every step (a host-device sync).
    """

    # The explanation engine reads the features/head split from this attribute.
    explain_backbone = "backbone"

    def __init__(
        self,
        backbone: str = "resnet18_cifar",
        num_classes: int = 10,
        pretrained: bool = False,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: Literal["onecycle", "cosine", "warmup_cosine", "warmup_linear",
                           "none"] = "onecycle",
        warmup_fraction: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        init_weights: str | None = None,
        shortcut_removal: ShortcutRemoval | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        removal = ShortcutRemoval.coerce(shortcut_removal)
        self.save_hyperparameters(ignore=["shortcut_removal"])
        # Primitives only, so that checkpoints keep loading with weights_only=True.
        self.hparams["shortcut_removal"] = None if removal is None else removal.as_dict()
        self.removal_config = removal
        self.remover: Remover | None = None  # made when fitting starts (reads the pixels)
        # ``refit`` takes no optimizer step: the head is fitted by L-BFGS at each epoch's end.
        self.automatic_optimization = removal is None or removal.method != "refit"
        self.refit_bank = FeatureBank()
        self.backbone = build_backbone(backbone, num_classes=num_classes, pretrained=pretrained)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Made on first use, and kept out of the module tree (``__dict__``) so that the
        # state dict has no second copy of the weights under another prefix.
        self.__dict__["compiled_backbone"] = None

    def __getstate__(self) -> dict[str, Any]:
        # A compiled wrapper does not pickle (deepcopy, spawn); it is rebuilt on first use.
        state = dict(super().__getstate__())
        state["compiled_backbone"] = None
        return state

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
        exact = getattr(self.backbone, "exact_input_size", False)
        if x.dim() != 4 or x.shape[1] != c:
            fits = False
        else:
            fits = tuple(x.shape[-2:]) == (size, size) if exact else min(x.shape[-2:]) >= size
        if not fits:
            want = f"H = W = {size}" if exact else f"H, W >= {size}"
            raise ValueError(
                f"{self.hparams.backbone} expects images [B, {c}, H, W] with {want}, got "
                f"{tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eager logits (also with ``compile``): what explanations and audits run."""
        self.check_input(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the training/evaluation steps, through the compiled backbone if asked."""
        if not self.hparams.compile:
            return self(x)
        self.check_input(x)
        if self.compiled_backbone is None:
            self.__dict__["compiled_backbone"] = torch.compile(self.backbone)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.compiled_backbone(x)

    def _step(self, batch: Any, stage: str, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = unpack_batch(batch)
        return self._finish(stage, self._logits(x), y, acc)

    def _finish(self, stage: str, logits: torch.Tensor, y: torch.Tensor,
                acc: MulticlassAccuracy, extra: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss (plus ``extra``, a counter-measure's term; ``weight``: per-class
        weights of the cross-entropy, a weighted mean) with its logging."""
        if weight is None:
            loss = self.criterion(logits, y)
        else:
            loss = nn.functional.cross_entropy(
                logits, y, weight=weight.to(logits.dtype),
                label_smoothing=self.criterion.label_smoothing)
        if extra is not None:
            loss = loss + extra
        acc.update(logits, y)  # update, not forward: no per-batch accuracy is computed
        on_step = stage == "train"
        # sync_dist: under DDP the epoch's val/test loss is averaged over ranks (one
        # all-reduce per epoch); the train loss stays per rank so steps never sync.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=not on_step,
                 batch_size=y.shape[0], sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "train",
                 batch_size=y.shape[0])
        return loss

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.hparams.init_weights and not getattr(self, "_init_loaded", False):
            # Lightning restores a --ckpt_path after setup, so a resumed fine-tuning run
            # ends with the checkpoint's weights, not these.
            self.load_init_weights(self.hparams.init_weights)
        if self.removal_config is not None and self.remover is None:
            self.remover = Remover.from_config(self.removal_config)

    def load_init_weights(self, path: str | Path) -> None:
        """Copy the model weights of checkpoint ``path`` (``weights_only``) into this module."""
        from .checkpoint_file import load_checkpoint, load_weights

        load_weights(self, load_checkpoint(path), f"init_weights {str(path)!r}",
                     f"this model ({self.hparams.backbone}, {self.hparams.num_classes} "
                     "classes)")
        self.__dict__["_init_loaded"] = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        remover = self.remover
        if remover is None:
            return self._step(batch, "train", self.train_acc)
        x, y = unpack_batch(batch)
        if remover.augments:
            # Seeded by (epoch, batch): a resumed run draws what the uninterrupted one drew.
            x = remover.augment(x, y, self.current_epoch * 1_000_003 + batch_idx)
        weight = remover.loss_weights(self.hparams.num_classes, x.device)
        if remover.refits:
            self._refit_step(x, y, weight)
            return None
        if not remover.penalises:
            return self._finish("train", self._logits(x), y, self.train_acc, weight=weight)
        step = self.current_epoch * 1_000_003 + batch_idx
        if remover.needs_input_grad:
            x = x.detach().requires_grad_(True)
            logits = self(x)  # eager: the input gradient needs a double backward
            penalty = remover.penalty(self, x, y, logits, step)
        else:
            logits = self._logits(x)
            penalty = remover.penalty(self._logits, x, y, logits, step)
        self.log("train/shortcut_penalty", penalty, on_step=True, on_epoch=True,
                 batch_size=x.shape[0])
        return self._finish("train", logits, y, self.train_acc, extra=penalty, weight=weight)

    def on_train_epoch_start(self) -> None:
        self.refit_bank = FeatureBank()  # nothing of an interrupted epoch is fitted to

    def _refit_step(self, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor | None) -> None:
        """``refit``: keep the frozen model's head inputs on the decorrelated batch; at the
        epoch's last batch fit the head to all of them (``lit_modules.head_refit``)."""
        self.backbone.eval()  # BatchNorm statistics and dropout as at inference, unchanged
        with recording_head_inputs(self.backbone) as (head, seen), torch.no_grad():
            logits = self(x)  # eager: a compiled graph may skip the hook
        self.refit_bank.add(seen[0], y)
        # The loss and accuracy of the head before this epoch's fit, for the progress bar.
        self._finish("train", logits, y, self.train_acc, weight=weight)
        if not self.trainer.is_last_batch:
            return
        features, labels = self._gather_rows(*self.refit_bank.take())
        loss = fit_head(head, features, labels, l2=self.removal_config.refit_l2,
                        class_weights=weight)
        self.log("train/refit_loss", loss, on_step=False, on_epoch=True, batch_size=1)

    def _gather_rows(self, features: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows (under DDP; each rank then fits the same head)."""
        if self.trainer.world_size <= 1:
            return features, labels
        counts = self.all_gather(torch.tensor([features.shape[0]], device=features.device))
        most = int(counts.max())
        pad = most - features.shape[0]
        f = torch.cat([features, features.new_zeros(pad, features.shape[1])])
        y = torch.cat([labels, labels.new_full((pad,), -1)])
        f, y = self.all_gather(f).flatten(0, 1), self.all_gather(y).flatten()
        keep = y >= 0
        return f[keep], y[keep]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Predictions for one batch: ``index`` (the items' indices in their split, or -1
        where the batch carries none), ``label`` (-1 where unknown), ``pred`` (argmax class)
        and ``probs`` (softmax, float32 ``[B, K]``); all on the CPU, so a whole split of
        them does not pile up in device memory."""
        if isinstance(batch, dict):
            x, y, index = batch["image"], batch.get("label"), batch.get("index")
        else:
            x, y, index = batch[0], batch[1] if len(batch) > 1 else None, None
        probs = self._logits(x).float().softmax(-1)
        missing = torch.full((x.shape[0],), -1, dtype=torch.long)
        return {
            "index": index.long().cpu() if index is not None else missing,
            "label": y.long().cpu() if y is not None else missing,
            "pred": probs.argmax(-1).cpu(),
            "probs": probs.cpu(),
        }

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
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if hp.scheduler == "onecycle":
            # OneCycleLR divides by zero below 5 steps (its warm-up phase would be empty);
            # a schedule that long is never finished, which is harmless for smoke runs.
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=hp.lr, total_steps=max(total, 5), pct_start=0.25
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler.startswith("warmup_"):
            warmup = round(hp.warmup_fraction * total)
            decay = hp.scheduler.removeprefix("warmup_")
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_factor(step, total, warmup, decay)
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.trainer.max_epochs or 1, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
