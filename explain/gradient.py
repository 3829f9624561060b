"""Pixel-level gradient methods: saliency, guided backprop, guided Grad-CAM, IG, SmoothGrad.

Input gradients for every selected class come from one forward per chunk of inputs and
one backward per class on that graph (a batched backward through the whole network
measured slower on a CPU; see ``ExplainContext.grads_of_selected``). Attributions
``[T, B, C, H, W]`` are reduced over the colour channels (``reduce``) to maps
``[T, B, H, W]`` at input resolution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .base import ExplainContext, ExplainError, check_batch_size, resolve_layer, split_for
from .cam import gradcam
from .registry import get, register

REDUCTIONS = ("max_abs", "sum", "abs_sum", "l2", "max", "mean")


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``[..., C, H, W]`` attributions over ``C`` to ``[..., H, W]``.

    ``max_abs`` (max over channels of the absolute value, Simonyan et al.), ``sum``
    (keeps IG's completeness), ``abs_sum``, ``l2`` (norm), ``max`` and ``mean``.
    """
    if how == "max_abs":
        return attr.abs().amax(-3)
    if how == "sum":
        return attr.sum(-3)
    if how == "abs_sum":
        return attr.abs().sum(-3)
    if how == "l2":
        return attr.pow(2).sum(-3).sqrt()
    if how == "max":
        return attr.amax(-3)
    if how == "mean":
        return attr.mean(-3)
    raise ExplainError(f"unknown channel reduction {how!r}; choose one of {REDUCTIONS}")


def input_gradients(
    ctx: ExplainContext,
    x: torch.Tensor | None = None,
    selectors: torch.Tensor | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """``d score_t / d x`` for every selected class: float32 ``[T, N, C, H, W]``.

    ``x`` defaults to the images; ``selectors`` (``[T, N, K]``) to the context's own;
    ``model`` to the context's (integrated_gradients passes a BatchNorm-folded copy). One
    forward of the whole model, then one backward per class on that graph (faster than a
    batched backward through a whole network, see ``grads_of_selected``); parameter
    ``.grad`` is never touched.
    """
    if x is None and model is None:
        x, logits = ctx.input_graph()  # memoised: chunks of classes share the forward
    else:
        x = (ctx.images if x is None else x).detach().requires_grad_(True)
        logits = (ctx.model if model is None else model)(x)
    return ctx.grads_of_selected(logits, x, selectors=selectors, batched=False).float()


def _positive_part(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp_min(0)


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Make every ``nn.ReLU`` module pass back only positive gradients, for one block.

    A temporary forward hook puts a tensor hook on each ReLU output that clamps its
    incoming gradient at zero; ReLU's own backward then applies the forward mask, which
    gives guided backprop's rule ``R_in = [x > 0] * relu(R_out)``. This works with
    ``ReLU(inplace=True)`` and with a module called twice (ResNet's BasicBlock), and the
    hooks are removed on exit, also after an exception. Functional ``F.relu`` calls are not
    seen (captum has the same limit). Yields the number of ReLU modules guided.
    """

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_positive_part)

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                handles.append(module.register_forward_hook(hook))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


# Activations for which guided backprop has no rule: its rule ``[x > 0] relu(R)`` is ReLU's
# backward with the negative part cut. Passing plain gradients through a GELU (ViT, Swin,
# ConvNeXt), SiLU (EfficientNet) or Hardswish (MobileNetV3) would mix guided and unguided
# paths into a map that is neither (captum's GuidedBackprop silently does that). Gates
# (Sigmoid, Hardsigmoid in squeeze-excitation) scale features rather than select them and
# are let through.
UNGUIDED_ACTIVATIONS = (
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU,
    nn.PReLU, nn.RReLU, nn.Softplus,
)


def check_guidable(model: nn.Module) -> None:
    """Refuse guided backprop on a model with activations other than ReLU (see above)."""
    found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNGUIDED_ACTIVATIONS)})
    if found:
        raise ExplainError(
            f"guided backprop is defined for ReLU networks; {type(model).__name__} also uses "
            f"{', '.join(found)}, through which it has no rule. Use saliency, "
            "integrated_gradients or smoothgrad for pixel-level maps, gradcam for a layer"
        )


def _guided_gradients(ctx: ExplainContext) -> torch.Tensor:
    check_guidable(ctx.model)
    with guided_relus(ctx.model) as count:
        if count == 0:
            warnings.warn(
                "guided backprop found no nn.ReLU modules: the result is the plain gradient",
                RuntimeWarning,
                stacklevel=3,
            )
        return input_gradients(ctx)


@register("saliency", family="gradient", needs_layer=False)
def saliency(ctx: ExplainContext, reduce: str = "max_abs") -> torch.Tensor:
    """Saliency (Simonyan et al. 2014): ``max_c |d y / d x_c|``.

    ``reduce`` picks another channel reduction of the raw gradient (e.g. ``sum`` for the
    signed gradient summed over colours). Layer: none. Cost: one forward, one backward
    to the input per class.
    """
    return reduce_channels(input_gradients(ctx), reduce)


@register("guided_backprop", family="gradient", needs_layer=False)
def guided_backprop(ctx: ExplainContext, reduce: str = "max_abs") -> torch.Tensor:
    """Guided backprop (Springenberg et al. 2015): ReLUs pass back ``[x > 0] relu(R)``.

    Map: ``reduce`` over colour channels of the guided gradient (default ``max_abs``).
    Class-discriminative only weakly (Adebayo et al. 2018). ReLU networks only: a model
    with GELU, SiLU, Hardswish... (ViT, Swin, ConvNeXt, EfficientNet, MobileNetV3) is
    refused (:func:`check_guidable`). Layer: none. Cost: one forward, one backward to the
    input per class.
    """
    return reduce_channels(_guided_gradients(ctx), reduce)


@register("guided_gradcam", family="gradient", needs_layer=True)
def guided_gradcam(
    ctx: ExplainContext, reduce: str = "max_abs", interpolate: str = "bilinear"
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): ``guided_backprop * upsample(gradcam)``.

    The Grad-CAM map of the layer is upsampled to the input (``interpolate``: ``bilinear``
    as in the paper, or ``nearest`` as captum's GuidedGradCam does by default), multiplied
    into the guided gradient per colour channel, then reduced (``reduce``). Layer: the
    Grad-CAM layer. Cost: Grad-CAM (one forward, one backward from the layer) plus one
    forward and one backward to the input per class. ReLU networks only, as guided_backprop.
    """
    check_guidable(ctx.model)
    if interpolate not in ("bilinear", "nearest"):
        raise ExplainError(f"interpolate must be 'bilinear' or 'nearest', got {interpolate!r}")
    cam_maps = gradcam(ctx)  # [T, B, h, w]
    size = tuple(ctx.images.shape[-2:])
    t, b = cam_maps.shape[:2]
    flat = cam_maps.reshape(t * b, 1, *cam_maps.shape[-2:])
    if interpolate == "bilinear":
        up = nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    else:
        up = nn.functional.interpolate(flat, size=size, mode="nearest")
    up = up.reshape(t, b, 1, *size)
    return reduce_channels(_guided_gradients(ctx) * up, reduce)


def quadrature(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) for the path integral, float64.

    ``gausslegendre`` (captum's default: numpy's ``leggauss`` nodes and weights, mapped
    from [-1, 1] to [0, 1]; exact for polynomials of degree ``2 * steps - 1``) or the
    Riemann rules ``riemann_left``, ``riemann_right``, ``riemann_middle``,
    ``riemann_trapezoid``.
    """
    if steps < 1 or (rule.startswith("riemann") and steps < 2):
        raise ExplainError(f"steps must be >= {2 if rule.startswith('riemann') else 1}")
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)  # ascending nodes on [-1, 1]
        return torch.from_numpy((1 + nodes) / 2), torch.from_numpy(weights / 2)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        # n nodes 1/(n-1) apart, end weights halved: the weights sum to 1. (captum keeps
        # 1/n steps here, so its trapezoid sums to (n-1)/n and misses completeness by 1/n.)
        alphas = torch.linspace(0, 1, n, dtype=torch.float64)
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] /= 2
        weights[-1] /= 2
    elif rule == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64)
    elif rule == "riemann_right":
        alphas = torch.linspace(1 / n, 1, n, dtype=torch.float64)
    elif rule == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    else:
        raise ExplainError(
            f"unknown quadrature rule {rule!r}; choose gausslegendre, riemann_left, "
            "riemann_right, riemann_middle or riemann_trapezoid"
        )
    return alphas, weights


def _baseline_like(baseline: float | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    base = torch.as_tensor(baseline).detach().to(device=x.device, dtype=x.dtype)
    try:
        return base.expand_as(x).clone()
    except RuntimeError:
        raise ExplainError(
            f"baseline of shape {tuple(base.shape)} does not broadcast to the images "
            f"{tuple(x.shape)}"
        ) from None


@register("integrated_gradients", family="gradient", needs_layer=False)
def integrated_gradients(
    ctx: ExplainContext,
    baseline: float | torch.Tensor | None = None,
    steps: int = 50,
    rule: str = "gausslegendre",
    batch_size: int = 32,
    reduce: str = "sum",
    fold_bn: bool = True,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017).

    ``IG_i = (x_i - x'_i) * int_0^1 dy/dx_i(x' + a (x - x')) da``, the integral by
    quadrature ``rule`` with ``steps`` nodes (:func:`quadrature`; ``gausslegendre`` as
    captum's default, or a Riemann rule), ``x'`` the ``baseline`` (None:
    zeros; a number; or a tensor broadcastable to the images). Completeness: the map
    summed over pixels (``reduce="sum"``, the default) equals ``y(x) - y(x')`` up to the
    quadrature error. Layer: none. Cost: ``steps * B`` interpolated images in chunks of
    ``batch_size``; per chunk one forward and one backward per class. ``fold_bn``
    (default True) runs them on a copy with eval BatchNorm folded into the convs
    (:mod:`explain.fold`): the same function up to float rounding, 5-10% faster
    (bench/engine_paths.py).
    """
    x = ctx.images
    b = x.shape[0]
    check_batch_size(batch_size)
    base = _baseline_like(baseline, x)
    delta = x - base
    alphas, weights = quadrature(steps, rule)
    alphas = alphas.to(device=x.device, dtype=x.dtype)
    weights = weights.to(device=x.device, dtype=torch.float32)
    model = ctx.folded() if fold_bn else ctx.model
    # Rows are (node, image) pairs, node-major; a chunk is any run of batch_size rows, so
    # the batch size holds whatever the number of images.
    rows = torch.arange(steps * b, device=x.device)
    total = torch.zeros(ctx.selectors.shape[0], *x.shape, device=x.device)
    for chunk in rows.split(batch_size):
        node, image = chunk // b, chunk % b
        path = base[image] + alphas[node].view(-1, 1, 1, 1) * delta[image]
        grads = input_gradients(ctx, path, ctx.selectors[:, image], model)
        total.index_add_(1, image, grads * weights[node].view(1, -1, 1, 1, 1))
    return reduce_channels(total * delta.float(), reduce)


@register("smoothgrad", family="gradient", needs_layer=False, stochastic=True)
def smoothgrad(
    ctx: ExplainContext,
    base_method: str = "saliency",
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int = 64,
    base_options: dict | None = None,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): ``mean_n M(x + N(0, sigma^2))`` of another method.

    ``base_method`` is any registered method but smoothgrad itself (default saliency; a
    layer method uses the run's ``layer`` or the model's declared one), ``base_options``
    its options. ``sigma = noise * (max(x) - min(x))`` per image, as in the paper. The
    noise comes from a private generator seeded with ``seed``: reproducible, and the
    global RNG stream is untouched. Layer: the base method's. Cost: ``samples`` times
    the base method's, with ``batch_size // B`` noisy copies of the batch per call of it.
    """
    if base_method == "smoothgrad":
        raise ExplainError("smoothgrad can not wrap itself")
    info = get(base_method)
    if samples < 1:
        raise ExplainError(f"samples must be >= 1, got {samples}")
    inner = ctx
    if info.needs_layer and ctx.layer is None:
        layer = resolve_layer(ctx.model, None)
        inner = dataclasses.replace(ctx, layer=layer, split=split_for(ctx.model, layer))
    x = ctx.images
    b = x.shape[0]
    span = (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).float()
    sigma = (noise * span).view(1, b, 1, 1, 1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    per_chunk = max(1, batch_size // b)
    options = base_options or {}
    total = None
    for s0 in range(0, samples, per_chunk):
        m = min(per_chunk, samples - s0)
        # One draw per sample, so the noise does not depend on the chunking.
        eps = torch.stack([torch.randn(x.shape, generator=gen, device=x.device) for _ in range(m)])
        noisy = (x.unsqueeze(0).float() + sigma * eps).to(x.dtype).reshape(m * b, *x.shape[1:])
        # A private memo: the noisy chunk's forward is used once, then dropped.
        sub = dataclasses.replace(
            inner, images=noisy, selectors=ctx.selectors.repeat(1, m, 1), _memo={}
        )
        maps = info.fn(sub, **options).float()
        maps = maps.reshape(maps.shape[0], m, b, *maps.shape[-2:]).sum(1)
        total = maps if total is None else total + maps
    return total / samples
