"""The explanation engine: torch only, never imports Lightning.

    maps = explain.run(model, images, method="gradcam", layer=None, targets=None)

``targets=None`` explains every class (``[B, C, H, W]``); a ``[B]`` tensor of class
indices gives ``[B, H, W]``. Maps are raw (not normalised) float32 at input resolution.
``layer`` is a module name or the module itself; a transformer's token layer (ViT, Swin)
is read as a map without a user-written reshape (:class:`MapLayout`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from . import cam as _cam  # noqa: F401  (registers the CAM family)
from . import gradient as _gradient  # noqa: F401  (registers the gradient methods)
from . import perturbation as _perturbation  # noqa: F401  (registers the perturbation methods)
from .base import (
    ALL_CLASSES_MAX,
    ExplainContext,
    ExplainError,
    MapLayout,
    auto_targets,
    check_images,
    default_layer,
    eval_mode,
    explaining,
    find_split,
    input_size_problem,
    layer_layout,
    make_selectors,
    resolve_layer,
    split_for,
)
from .presets import CAM_IDENTITY_PAIR, DEFAULT_METHOD, DISCOVERY_METHOD, PEAK_METHOD
from .registry import (
    CLASS_SELECTION,
    ClassCost,
    ClassSelection,
    MethodInfo,
    available,
    get,
    register,
)

__all__ = [
    "ALL_CLASSES_MAX",
    "CAM_IDENTITY_PAIR",
    "DEFAULT_METHOD",
    "DISCOVERY_METHOD",
    "PEAK_METHOD",
    "CLASS_SELECTION",
    "ClassCost",
    "ClassSelection",
    "ExplainContext",
    "ExplainError",
    "MapLayout",
    "MethodInfo",
    "auto_targets",
    "available",
    "class_chunk_for",
    "default_layer",
    "eval_mode",
    "explaining",
    "get",
    "register",
    "run",
    "upsample",
]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``[..., h, w]`` maps to ``size`` (half-pixel centres)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def _num_classes(model: nn.Module, images: torch.Tensor) -> int:
    """The model's output size: declared (``num_classes`` on the model, its split backbone
    or its ``explain_backbone``), else from a one-image probe forward.

    The probe cost ResNet-50 at 224 an eighth of a batch-of-8 Grad-CAM. A declaration is
    taken only where the owner's last Linear layer has that many outputs: a head replaced
    after construction (torchvision's ViT keeps ``num_classes`` from before) is probed.
    """
    split = find_split(model)
    owners = [model, split[0] if split is not None else None]
    name = getattr(model, "explain_backbone", None)
    if isinstance(name, str):
        owners.append(model.get_submodule(name))
    for owner in owners:
        declared = getattr(owner, "num_classes", None)
        if isinstance(declared, bool) or not isinstance(declared, int):
            continue
        linears = [m for m in owner.modules() if isinstance(m, nn.Linear)]
        if linears and linears[-1].out_features == declared:
            return declared
    linear = getattr(split[0], "classifier", None) if split is not None else None
    if isinstance(linear, nn.Linear):
        return linear.out_features
    with torch.no_grad():
        return model(images[:1]).shape[-1]


# Working memory a chunk of classes may take (see class_chunk_for): 1,000 ImageNet classes
# of 224x224 images then go through in chunks that stay within a few GB with the output.
CLASS_CHUNK_BYTES = 512 * 2**20


def class_chunk_for(images: torch.Tensor, budget: int = CLASS_CHUNK_BYTES) -> int:
    """How many classes a chunk holds so that its working set stays within ``budget`` bytes.

    Per class and image the engine holds about four input-sized float32 tensors at once
    (the input gradient ``[C, H, W]``, the map and its upsampled copy, the reduction), and
    a layer's gradients are no larger than that at the usual layers; the estimate is
    ``4 * (C + 1) * H * W * 4`` bytes a class-image. At 224x224 that is 3.2 MB: a batch of
    16 images goes 10 classes a chunk, a single image 167.
    """
    b, c, h, w = images.shape
    per_class = 4 * (c + 1) * h * w * 4 * b
    return max(1, int(budget // per_class))


def run(
    model: nn.Module,
    images: torch.Tensor,
    method: str = DEFAULT_METHOD,
    layer: str | nn.Module | None = None,
    targets: torch.Tensor | None = None,
    class_chunk: int | None = None,
    **options,
) -> torch.Tensor:
    """Explain ``images`` ``[B, 3, H, W]`` with a registered method.

    Args:
        model: any classifier ``nn.Module`` returning logits ``[B, K]``.
        images: input batch, already normalised the way the model expects.
        method: a registry name (see :func:`available`).
        layer: qualified module name, or the module object itself, for layer methods; None
            uses the model's declared one. A token layer (ViT ``[B, 1 + h*w, D]``, Swin
            ``[B, h, w, D]``) is read as a map ``[B, D, h, w]`` (see :class:`MapLayout`).
        targets: None for every class, ``[B]`` class indices, or ``[B, T]``: ``T`` classes
            an image (e.g. true and predicted), sharing the forwards that do not depend
            on the class.
        class_chunk: with ``targets=None``, the CAM and gradient families explain this many
            classes at a time (one forward for all, one backward per chunk) and write each
            chunk into the output before the next: memory is bounded by the chunk, not by
            the number of classes. None picks it from a byte budget (:func:`class_chunk_for`).
            The maps do not depend on it.
        **options: method options (e.g. ``steps`` for integrated_gradients).

    Returns:
        float32 maps ``[B, K, H, W]`` (targets None), ``[B, H, W]`` (targets ``[B]``) or
        ``[B, T, H, W]`` (targets ``[B, T]``), on the images' device.

    Raises:
        ExplainError: bad input, named with the expected and actual values: images not
            ``[B, C, H, W]`` floats, ``C`` not the first conv's ``in_channels``, images
            smaller than the network takes (or giving a 1x1 map at the layer), targets
            not integer indices in range, an unknown or non-spatial layer, a module that is
            not part of the model, ``class_chunk < 1``.
    """
    info = get(method)
    check_images(model, images)
    if class_chunk is not None and int(class_chunk) < 1:
        raise ExplainError(f"class_chunk must be >= 1 (or None), got {class_chunk}")
    layer_name = resolve_layer(model, layer) if info.needs_layer else layer
    if layer_name is not None and not info.needs_layer:
        layer_name = resolve_layer(model, layer_name)
    layout = layer_layout(model, layer_name) if layer_name else None
    with explaining(model):
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else images.device
        # A fresh tensor: inference tensors (Lightning's validate/test) can't enter autograd.
        x = images.detach().to(device=device, dtype=dtype).clone()
        size = tuple(x.shape[-2:])
        ctx = None
        try:
            num_classes = _num_classes(model, x)
            selectors = make_selectors(targets, x.shape[0], num_classes, device)
            split = split_for(model, layer_name)
            ctx = ExplainContext(model, x, layer_name, selectors, num_classes, split, layout)
            t = selectors.shape[0]
            chunk = t
            if t > 1 and info.cost.chunked:
                chunk = int(class_chunk) if class_chunk is not None else class_chunk_for(x)
            # [B, T, H, W] filled chunk by chunk: no second copy of the whole output.
            maps, finite = None, True
            for lo in range(0, t, chunk):
                part = dataclasses.replace(ctx, selectors=selectors[lo : lo + chunk])
                out = upsample(info.fn(part, **options).float(), size).transpose(0, 1)
                if maps is None:
                    maps = torch.empty(x.shape[0], t, *size, device=out.device)
                maps[:, lo : lo + out.shape[1]] = out
                # Checked chunk by chunk: on the whole output the check's temporaries took
                # 2.6 GB at 1,000 classes of 8 images at 224 (BENCHMARKS.md, 224 section).
                finite = finite and bool(torch.isfinite(out).all())
                del part, out
        except ExplainError:
            raise
        except (RuntimeError, ValueError) as err:
            # Deep in the network, "too small" reads as a pooling or conv shape error:
            # say what it means when a probe confirms it, else let the error through.
            problem = input_size_problem(model, x)
            if problem is None:
                raise
            raise ExplainError(f"{problem} ({type(err).__name__}: {err})") from err
        finally:
            if ctx is not None:
                ctx._memo.clear()  # drop the kept graphs now, not at garbage collection
        if targets is not None and torch.as_tensor(targets).dim() < 2:
            maps = maps[:, 0]
    maps = maps.detach().contiguous()
    if not finite:
        warnings.warn(f"{method}: the maps contain non-finite values", RuntimeWarning, stacklevel=2)
    return maps.to(images.device)
