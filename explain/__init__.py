"""The explanation engine: torch only, never imports Lightning.

    maps = explain.run(model, images, method="gradcam", layer=None, targets=None)

``targets=None`` explains every class (``[B, C, H, W]``); a ``[B]`` tensor of class
indices gives ``[B, H, W]``. Maps are raw (not normalised) float32 at input resolution.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import cam as _cam  # noqa: F401  (registers the CAM family)
from . import gradient as _gradient  # noqa: F401  (registers the gradient methods)
from . import perturbation as _perturbation  # noqa: F401  (registers the perturbation methods)
from .base import (
    ExplainContext,
    ExplainError,
    check_images,
    default_layer,
    eval_mode,
    explaining,
    find_split,
    input_size_problem,
    make_selectors,
    resolve_layer,
    split_for,
)
from .registry import MethodInfo, available, get, register

__all__ = [
    "ExplainContext",
    "ExplainError",
    "MethodInfo",
    "available",
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
    split = find_split(model)
    if split is not None and hasattr(split[0], "classifier"):
        return split[0].classifier.out_features
    with torch.no_grad():
        return model(images[:1]).shape[-1]


def run(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "gradcam",
    layer: str | None = None,
    targets: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Explain ``images`` ``[B, 3, H, W]`` with a registered method.

    Args:
        model: any classifier ``nn.Module`` returning logits ``[B, K]``.
        images: input batch, already normalised the way the model expects.
        method: a registry name (see :func:`available`).
        layer: qualified module name for layer methods; None uses the model's declared one.
        targets: None for every class, or ``[B]`` class indices.
        **options: method options (e.g. ``steps`` for integrated_gradients).

    Returns:
        float32 maps ``[B, K, H, W]`` (targets None) or ``[B, H, W]``, on the images' device.

    Raises:
        ExplainError: bad input, named with the expected and actual values: images not
            ``[B, C, H, W]`` floats, ``C`` not the first conv's ``in_channels``, images
            smaller than the network takes (or giving a 1x1 map at the layer), targets
            not integer indices in range, an unknown or non-spatial layer.
    """
    info = get(method)
    check_images(model, images)
    layer_name = resolve_layer(model, layer) if info.needs_layer else layer
    if layer_name is not None and not info.needs_layer:
        layer_name = resolve_layer(model, layer_name)
    with explaining(model):
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else images.device
        # A fresh tensor: inference tensors (Lightning's validate/test) can't enter autograd.
        x = images.detach().to(device=device, dtype=dtype).clone()
        try:
            num_classes = _num_classes(model, x)
            selectors = make_selectors(targets, x.shape[0], num_classes, device)
            split = split_for(model, layer_name)
            ctx = ExplainContext(model, x, layer_name, selectors, num_classes, split)
            maps = info.fn(ctx, **options).float()
        except ExplainError:
            raise
        except (RuntimeError, ValueError) as err:
            # Deep in the network, "too small" reads as a pooling or conv shape error:
            # say what it means when a probe confirms it, else let the error through.
            problem = input_size_problem(model, x)
            if problem is None:
                raise
            raise ExplainError(f"{problem} ({type(err).__name__}: {err})") from err
        maps = upsample(maps, tuple(x.shape[-2:])).transpose(0, 1)
        if targets is not None:
            maps = maps[:, 0]
    maps = maps.detach().contiguous()
    if not torch.isfinite(maps).all():
        warnings.warn(f"{method}: the maps contain non-finite values", RuntimeWarning, stacklevel=2)
    return maps.to(images.device)
