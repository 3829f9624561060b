"""Audit a model that is not ours: a plain ``nn.Module`` and a torch dataset, from Python.

    from audit_report import audit
    out = audit(model, test_set, class_names=names, out="audit_out", layer="features.7",
                mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))

The same report as ``audit.py`` (the same code after loading: :func:`.run.audit_runs`),
without a checkpoint, a training config or Lightning. Sections that need a training run
(the evolution of the monitor's maps) say so and are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import explain
from explain import eval_mode
from lit_modules.data.base import denormalize_with, normalize_with
from lit_modules.data.sampling import dataset_labels
from lit_modules.loading import LoadedRun

from .files import AuditError
from .findings import AuditResult
from .run import audit_runs
from .settings import METHOD_PRESETS, AuditSettings, resolve_device

# Settings audit() sets itself (from its own arguments) or that only mean something for
# checkpoints: not accepted through **settings.
OWN_SETTINGS = ("ckpt", "train_config", "methods", "num_images", "out", "device",
                "command", "trust_module", "layer", "split", "fail_on_findings")


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values): the identity of
    its weights, standing in for a checkpoint file's hash (and keying the cache)."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        if isinstance(value, Tensor):
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class PairsAsItems(Dataset):
    """``(image, label)`` items served in the project's item format
    (``{"image", "label", "index"}``; see :mod:`lit_modules.data.split`)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.labels = dataset_labels(base)  # one pass, so the audit never decodes twice for labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.base[index]
        return {"image": torch.as_tensor(item[0]).float(),
                "label": torch.as_tensor(item[1]).long(),
                "index": torch.tensor(int(index), dtype=torch.long)}


class UserData:
    """What the audit reads of a datamodule, made from one user dataset.

    Args:
        dataset: items ``(image, label)`` (a normalised float ``[3, H, W]`` tensor and a
            class index) or the project's dicts (``image``, ``label``, optionally
            ``object_mask`` and ``cue_mask``). A ``cue`` attribute (a
            :class:`lit_modules.data.cue.SpuriousCue`) declares a spurious cue.
        class_names: one name per class, in label order.
        mean, std: the per-channel normalisation of the images, to show them; None: the
            images are already in ``[0, 1]``.
    """

    def __init__(self, dataset: Any, class_names: Sequence[str],
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        if isinstance(dataset, DataLoader):
            dataset = dataset.dataset  # the audit picks items itself, seeded
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise AuditError(f"data must be a map-style torch Dataset or a DataLoader over one, "
                             f"got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise AuditError("the dataset is empty")
        if (mean is None) != (std is None):
            raise AuditError("give both mean and std (the images' normalisation), or neither")
        for name, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != 3:
                raise AuditError(f"{name} needs 3 values (one per channel), got {list(stats)}")
        first = dataset[0]
        if isinstance(first, dict):
            missing = {"image", "label"} - set(first)
            if missing:
                raise AuditError(f"dataset items are dicts without {sorted(missing)}: the "
                                 "audit needs 'image' (normalised [3, H, W]) and 'label'")
            self._dataset, image = dataset, first["image"]
        elif isinstance(first, tuple | list) and len(first) >= 2:
            self._dataset, image = PairsAsItems(dataset), first[0]
        else:
            raise AuditError(f"dataset items must be (image, label) pairs or dicts with "
                             f"'image' and 'label', got {type(first).__name__}")
        if not (isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3
                and image.is_floating_point()):
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise AuditError(f"images must be float tensors [3, H, W] (normalised as the model "
                             f"expects), got {shape}")
        self.class_names = list(class_names)
        labels = dataset_labels(self._dataset)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.class_names):
            raise AuditError(f"labels run from {int(labels.min())} to {int(labels.max())}, but "
                             f"{len(self.class_names)} class names were given")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.cue = getattr(dataset, "cue", None)
        # Masks are ground truth only where the data has them: a dataset that says it has
        # none (object_masks = None, as the project's split datasets do) serves empty ones.
        self.has_object_masks = (isinstance(first, dict) and "object_mask" in first
                                 and getattr(dataset, "object_masks", True) is not None)

    def dataset(self, split: str) -> Any:
        """The one dataset given, whatever the split's name."""
        return self._dataset

    def normalize(self, images01: Tensor) -> Tensor:
        """``[0, 1]`` images -> the model's input space (the datamodules' arithmetic, so
        their numbers agree bit for bit)."""
        return images01 if self.mean is None else normalize_with(images01, self.mean, self.std)

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs -> ``[0, 1]`` images (for display)."""
        return images if self.mean is None else denormalize_with(images, self.mean, self.std)

    def describe(self) -> dict[str, Any]:
        """The data's stand-in for a training config's ``data:`` section."""
        base = self._dataset.base if isinstance(self._dataset, PairsAsItems) else self._dataset
        kind = type(base)
        return {"class_path": f"{kind.__module__}.{kind.__qualname__}",
                "init_args": {"items": len(base), "mean": self.mean, "std": self.std}}


def layer_candidates(model: nn.Module, image: Tensor) -> list[str]:
    """Names of the modules whose output on ``image`` is a ``[B, C, h, w]`` map, in call
    order (the last ones are the usual Grad-CAM layers)."""
    seen: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: seen.append(name)
                if isinstance(out, Tensor) and out.dim() == 4 and name not in seen else None))
    try:
        with eval_mode(model), torch.no_grad():
            model(image[None])
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None, image: Tensor) -> str | None:
    """The explanation layer's name: the given one, or the model's declared one; a clear
    error with the candidates when neither exists."""
    if layer is not None:
        try:
            return explain.resolve_layer(model, layer)
        except explain.ExplainError as exc:
            raise AuditError(str(exc)) from exc
    try:
        explain.default_layer(model)
        return None  # the model declares one (the project's features/head split)
    except explain.ExplainError:
        names = layer_candidates(model, image)
        raise AuditError(
            f"{type(model).__name__} declares no explanation layer: pass layer='<name>' "
            "(or the module itself), a block whose output is [B, C, h, w]. Candidates, in "
            f"call order (the last conv block is the usual choice): {', '.join(names[-12:])}"
            if names else
            f"{type(model).__name__} declares no explanation layer and no module gives a "
            "[B, C, h, w] map: the CAM methods need a convolutional layer"
        ) from None


def _resolve_methods(methods: str | Sequence[str]) -> list[str]:
    names = [methods] if isinstance(methods, str) else list(methods)
    if len(names) == 1 and names[0] in METHOD_PRESETS:
        names = METHOD_PRESETS[names[0]] or explain.available()
    unknown = [m for m in names if m not in explain.available()]
    if unknown or not names:
        raise AuditError(f"unknown method(s) {unknown or names}; available: "
                         f"{', '.join(explain.available())} (or a preset: "
                         f"{', '.join(METHOD_PRESETS)})")
    return list(dict.fromkeys(names))


def audit(
    model: nn.Module,
    data: Any,
    *,
    class_names: Sequence[str],
    out: str | Path,
    layer: str | nn.Module | None = None,
    methods: str | Sequence[str] = "default",
    num_images: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str = "auto",
    split: str | None = None,
    **settings: Any,
) -> AuditResult:
    """Audit a classifier given from Python and write the report folder ``out``.

    Args:
        model: any ``nn.Module`` returning logits ``[B, K]`` (no Lightning needed).
        data: a map-style Dataset (or a DataLoader over one) of ``(image, label)`` pairs of
            normalised ``[3, H, W]`` tensors, or of the project's item dicts.
        class_names: ``K`` names, in label order.
        out: the report folder (replaced once the new report is complete).
        layer: the explanation layer (a module name or the module) for the CAM family;
            needed unless the model declares one (the project's features/head split).
        methods: method names, or a preset (``default``, ``all``).
        num_images: images explained (a seeded sample stratified over classes).
        mean, std: the images' normalisation, to show them; None: already in ``[0, 1]``.
        device: ``auto`` (CUDA when torch sees one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        split: the split's name in the report (default: the dataset's ``split`` attribute,
            else ``test``); a declared cue's placement depends on it.
        **settings: any other :class:`AuditSettings` field (``seed``, ``steps``,
            ``sanity_images``, ``batch_size``, ``cache`` (default False here: no checkpoint
            file identifies the data), ``progress``, ...).

    Returns:
        An :class:`AuditResult`: ``path`` (the folder with ``report.html``,
        ``metrics.json``, ``figures/``; ``result / "report.html"`` works too), ``verdict``
        and ``findings``.

    The model is put in eval mode and moved to ``device`` for the audit; its train/eval
    flags and its device are given back afterwards.
    """
    fields = {f.name for f in dataclasses.fields(AuditSettings)}
    bad = sorted(set(settings) - (fields - set(OWN_SETTINGS)))
    if bad:
        allowed = ", ".join(sorted(fields - set(OWN_SETTINGS)))
        raise TypeError(f"audit() got unknown or reserved setting(s) {bad}; settings it takes "
                        f"through **settings: {allowed}")
    if not isinstance(model, nn.Module):
        raise AuditError(f"model must be a torch nn.Module, got {type(model).__name__}")
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    if num_images < 1:
        raise AuditError(f"num_images must be at least 1, got {num_images}")
    user_data = UserData(data, class_names, mean, std)
    dataset = user_data.dataset("")
    if split is None:
        split = getattr(data if not isinstance(data, DataLoader) else data.dataset,
                        "split", "test")
    image = torch.as_tensor(dataset[0]["image"]).float()
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    with eval_mode(model):
        try:
            model.to(device)
            with torch.no_grad():
                width = model(image[None].to(device)).shape[-1]
            if width != len(user_data.class_names):
                raise AuditError(f"the model gives {width} logits, but {len(class_names)} "
                                 "class names were given")
            layer_name = _resolve_layer(model, layer, image.to(device))
            chosen = AuditSettings(
                ckpt=[], methods=_resolve_methods(methods), num_images=num_images,
                split=split, out=str(out), device=device,
                command=["audit_report.audit(...)"], layer=layer_name,
                **{"cache": False, **settings},
            )
            kind = type(model)
            run = LoadedRun(
                ckpt_path=None, config_path=None, log_dir=None,
                sha256=weights_sha256(model),
                config={"model": {"class_path": f"{kind.__module__}.{kind.__qualname__}"},
                        "data": user_data.describe()},
                model=model, datamodule=user_data, title=kind.__name__,
            )
            return audit_runs(chosen, [run], Path(out))
        finally:
            model.to(home)
