"""Perturbation methods: Score-CAM, Ablation-CAM, Recipro-CAM, occlusion, LIME.

Each perturbed forward pass is scored for every class at once, and the perturbed copies
are batched (``batch_size`` copies a forward) with no host synchronisation per sample.
Methods that perturb the explained layer (ablationcam, reciprocam) re-run only what
follows it (:meth:`ExplainContext.head`: the declared head, or the whole model with the
layer's output substituted when the model declares no split at that layer).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExplainContext, ExplainError, check_batch_size
from .cam import _weighted_sum
from .chunks import fill_chunks
from .registry import register


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(int(p) < 1 for p in pair):
        raise ExplainError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(pair[0]), int(pair[1])


def _select_scores(ctx: ExplainContext, scores: torch.Tensor) -> torch.Tensor:
    """``[B, N, K]`` per-perturbation class scores -> ``[T, B, N]`` for the selected classes."""
    return torch.einsum("bnk,tbk->tbn", scores, ctx.selectors.to(scores.dtype))


def _chunked_head(ctx: ExplainContext, copies, count: int, batch_size: int) -> torch.Tensor:
    """Run the head on ``count`` perturbed copies of the layer activation, chunked.

    ``copies(lo, hi)`` returns ``[B, hi - lo, C, h, w]``; the result is float32
    ``[B, count, K]``. Rows reach the head image-major (all copies of image 0, then of
    image 1...), the order :meth:`ExplainContext.head` expects for its fallback.
    """
    b = ctx.images.shape[0]

    def scores(lo: int, hi: int) -> torch.Tensor:
        rep = copies(lo, hi)
        return ctx.head(rep.reshape(b * (hi - lo), *rep.shape[2:])).reshape(b, hi - lo, -1)

    return fill_chunks(count, max(1, batch_size // b), scores, dim=1)


# -- Score-CAM ------------------------------------------------------------------------------
SCORECAM_SCORES = ("softmax", "logit", "channel_softmax")


@register("scorecam", family="perturbation", needs_layer=True)
def scorecam(
    ctx: ExplainContext,
    score: str = "softmax",
    align_corners: bool = False,
    batch_size: int = 64,
    eps: float = 1e-8,
    top_k: int | None = None,
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): ``relu(sum_k w_k A_k)``, ``w_k = s_c(x * H_k)``.

    ``H_k`` is channel ``k`` upsampled to the input (bilinear; ``align_corners=True`` is
    what pytorch-grad-cam uses) and min-max scaled to [0, 1]; ``x * H_k`` is a masked
    input. ``score`` picks ``w``: ``softmax`` (the paper: the class probability of the
    masked input), ``logit`` (its raw logit) or ``channel_softmax`` (pytorch-grad-cam:
    the logits of class ``c`` over all channels, softmax-normalised across channels).
    Layer: any conv layer; the masks act on the input, so every masked forward runs the
    whole model. Cost: one forward to the layer, then one forward per image and channel,
    ``batch_size`` a pass, each scored for all classes; a constant channel gives an
    all-zero mask, so all of those share a single forward of a blank input.

    ``top_k`` (None: every channel, the exact method) scores only the ``top_k`` channels
    of each image with the most activation energy (``sum A_k^2``); the others get weight
    0 (with ``channel_softmax`` the softmax runs over the kept channels). The cost falls
    by ``K / top_k``; ``top_k >= K`` is the exact method, bit for bit.
    """
    if score not in SCORECAM_SCORES:
        raise ExplainError(f"score must be one of {SCORECAM_SCORES}, got {score!r}")
    check_batch_size(batch_size)
    x = ctx.images
    act = ctx.activation().float()
    b, k = act.shape[:2]
    up = nn.functional.interpolate(
        act, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=align_corners
    )
    flat = up.flatten(2)
    low, high = flat.amin(-1), flat.amax(-1)
    masks = (up - low[..., None, None]) / (high - low + eps)[..., None, None]  # [B, K, H, W]
    live = high > low
    kept = None
    if top_k is not None and top_k < k:
        if top_k < 1:
            raise ExplainError(f"top_k must be >= 1 or None, got {top_k}")
        energy = act.pow(2).flatten(2).sum(-1)  # [B, K]
        kept = torch.zeros_like(live).scatter_(1, energy.topk(top_k, 1).indices, True)
        live = live & kept
    pairs = live.nonzero()  # one host sync for the whole method

    def masked_logits(lo: int, hi: int) -> torch.Tensor:
        bi, ki = pairs[lo:hi].unbind(1)
        return ctx.logits(x[bi] * masks[bi, ki].unsqueeze(1).to(x.dtype))

    logits = fill_chunks(pairs.shape[0], batch_size, masked_logits) if len(pairs) else None
    if pairs.shape[0] == b * k:
        scores = logits
    else:  # every all-zero mask gives the same blank input: one forward serves them all
        blank = ctx.logits(torch.zeros_like(x[:1]))
        scores = blank.expand(b * k, -1).clone()
        if logits is not None:
            scores[pairs[:, 0] * k + pairs[:, 1]] = logits
    scores = scores.reshape(b, k, -1)  # [B, K, classes]
    if score == "softmax":
        scores = scores.softmax(-1)
    elif score == "channel_softmax":
        if kept is not None:  # the dropped channels take no share of the softmax
            scores = scores.masked_fill(~kept.unsqueeze(-1), -torch.inf)
        scores = scores.softmax(1)
    if kept is not None:
        scores = scores * kept.unsqueeze(-1)
    weights = _select_scores(ctx, scores)  # [T, B, K]
    return _weighted_sum(weights, act).clamp_min(0)


# -- Ablation-CAM ---------------------------------------------------------------------------
@register("ablationcam", family="perturbation", needs_layer=True)
def ablationcam(
    ctx: ExplainContext,
    fill: float = 0.0,
    relative: bool = True,
    batch_size: int = 512,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Ablation-CAM (Desai and Ramaswamy 2020): ``relu(sum_k w_k A_k)``, ``w_k = (y - y_k) / y``.

    ``y_k`` is the class logit with channel ``k`` of the layer set to ``fill`` (0: the
    paper's ablation; pytorch-grad-cam also uses 0 when the layer's minimum is 0, as after
    a ReLU, and ``min - 1e7`` otherwise). ``relative=False`` drops the division by ``y``
    (whose sign flips the map when the logit is negative; ``|y| < eps`` is clamped to
    ``eps``). Layer: any conv layer. Cost: one forward to the layer, then one head pass
    per image and channel (``batch_size`` a pass) scored for all classes: with a declared
    features/head split only the head runs.
    """
    check_batch_size(batch_size)
    act = ctx.activation()
    b, k = act.shape[:2]
    base = ctx.head(act)  # [B, classes]
    index = torch.arange(k, device=act.device)

    def copies(lo: int, hi: int) -> torch.Tensor:
        rep = act.unsqueeze(1).repeat(1, hi - lo, 1, 1, 1)  # [B, m, K, h, w]
        rep[:, torch.arange(hi - lo, device=act.device), index[lo:hi]] = fill
        return rep

    ablated = _chunked_head(ctx, copies, k, batch_size)  # [B, K, classes]
    drop = base.unsqueeze(1) - ablated
    if relative:
        denom = torch.where(base.abs() < eps, torch.full_like(base, eps).copysign(base), base)
        drop = drop / denom.unsqueeze(1)
    weights = _select_scores(ctx, drop)
    return _weighted_sum(weights, act.float()).clamp_min(0)


# -- Recipro-CAM ----------------------------------------------------------------------------
_GAUSS3 = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))


def spatial_masks(h: int, w: int, kernel: str, device: torch.device) -> torch.Tensor:
    """``[h*w, h, w]`` masks: a one at each location (``point``) or a 3x3 Gaussian around it."""
    masks = torch.eye(h * w, device=device).reshape(h * w, 1, h, w)
    if kernel == "gaussian":
        g = torch.tensor(_GAUSS3, device=device).reshape(1, 1, 3, 3)
        masks = nn.functional.conv2d(masks, g, padding=1)  # truncated at the border
    elif kernel != "point":
        raise ExplainError(f"kernel must be 'point' or 'gaussian', got {kernel!r}")
    return masks[:, 0]


@register("reciprocam", family="perturbation", needs_layer=True)
def reciprocam(
    ctx: ExplainContext, kernel: str = "point", score: str = "softmax", batch_size: int = 512
) -> torch.Tensor:
    """Recipro-CAM (Byun and Lee 2022): ``M_c(n) = s_c(head(A * m_n))`` for each location n.

    ``m_n`` keeps location ``n`` of the layer's map and zeroes the rest (``point``, the
    reference implementation's default) or weights a 3x3 neighbourhood by the Gaussian
    ``[1, 2, 1] x [1, 2, 1] / 16`` (``gaussian``); the head re-runs on each masked map and
    ``score`` is the class probability (``softmax``, the paper) or the logit (``logit``;
    for a GAP + Linear head it equals ``bias + CAM(n) / (h w)`` exactly). Layer: any conv
    layer. Cost: one forward to the layer, then ``h*w`` head passes per image (``batch_size``
    a pass) scored for all classes; only the head runs where the model declares a split.
    """
    if score not in ("softmax", "logit"):
        raise ExplainError(f"score must be 'softmax' or 'logit', got {score!r}")
    check_batch_size(batch_size)
    act = ctx.activation()
    b, _, h, w = act.shape
    masks = spatial_masks(h, w, kernel, act.device).to(act.dtype)  # [hw, h, w]

    def copies(lo: int, hi: int) -> torch.Tensor:
        return act.unsqueeze(1) * masks[lo:hi].unsqueeze(1).unsqueeze(0)

    scores = _chunked_head(ctx, copies, h * w, batch_size)  # [B, hw, classes]
    if score == "softmax":
        scores = scores.softmax(-1)
    return _select_scores(ctx, scores).reshape(-1, b, h, w)


# -- Occlusion ------------------------------------------------------------------------------
def _fill_like(fill: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(fill).detach().to(device=x.device, dtype=x.dtype)
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise ExplainError(
            f"fill of shape {tuple(t.shape)} does not broadcast to the images {tuple(x.shape)}"
        ) from None
    return t


def window_masks(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """``[N, H, W]`` boolean occlusion windows, row-major.

    Windows start at ``0, s, 2s, ...``, ``ceil((H - h) / s) + 1`` of them a dimension, the
    last one cut at the border, so every pixel is covered (captum's placement).
    """
    starts = []
    for length, win, step in zip(size, window, stride, strict=True):
        if win > length:
            raise ExplainError(f"window {window} exceeds the input size {size}")
        if step > win and win < length:
            raise ExplainError(f"stride {stride} larger than the window {window} skips pixels")
        n = -(-(length - win) // step) + 1
        starts.append(torch.arange(n, device=device) * step)
    rows = torch.arange(size[0], device=device)
    cols = torch.arange(size[1], device=device)
    in_r = (rows >= starts[0][:, None]) & (rows < starts[0][:, None] + window[0])  # [ny, H]
    in_c = (cols >= starts[1][:, None]) & (cols < starts[1][:, None] + window[1])  # [nx, W]
    return (in_r[:, None, :, None] & in_c[None, :, None, :]).reshape(-1, *size)


# The occlusion window is about 1/8 of the side, as in Zeiler and Fergus' 224-px setting
# scaled to the image, but never below this: at 32x32 1/8 is 4 px, which costs four times
# the forwards of today's 8-px window (225 windows at stride 2 instead of 49) for a map
# that is noisier, and would change every 32x32 result (oracle checks, benchmarks, the
# audit) that was measured with window 8, stride 4.
OCCLUSION_MIN_WINDOW = 8
OCCLUSION_WINDOW_FRACTION = 1 / 8


def _half(window: tuple[int, int]) -> tuple[int, int]:
    return max(1, window[0] // 2), max(1, window[1] // 2)


def occlusion_defaults(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Occlusion's default ``(window, stride)`` for images of ``size`` ``(H, W)``.

    Per side: ``window = min(side, max(8, round(side / 8)))``, ``stride = window // 2``
    (at least 1): ``(8, 8), (4, 4)`` at 32x32, ``(28, 28), (14, 14)`` at 224x224.
    """
    window = tuple(
        min(side, max(OCCLUSION_MIN_WINDOW, round(side * OCCLUSION_WINDOW_FRACTION)))
        for side in size
    )
    return window, _half(window)


@register("occlusion", family="perturbation", needs_layer=False)
def occlusion(
    ctx: ExplainContext,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    fill: float | torch.Tensor = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014): ``M_c(p) = mean_{windows W on p} y_c(x) - y_c(x_W)``.

    ``x_W`` has the ``window`` (all colour channels) set to ``fill`` (a number, or a tensor
    broadcastable to the images); windows slide by ``stride`` (see :func:`window_masks`)
    and each pixel gets the mean score drop of the windows covering it (captum's
    Occlusion). Defaults scale with the image (:func:`occlusion_defaults`): ``window``
    about 1/8 of each side but at least 8 px (8 at 32x32 and below, capped at the side;
    28 at 224), ``stride`` half the window (4 at 32x32, 14 at 224). Layer: none. Cost: one
    forward per image and window (49 windows at 32x32, 225 at 224), ``batch_size`` a pass,
    each scored for all classes.
    """
    check_batch_size(batch_size)
    x = ctx.images
    b = x.shape[0]
    auto_window, auto_stride = occlusion_defaults(tuple(x.shape[-2:]))
    win = auto_window if window is None else _pair(window, "window")
    step = _pair(stride, "stride") if stride is not None else (
        auto_stride if window is None else _half(win))
    masks = window_masks(tuple(x.shape[-2:]), win, step, x.device)  # [N, H, W]
    value = _fill_like(fill, x)
    base = ctx.logits(x)  # [B, classes]

    def occluded_logits(lo: int, hi: int) -> torch.Tensor:
        occluded = torch.where(masks[lo:hi, None, None], value, x.unsqueeze(0))  # [m, B, C, H, W]
        return ctx.logits(occluded.reshape(-1, *x.shape[1:])).reshape(hi - lo, b, -1)

    drop = base.unsqueeze(0) - fill_chunks(masks.shape[0], max(1, batch_size // b),
                                           occluded_logits)  # [N, B, classes]
    sel = torch.einsum("nbk,tbk->tbn", drop, ctx.selectors)
    maskf = masks.float()
    return torch.einsum("tbn,nhw->tbhw", sel, maskf) / maskf.sum(0)


# -- LIME -----------------------------------------------------------------------------------
def grid_segments(b: int, size: tuple[int, int], cells: int, device: torch.device) -> torch.Tensor:
    """``[B, H, W]`` labels of a ``cells x cells`` grid (cells differ by at most one pixel).

    Every label has pixels when ``cells <= min(H, W)``; :func:`lime` caps ``cells`` so.
    """
    rows = torch.arange(size[0], device=device) * cells // size[0]
    cols = torch.arange(size[1], device=device) * cells // size[1]
    labels = rows[:, None] * cells + cols[None, :]
    return labels.expand(b, *size).contiguous()


def kmeans_segments(
    x: torch.Tensor, cells: int, compactness: float = 1.0, iters: int = 10
) -> torch.Tensor:
    """``[B, H, W]`` segment labels by k-means on colour and position, torch only.

    Not SLIC (Achanta et al. 2012), though it starts like it: ``cells x cells`` seeds on a
    grid, pixels clustered on ``(colour, position)`` (colour standardised per image,
    position in units of the seed spacing ``S`` times ``compactness``), centres moved to
    their cluster means for ``iters`` rounds. Unlike SLIC it searches every seed for every
    pixel (not ``2S`` around it) and has no connectivity step: a segment may be in pieces.
    Every label from 0 to ``cells**2 - 1`` has at least one pixel: a cluster k-means left
    empty takes the pixel nearest its centre from a cluster of two or more.
    """
    b, c, h, w = x.shape
    nseg = cells * cells
    if nseg > h * w:
        raise ExplainError(f"kmeans segments need cells**2 <= H*W, got {nseg} > {h * w}")
    xf = x.detach().float()
    colour = (xf - xf.mean((1, 2, 3), keepdim=True)) / (xf.std((1, 2, 3), keepdim=True) + 1e-6)
    spacing = max(h, w) / cells
    ys = torch.arange(h, device=x.device, dtype=torch.float32)
    xs = torch.arange(w, device=x.device, dtype=torch.float32)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij")) * (compactness / spacing)
    feats = torch.cat([colour, pos.expand(b, 2, h, w)], 1).flatten(2).transpose(1, 2)

    def cell_centres(length: int) -> torch.Tensor:  # centre index of each grid cell
        i = torch.arange(cells, device=x.device)
        first = (i * length + cells - 1) // cells
        last = ((i + 1) * length + cells - 1) // cells - 1
        return (first + last) // 2

    cy, cx = cell_centres(h), cell_centres(w)
    centres = feats[:, (cy[:, None] * w + cx[None, :]).flatten()]  # [B, S, F]
    for _ in range(iters):
        labels = torch.cdist(feats, centres).argmin(-1)  # [B, HW]
        onehot = nn.functional.one_hot(labels, nseg).float()  # [B, HW, S]
        counts = onehot.sum(1)  # [B, S]
        sums = onehot.transpose(1, 2) @ feats  # [B, S, F]
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    dist = torch.cdist(feats, centres)  # [B, HW, S]
    labels = dist.argmin(-1)
    # An empty segment would be a LIME feature that changes no pixel (its weight pure
    # regulariser). Few are empty and only on small images: a loop is fine.
    counts = nn.functional.one_hot(labels, nseg).sum(1)  # [B, S]
    for i, s in (counts == 0).nonzero().tolist():
        donors = counts[i][labels[i]] > 1  # pixels whose segment can spare one
        p = int(torch.where(donors, dist[i, :, s], torch.inf).argmin())
        counts[i, labels[i, p]] -= 1
        counts[i, s] += 1
        labels[i, p] = s
    return labels.reshape(b, h, w)


# LIME's default grid: one segment per 4x4 pixels of area (8 x 8 = 64 segments at 32x32,
# today's default), at least 8 x 8 below that, and at most 12 x 12 = 144 segments. The cap
# keeps the fit determined by the data rather than the ridge: the default 256 samples
# stay above the 145 unknowns (at 224 an uncapped rule would have 3,136 segments), and the
# k-means segmentation's cost (pixels x segments a round) stays bounded.
LIME_PIXELS_PER_SEGMENT = 16
LIME_MIN_CELLS = 8
LIME_MAX_CELLS = 12


def lime_default_cells(size: tuple[int, int]) -> int:
    """LIME's default ``cells`` (a ``cells x cells`` grid) for images of ``size`` ``(H, W)``.

    ``round(sqrt(H * W / 16))`` clamped to ``[8, 12]`` (then, like any ``cells``, capped at
    the shorter side): 8 at 32x32 and below, 12 from 48x48 on (224 included).
    """
    by_area = round((size[0] * size[1] / LIME_PIXELS_PER_SEGMENT) ** 0.5)
    return min(LIME_MAX_CELLS, max(LIME_MIN_CELLS, by_area))


@register("lime", family="perturbation", needs_layer=False, stochastic=True)
def lime(
    ctx: ExplainContext,
    segments: str = "grid",
    cells: int | None = None,
    samples: int = 256,
    fill: float | torch.Tensor = 0.0,
    kernel_width: float = 0.25,
    ridge: float = 1.0,
    score: str = "logit",
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016): a weighted linear surrogate over image segments.

    The image is cut into ``cells x cells`` segments (``cells`` capped at the image's
    shorter side, so none is empty; None scales with the image area,
    :func:`lime_default_cells`: 8 at 32x32, 12 at 224x224): by default a grid of rectangles
    (:func:`grid_segments`; LIME's own image explainer uses quickshift superpixels), or
    ``kmeans``: k-means clusters of colour and position (:func:`kmeans_segments`; not
    SLIC, there is no connectivity step). ``samples`` random on/off patterns ``z`` (the
    first all on; the rest Bernoulli(0.5) from a private generator seeded with ``seed``)
    replace the off segments with ``fill``; the class ``score`` (``logit`` or ``softmax``) of
    each is fitted by ridge regression ``y ~ beta . z + b`` (``ridge`` on ``beta`` only)
    weighted by ``exp(-d(z, 1)^2 / kernel_width^2)`` with ``d`` the cosine distance, as in
    LIME's image explainer. Map: each pixel gets its segment's ``beta``. Layer: none.
    Cost: ``samples`` forwards per image (``batch_size`` a pass), all classes fitted at once
    by one batched solve.
    """
    if segments not in ("grid", "kmeans"):
        raise ExplainError(f"segments must be 'grid' or 'kmeans', got {segments!r}")
    if score not in ("logit", "softmax"):
        raise ExplainError(f"score must be 'logit' or 'softmax', got {score!r}")
    if samples < 2 or (cells is not None and cells < 1):
        raise ExplainError(f"lime needs samples >= 2 and cells >= 1, got {samples} and {cells}")
    check_batch_size(batch_size)
    x = ctx.images
    b, size = x.shape[0], tuple(x.shape[-2:])
    if cells is None:
        cells = lime_default_cells(size)
    cells = min(cells, *size)  # more cells than pixels a side would leave some empty
    if segments == "grid":
        labels = grid_segments(b, size, cells, x.device)
    else:
        labels = kmeans_segments(x, cells)
    nseg = cells * cells
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.rand((samples, b, nseg), generator=gen) < 0.5
    z[0] = True
    z = z.to(x.device)
    value = _fill_like(fill, x)
    flat_labels = labels.reshape(1, b, -1)

    def sample_logits(lo: int, hi: int) -> torch.Tensor:
        zc = z[lo:hi]
        keep = torch.gather(zc, 2, flat_labels.expand(hi - lo, -1, -1)).reshape(
            hi - lo, b, 1, *size
        )
        perturbed = torch.where(keep, x.unsqueeze(0), value)
        return ctx.logits(perturbed.reshape(-1, *x.shape[1:])).reshape(hi - lo, b, -1)

    y = fill_chunks(samples, max(1, batch_size // b), sample_logits).double()  # [N, B, classes]
    if score == "softmax":
        y = y.softmax(-1)
    zf = z.double()
    on = zf.sum(-1)
    cosine = on.sqrt() / nseg**0.5  # cos(z, 1) for a 0/1 vector z
    dist = torch.where(on > 0, 1 - cosine, torch.ones_like(cosine))
    weight = torch.exp(-dist.pow(2) / kernel_width**2)  # [N, B]
    design = torch.cat([zf, torch.ones_like(zf[..., :1])], -1).transpose(0, 1)  # [B, N, S+1]
    wd = design * weight.transpose(0, 1).unsqueeze(-1)
    gram = wd.transpose(1, 2) @ design
    penalty = torch.full((nseg + 1,), float(ridge), dtype=gram.dtype, device=gram.device)
    penalty[-1] = 0
    gram = gram + torch.diag(penalty)
    rhs = wd.transpose(1, 2) @ y.transpose(0, 1)  # [B, S+1, classes]
    coef = torch.linalg.solve(gram, rhs)[:, :nseg].float()  # [B, S, classes]
    per_seg = torch.einsum("bsk,tbk->tbs", coef, ctx.selectors)  # [T, B, S]
    t = per_seg.shape[0]
    index = labels.reshape(1, b, -1).expand(t, -1, -1)
    return torch.gather(per_seg, 2, index).reshape(t, b, *size)
