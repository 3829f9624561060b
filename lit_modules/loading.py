"""Rebuild a trained model and its data from a checkpoint and the config saved beside it.

``train.py`` (LightningCLI) writes the resolved config to ``<log_dir>/config.yaml`` and
Lightning puts checkpoints in ``<log_dir>/checkpoints/``, so a checkpoint alone is enough to
find everything ``audit.py`` needs, without re-typing options.

Checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
pickled objects is refused and its payload is never run.
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from explain import eval_mode

from .checkpoint_file import CheckpointError, load_checkpoint, load_weights
from .classifier import ImageClassifier, unpack_batch
from .data.cue import nest_flat_keys

# A config is data, but ``class_path`` names code, and importing a module runs it: by
# default only this project's modules may be imported from a config, so a config shipped
# with someone else's checkpoint cannot make the audit import (and run) arbitrary modules.
# A user widens this per call with ``trusted`` (``audit.py --trust_module PACKAGE``).
ALLOWED_PREFIXES = ("lit_modules.",)
TRUST_OPTION = "--trust_module"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_config(ckpt: str | Path, config: str | Path | None = None) -> Path:
    """The training config of ``ckpt``: ``config`` if given, else the one saved beside it.

    Looks at ``<ckpt dir>/../config.yaml`` (Lightning's ``<log_dir>/checkpoints/`` layout)
    and ``<ckpt dir>/config.yaml``; the error lists the places it looked.
    """
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise CheckpointError(f"config file {str(path)!r} (given with --train_config) does not exist")
        return path
    folder = Path(ckpt).expanduser().resolve().parent
    candidates = [folder.parent / "config.yaml", folder / "config.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(repr(str(p)) for p in candidates)
    raise CheckpointError(
        f"no training config found for checkpoint {str(ckpt)!r} (looked for {tried}). "
        "train.py saves config.yaml in the log directory, one level above checkpoints/; "
        "pass the config explicitly with --train_config PATH."
    )


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse a LightningCLI YAML config (safe loader: no Python objects)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "model" not in cfg or "data" not in cfg:
        raise CheckpointError(
            f"{str(path)!r} is not a train.py config: it needs 'model:' and 'data:' sections"
        )
    return cfg


def check_trusted(trusted: Sequence[str]) -> tuple[str, ...]:
    """Validate module names given as trusted: dotted Python identifiers, nothing else."""
    out = []
    for name in trusted:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise CheckpointError(
                f"{TRUST_OPTION} takes a module or package name such as 'mypkg' or "
                f"'mypkg.models', got {name!r}"
            )
        out.append(name)
    return tuple(out)


def is_trusted(class_path: str, trusted: Sequence[str] = ()) -> bool:
    """True when ``class_path``'s module is the project's or inside a ``trusted`` module.

    ``mypkg`` trusts ``mypkg.Model`` and ``mypkg.sub.Model``, never ``mypkg_evil.Model``.
    """
    if any(class_path.startswith(p) for p in ALLOWED_PREFIXES):
        return True
    module = class_path.rpartition(".")[0]
    return any(module == t or module.startswith(t + ".") for t in trusted)


def _import_class(class_path: str, what: str, trusted: Sequence[str] = ()) -> type:
    if not isinstance(class_path, str) or not is_trusted(class_path, check_trusted(trusted)):
        top = str(class_path).split(".")[0]
        extra = f" or {list(trusted)}" if trusted else ""
        raise CheckpointError(
            f"the config's {what} class_path {class_path!r} is outside "
            f"{[p.rstrip('.') for p in ALLOWED_PREFIXES]}{extra}: importing a class named "
            "in a config runs its module's code, so audit.py only imports the project's "
            f"own classes unless told otherwise. If you trust {top!r}, pass "
            f"{TRUST_OPTION} {top} (it must be importable, e.g. on PYTHONPATH)"
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"cannot import {what} class {class_path!r}: {exc}") from exc


def build_model(model_cfg: dict[str, Any], trusted: Sequence[str] = ()) -> ImageClassifier:
    """``ImageClassifier(**init args)`` from the config's ``model:`` section.

    A ``class_path`` may name an ImageClassifier subclass from the project or from a
    ``trusted`` module (see :func:`is_trusted`).

    ``pretrained`` is forced off: the checkpoint's weights replace the ImageNet ones, so
    fetching them would only cost a download (or fail offline).
    """
    cls: type = ImageClassifier
    args = dict(model_cfg)
    if "class_path" in args:
        cls = _import_class(args["class_path"], "model", trusted)
        args = dict(args.get("init_args") or {})
    if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
        raise CheckpointError(f"model class {cls!r} is not an ImageClassifier")
    args["pretrained"] = False
    return cls(**args)


def build_datamodule(
    data_cfg: dict[str, Any], trusted: Sequence[str] = ()
) -> L.LightningDataModule:
    """The datamodule named by the config's ``data: class_path / init_args`` (the project's,
    or one from a ``trusted`` module)."""
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise CheckpointError("the config's data: section needs a class_path")
    cls = _import_class(data_cfg["class_path"], "data", trusted)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise CheckpointError(f"data class {data_cfg['class_path']!r} is not a LightningDataModule")
    # Configs saved before the nested cue: option still load (flat cue_* keys are nested).
    return cls(**nest_flat_keys(dict(data_cfg.get("init_args") or {})))


@dataclass
class LoadedRun:
    """A trained model with everything needed to audit it.

    ``ckpt_path``, ``config_path`` and ``log_dir`` are None for a model audited from Python
    (``audit_report.audit``): there is no checkpoint file, training config or log folder.
    """

    ckpt_path: Path | None
    config_path: Path | None
    log_dir: Path | None
    sha256: str
    config: dict[str, Any]
    model: torch.nn.Module
    datamodule: Any  # a LightningDataModule, or what the audit reads of one
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, global_step, versions
    title: str | None = None  # overrides the derived name

    @property
    def name(self) -> str:
        """A short human name: backbone, run folder and checkpoint file."""
        if self.title is not None:
            return self.title
        hparams = getattr(self.model, "hparams", {})
        backbone = hparams.get("backbone", type(self.model).__name__)
        if self.ckpt_path is None or self.log_dir is None:
            return str(backbone)
        return f"{backbone} ({self.log_dir.name}/{self.ckpt_path.name})"


def load_run(
    ckpt: str | Path,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    trusted: Sequence[str] = (),
) -> LoadedRun:
    """Checkpoint (+ config beside it) -> model in eval mode on ``device`` and datamodule.

    ``trusted``: extra modules the config's ``class_path`` entries may come from.
    """
    ckpt_path = Path(ckpt).expanduser().resolve()
    checkpoint = load_checkpoint(ckpt_path)  # refuses unsafe files before anything else
    config_path = find_config(ckpt_path, config).resolve()
    cfg = read_config(config_path)
    model = build_model(cfg["model"], trusted)
    load_weights(model, checkpoint, f"checkpoint {str(ckpt_path)!r}",
                 f"the model built from {str(config_path)!r}")
    saved = checkpoint.get("hyper_parameters") or {}
    model_args = cfg["model"].get("init_args", cfg["model"])
    differ = sorted(
        k for k, v in saved.items()
        if not k.startswith("_") and k != "pretrained" and k in model_args and model_args[k] != v
    )
    if differ:
        warnings.warn(
            f"the checkpoint's hyper-parameters differ from {config_path} on {differ}; the "
            "weights loaded fine, so the config was used",
            UserWarning,
            stacklevel=2,
        )
    model.eval().to(device)
    datamodule = build_datamodule(cfg["data"], trusted)
    # What the datamodule saved in the checkpoint (Lightning keys it by class name), e.g. the
    # normalisation it trained with, wins over what its config would recompute today.
    data_state = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(data_state, dict) and data_state:
        datamodule.load_state_dict(data_state)
    meta = {
        k: checkpoint[k]
        for k in ("epoch", "global_step", "pytorch-lightning_version")
        if k in checkpoint and isinstance(checkpoint[k], int | str)
    }
    return LoadedRun(
        ckpt_path=ckpt_path,
        config_path=config_path,
        log_dir=config_path.parent,
        sha256=file_sha256(ckpt_path),
        config=cfg,
        model=model,
        datamodule=datamodule,
        meta=meta,
    )


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    num_classes: int,
    batch_size: int = 256,
    progress: Any = None,
) -> dict[str, Any]:
    """Predictions on a whole split with torchmetrics' accuracy and confusion matrix.

    Returns ``labels`` and ``preds`` (``[N]``), ``accuracy`` (float), ``per_class``
    (``[K]`` recall, NaN for absent classes), ``support`` (``[K]``) and ``confusion``
    (``[K, K]`` counts, rows = true class, columns = predicted class).
    """
    device = next(model.parameters()).device
    acc = MulticlassAccuracy(num_classes, average="micro").to(device)
    per_class = MulticlassAccuracy(num_classes, average=None).to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    labels, preds = [], []
    with eval_mode(model), torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = unpack_batch(batch)
            x, y = x.to(device), y.to(device)
            p = model(x).argmax(-1)
            for metric in (acc, per_class, confusion):
                metric.update(p, y)
            labels.append(y.cpu())
            preds.append(p.cpu())
            if progress is not None:
                progress(len(y))
    labels_t, preds_t = torch.cat(labels), torch.cat(preds)
    support = torch.bincount(labels_t, minlength=num_classes)
    recall = per_class.compute().cpu().float()
    return {
        "labels": labels_t,
        "preds": preds_t,
        "accuracy": float(acc.compute()),
        "per_class": torch.where(support > 0, recall, torch.full_like(recall, float("nan"))),
        "support": support,
        "confusion": confusion.compute().cpu().long(),
    }


# -- data for the audit -----------------------------------------------------------------


@dataclass
class CounterfactualImages:
    """The same images three ways, in the model's input space, for the with/without-cue test.

    ``clean``: no cue; ``stamped``: the data's cue on every image, where that item's patch
    would go; ``control``: a patch of the same size at the same place, painted with a
    texture the data never carried (a one-pixel checkerboard of the cue colour's complement
    and black). A fragile model moves its predictions for any patch; only what the cue does
    beyond the control is evidence that the model learned the cue.
    """

    clean: Tensor
    stamped: Tensor
    control: Tensor
    labels: Tensor


def control_texture(color: tuple[float, float, float], h: int, w: int) -> Tensor:
    """A ``[3, h, w]`` checkerboard of ``1 - color`` and black (the control patch's paint)."""
    complement = 1.0 - torch.tensor(color, dtype=torch.float32)
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    on = ((rows + cols) % 2 == 0).float()
    return complement.view(3, 1, 1) * on


def counterfactual_images(
    datamodule: Any, split: str, indices: list[int]
) -> CounterfactualImages | None:
    """Clean, cue-stamped and control-stamped versions of the same images.

    None when the data declares no cue or does not keep its raw images (the clean version
    of a stamped item is only known from them).
    """
    dataset = datamodule.dataset(split)
    cue = getattr(datamodule, "cue", None) or getattr(dataset, "cue", None)
    raw = getattr(dataset, "images", None)
    decode = getattr(dataset, "clean01", None)  # datasets that decode files per item
    if cue is None or (decode is None and not (isinstance(raw, Tensor) and raw.dtype == torch.uint8)):
        return None
    idx = torch.as_tensor(indices, dtype=torch.long)
    clean01 = decode(indices) if decode is not None else raw[idx].float() / 255.0
    stamped01, masks = cue.stamp(clean01, indices, split)
    texture = control_texture(tuple(cue.color), *clean01.shape[-2:])
    control01 = torch.where(masks[:, None], texture, clean01)
    labels = torch.as_tensor(dataset.labels)[idx].long()
    return CounterfactualImages(
        datamodule.normalize(clean01), datamodule.normalize(stamped01),
        datamodule.normalize(control01), labels,
    )

