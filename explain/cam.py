"""CAM family: maps that weight the channels of one conv layer's activation.

Every method here runs one forward to the layer and, where gradients are needed, one
batched backward from the logits to the layer for all selected classes at once. Maps are
``[T, B, h, w]`` at the layer's resolution; :func:`explain.run` upsamples them.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExplainContext, ExplainError
from .registry import register


def _weighted_sum(weights: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``sum_k w[t, b, k] * A[b, k]`` -> ``[T, B, h, w]``."""
    return torch.einsum("tbk,bkhw->tbhw", weights, act)


def _act_and_grads(ctx: ExplainContext) -> tuple[torch.Tensor, torch.Tensor]:
    act, logits = ctx.activation_with_logits()
    grads = ctx.grads_of_selected(logits, act)
    return act.detach().float(), grads.float()


@register("cam", family="cam", needs_layer=True)
def cam(ctx: ExplainContext, relu: bool = True) -> torch.Tensor:
    """CAM (Zhou et al. 2016): ``M_c = sum_k W[c, k] A_k`` for a GAP + Linear head.

    Layer: the last conv map before global average pooling (the backbone's declared
    layer); any other layer or head is refused. Cost: one forward of the trunk, no
    backward. ``relu`` keeps the positive evidence only (as Grad-CAM does), so CAM and
    Grad-CAM compare directly; the classifier bias is a constant and is left out.
    """
    linear = getattr(ctx.split, "classifier", None)
    if ctx.split is None or not isinstance(linear, nn.Linear):
        raise ExplainError(
            "cam needs a global-average-pooling + Linear head right after the explained "
            f"layer; layer {ctx.layer!r} of this model has none (use gradcam, which "
            "equals CAM on such heads and works on any head)"
        )
    act = ctx.activation().float()
    weights = torch.einsum("tbk,kc->tbc", ctx.selectors, linear.weight.float())
    maps = _weighted_sum(weights, act)
    return maps.clamp_min(0) if relu else maps


@register("gradcam", family="cam", needs_layer=True)
def gradcam(ctx: ExplainContext) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``relu(sum_k mean_ij(dy_c/dA_k) A_k)``.

    Layer: any conv layer (default: the declared one). Cost: one forward, one batched
    backward from the logits to the layer for every class.
    """
    act, grads = _act_and_grads(ctx)
    return _weighted_sum(grads.mean((-2, -1)), act).clamp_min(0)


@register("gradcam_pp", family="cam", needs_layer=True)
def gradcam_pp(ctx: ExplainContext, eps: float = 1e-7) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): ``relu(sum_k sum_ij a_ij relu(g_ij) A_k)``.

    ``a_ij = g^2 / (2 g^2 + sum_ij(A_k) g^3)``, the closed form for an exponential of the
    score, with first-order gradients only (as pytorch-grad-cam computes it). ``eps``
    guards the denominator; its size matters because gradients at the last layer are
    small (``W / hw``): pytorch-grad-cam uses ``eps=1e-6``, which reproduces its maps
    exactly. Layer: any conv layer. Cost: one forward, one batched backward.
    """
    act, grads = _act_and_grads(ctx)
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + act.sum((-2, -1), keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / (denom + eps), torch.zeros_like(grads))
    weights = (alpha * grads.clamp_min(0)).sum((-2, -1))
    return _weighted_sum(weights, act).clamp_min(0)


@register("hirescam", family="cam", needs_layer=True)
def hirescam(ctx: ExplainContext) -> torch.Tensor:
    """HiResCAM (Draelos and Carin 2020): ``relu(sum_k dy_c/dA_k * A_k)``, element-wise.

    Faithful to the model's computation for heads that end in a linear score; equals
    Grad-CAM (up to scale) on GAP + Linear heads. Layer: any conv layer. Cost: one
    forward, one batched backward.
    """
    act, grads = _act_and_grads(ctx)
    return (grads * act).sum(-3).clamp_min(0)


@register("xgradcam", family="cam", needs_layer=True)
def xgradcam(ctx: ExplainContext, eps: float = 1e-7) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): ``relu(sum_k (sum_ij A_k g_k / (sum_ij A_k + eps)) A_k)``.

    The channel weight is the gradient averaged with the activation's own spatial
    distribution instead of uniformly (the weights that satisfy the sensitivity and
    conservation axioms for ReLU-linear heads). Layer: any conv layer. Cost: one forward,
    one batched backward.
    """
    act, grads = _act_and_grads(ctx)
    weights = (grads * act).sum((-2, -1)) / (act.sum((-2, -1)) + eps)
    return _weighted_sum(weights, act).clamp_min(0)


@register("layercam", family="cam", needs_layer=True)
def layercam(ctx: ExplainContext) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): ``relu(sum_k relu(dy_c/dA_k) * A_k)``, element-wise.

    Positive gradients weight each location separately, which keeps fine detail at early
    layers. Layer: any conv layer. Cost: one forward, one batched backward.
    """
    act, grads = _act_and_grads(ctx)
    return (grads.clamp_min(0) * act).sum(-3).clamp_min(0)


def principal_projection(act: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Projection of each location's channel vector on the first principal axis.

    ``act`` is ``[B, K, h, w]``; returns ``[B, h, w]``. The rows are the ``h*w`` locations,
    centred over locations when ``center`` is set. The SVD leaves the axis' sign free; it
    is fixed here so that the axis points towards more total activation
    (``sum_k v_k >= 0``), which makes the map deterministic and puts the strongly firing
    locations on the positive side.
    """
    b, k, h, w = act.shape
    rows = act.reshape(b, k, h * w).transpose(1, 2).double()  # [B, hw, K]
    if center:
        rows = rows - rows.mean(1, keepdim=True)
    # The SVD fails on non-finite input: zero those images for it, then give them NaN maps
    # so a diverged model shows up as such instead of as a blank map.
    broken = ~torch.isfinite(rows).flatten(1).all(1)
    rows = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
    # full_matrices=False keeps the cost at min(hw, K) components (hw is small here).
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    axis = vh[:, 0]  # [B, K]
    sign = torch.where(axis.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(axis)
    axis = axis * sign
    proj = torch.einsum("bnk,bk->bn", rows, axis)
    proj[broken] = float("nan")
    return proj.reshape(b, h, w).to(act.dtype)


@register("eigencam", family="cam", needs_layer=True, class_specific=False)
def eigencam(ctx: ExplainContext, center: bool = True, relu: bool = True) -> torch.Tensor:
    """Eigen-CAM (Muhammad and Yeasin 2020): ``relu(A v_1)``, ``v_1`` the first principal axis.

    Class-agnostic: no score or gradient enters, so every target gets the same map (the
    registry marks it ``class_specific=False``). The locations' channel vectors are
    centred before the SVD (``center``, as pytorch-grad-cam does). The SVD sign is
    arbitrary in every library; here it is fixed so the axis points towards more total
    activation (see :func:`principal_projection`). Layer: any conv layer. Cost: one
    forward to the layer and one small SVD per image.
    """
    proj = principal_projection(ctx.activation().float(), center=center)
    if relu:
        proj = proj.clamp_min(0)
    return proj.unsqueeze(0).expand(ctx.selectors.shape[0], *proj.shape).contiguous()
