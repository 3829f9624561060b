"""Audit measures: how faithful, well localised, sane and biased explanation maps are.

Pure torch: no Lightning, no matplotlib. Every measure is declared in a small registry
(:func:`register_measure`) with its category and whether higher is better, so the report
and ``metrics.json`` can say the direction of every number they show.

Maps are raw ``[N, H, W]`` tensors (one map per image, at input resolution) as
:func:`explain.run` returns them for a ``targets`` tensor; images are ``[N, 3, H, W]`` in
the model's (normalised) input space.

References: deletion / insertion (Petsiuk et al. 2018, RISE); Average Drop and Increase in
Confidence (Chattopadhay et al. 2018, Grad-CAM++); weakly-supervised localisation (Zhou et
al. 2016, CAM); pointing game (Zhang et al. 2016) and its energy variant (Wang et al. 2020,
Score-CAM); model-parameter randomisation (Adebayo et al. 2018).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics
from .base import find_split

CATEGORIES = ("faithfulness", "localisation", "sanity", "bias", "agreement")


# -- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasureInfo:
    """What the report needs to know to present a measure honestly."""

    name: str
    category: str
    higher_is_better: bool | None  # None: no better direction (read it against a baseline)
    description: str
    unit: str = ""  # "" for fractions in [0, 1] or plain numbers, "%" for percentages
    reference: str = ""
    label: str = ""  # for table headers; defaults to the name
    share: bool = False  # per-image values are 0/1 (or 0/100): a Wilson interval fits

    @property
    def direction(self) -> str:
        """``higher is better``, ``lower is better`` or ``no better direction``."""
        if self.higher_is_better is None:
            return "no better direction"
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def arrow(self) -> str:
        """A one-character direction marker for tables."""
        return {True: "\u2191", False: "\u2193", None: "\u2195"}[self.higher_is_better]

    def as_dict(self) -> dict[str, object]:
        return {
            "category": self.category,
            "higher_is_better": self.higher_is_better,
            "direction": self.direction,
            "description": self.description,
            "unit": self.unit,
            "reference": self.reference,
            "label": self.label or self.name,
        }


_MEASURES: dict[str, MeasureInfo] = {}


def register_measure(
    name: str,
    *,
    category: str,
    higher_is_better: bool | None,
    description: str,
    unit: str = "",
    reference: str = "",
    label: str = "",
    share: bool = False,
) -> MeasureInfo:
    """Declare a measure; duplicate names and unknown categories are refused."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown measure category {category!r}; choose one of {CATEGORIES}")
    if name in _MEASURES:
        raise ValueError(f"measure {name!r} is already registered")
    info = MeasureInfo(
        name, category, higher_is_better, description, unit, reference, label or name, share
    )
    _MEASURES[name] = info
    return info


def get_measure(name: str) -> MeasureInfo:
    """Look up a measure; an unknown name lists the registered ones."""
    try:
        return _MEASURES[name]
    except KeyError:
        raise KeyError(
            f"unknown measure {name!r}; available: {', '.join(available_measures())}"
        ) from None


def available_measures(category: str | None = None) -> list[str]:
    """Registered measure names (of one category if given), in registration order."""
    return [n for n, m in _MEASURES.items() if category is None or m.category == category]


# name, label, category, higher_is_better, unit, share, reference, description
_DECLARED = [
    ("deletion_auc", "Deletion AUC", "faithfulness", False, "", False, "Petsiuk et al. 2018",
     "area under the target-class probability while the most important pixels are removed "
     "first (replaced by the fill); a faithful map makes it fall fast"),
    ("insertion_auc", "Insertion AUC", "faithfulness", True, "", False, "Petsiuk et al. 2018",
     "area under the target-class probability while the most important pixels are inserted "
     "first into a blurred image; a faithful map makes it rise fast"),
    ("average_drop", "Average Drop", "faithfulness", False, "%", False,
     "Chattopadhay et al. 2018",
     "mean relative drop of the target-class probability when the image is multiplied by "
     "the max-normalised map (only the explained evidence is kept)"),
    ("increase_in_confidence", "Increase in Confidence", "faithfulness", True, "%", True,
     "Chattopadhay et al. 2018",
     "share of images whose target-class probability rises when only the explained "
     "evidence is kept"),
    ("box_iou", "Box IoU", "localisation", True, "", False, "Zhou et al. 2016",
     "IoU between the box around the largest connected region above 20% of the map's "
     "maximum and the object's bounding box"),
    ("localisation_accuracy", "Loc. accuracy (IoU \u2265 0.5)", "localisation", True, "", True,
     "Zhou et al. 2016",
     "share of images whose box IoU is at least 0.5 (ground-truth class known)"),
    ("pointing_game", "Pointing game", "localisation", True, "", True, "Zhang et al. 2016",
     "share of images whose map maximum lies on the object"),
    ("energy_pointing_game", "Energy pointing game", "localisation", True, "", False,
     "Wang et al. 2020", "share of the map's positive mass that lies on the object"),
    ("sanity_spearman", "Spearman (randomised vs trained)", "sanity", False, "", False,
     "Adebayo et al. 2018",
     "Spearman rank correlation (of absolute values) between the maps of the trained model "
     "and of a model whose layers were re-initialised from the head down; a map that "
     "reflects the model changes, so the correlation should fall"),
    ("border_energy", "Border energy", "bias", None, "", False, "",
     "share of the true-class map's positive mass in the image border; compare it with the "
     "border's share of the image area"),
    ("cue_energy", "Cue energy", "bias", False, "", False, "",
     "share of the true-class map's positive mass inside the spurious cue patch, on images "
     "that carry it; compare it with the patch's share of the image area"),
    ("cue_reliance", "Reliance", "bias", False, "", False, "",
     "accuracy of a class with the cue minus its accuracy without it (both computed on the "
     "same images); large = the class leans on the cue"),
    ("cue_attraction", "Attraction", "bias", False, "", False, "",
     "rise in the share of other classes' images predicted as this class when the cue is "
     "stamped on them; large = the cue alone pulls predictions to the class"),
    ("cam_gradcam_correlation", "Pearson correlation", "agreement", None, "", False, "",
     "Pearson correlation between CAM and Grad-CAM maps of the same image and class"),
    ("cam_gradcam_iou", "Region IoU", "agreement", None, "", False, "",
     "IoU of the regions above 20% of each map's maximum (CAM vs Grad-CAM)"),
]
for _name, _label, _cat, _hib, _unit, _share, _ref, _desc in _DECLARED:
    register_measure(_name, label=_label, category=_cat, higher_is_better=_hib, unit=_unit,
                     share=_share, reference=_ref, description=_desc)
del _name, _label, _cat, _hib, _unit, _share, _ref, _desc


# -- statistics -------------------------------------------------------------------------


def summarize(values: Tensor | list[float], measure: str | None = None) -> dict[str, object]:
    """Mean, standard deviation, sample size and a 95% interval of the finite values.

    The interval is the normal one of the mean, or Wilson's for a ``share`` measure (0/1
    values per image). ``measure`` adds its direction, so every number in the report says
    which way is good.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    mean = float(v.mean()) if n else float("nan")
    std = float(v.std(unbiased=True)) if n > 1 else float("nan")
    half = 1.96 * std / math.sqrt(n) if n > 1 else float("nan")
    ci = [mean - half, mean + half]
    interval = "normal"
    info = get_measure(measure) if measure is not None else None
    if info is not None and info.share and n:
        # Hit/miss values: the normal interval collapses to zero width at 0% or 100%.
        scale = 100.0 if info.unit == "%" else 1.0
        ci = [scale * b for b in wilson_interval(int(round(float(v.sum()) / scale)), n)]
        interval = "wilson"
    out: dict[str, object] = {"mean": mean, "std": std, "n": n, "ci95": ci, "interval": interval}
    if info is not None:
        out["higher_is_better"] = info.higher_is_better
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sane at 0%, 100% and small ``n``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict[str, object]:
    """A share with its sample size and Wilson 95% interval."""
    lo, hi = wilson_interval(successes, n)
    return {"value": successes / n if n else float("nan"), "k": successes, "n": n, "ci95": [lo, hi]}


def group_mean(values: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group mean of the finite ``values`` ``[N]`` and the count behind each mean."""
    values = values.detach().float().cpu()
    groups = groups.detach().long().cpu()
    ok = torch.isfinite(values)
    sums = torch.zeros(num_groups).index_add_(0, groups[ok], values[ok])
    counts = torch.zeros(num_groups).index_add_(0, groups[ok], torch.ones(int(ok.sum())))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return means, counts.long()


# -- model plumbing ---------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; every module's train flag is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def predict_proba(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax probabilities ``[N, K]`` (float32, on ``images``' device), in chunks."""
    device = _device(model)
    out = []
    with _inference(model):
        for chunk in images.split(batch_size):
            out.append(model(chunk.to(device)).float().softmax(-1).to(images.device))
    return torch.cat(out) if out else torch.empty(0)


def _pick(probs: Tensor, targets: Tensor) -> Tensor:
    return probs.gather(-1, targets.to(probs.device).long().view(-1, 1)).squeeze(-1)


# -- faithfulness -----------------------------------------------------------------------


def gaussian_blur(images: Tensor, sigma: float = 4.0) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflect padding (the insertion start)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    h, w = images.shape[-2:]
    # Reflect padding must be smaller than the image side.
    radius = min(radius, h - 1, w - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pixel_ranks(maps: Tensor, seed: int = 0) -> Tensor:
    """Importance rank of each pixel, ``[N, H*W]`` long: 0 for the largest map value.

    Ties (large zero regions after a ReLU are common) are broken by a seeded random order,
    not by raster order, which would always remove the top rows first.
    """
    flat = maps.detach().float().flatten(1).cpu()
    n, d = flat.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(n, d, generator=g), dim=1)
    shuffled = flat.gather(1, perm)
    order = perm.gather(1, torch.argsort(-shuffled, dim=1, stable=True))  # pixel per rank
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d).expand(n, d).contiguous())
    return ranks.to(maps.device)


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    fill: str = "mean",
    start: str = "blur",
    blur_sigma: float = 4.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Deletion and insertion curves and their areas (Petsiuk et al. 2018).

    Pixels are taken in decreasing map order, ``H*W/steps`` at a time. Deletion replaces
    them with the fill: ``"mean"`` (zero in the normalised input space, i.e. the dataset's
    mean colour) or ``"blur"`` (a Gaussian blur of the image). Insertion starts from
    ``start`` (``"blur"``, the paper's choice, or ``"mean"``) and puts the original pixels
    back. The mean fill is used for deletion by default because a blur keeps the object's
    coarse shape, which a CNN still recognises. The score is the softmax probability
    of ``targets``; the areas use the trapezoid rule over the fraction of pixels in [0, 1].
    All ``N * (steps + 1)`` perturbed images of a curve go through the model in batches.

    Returns ``fractions [steps+1]``, ``deletion_curve`` / ``insertion_curve``
    ``[N, steps+1]`` and ``deletion_auc`` / ``insertion_auc`` ``[N]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for name, value in (("fill", fill), ("start", start)):
        if value not in ("mean", "blur"):
            raise ValueError(f"{name} must be 'mean' or 'blur', got {value!r}")
    device = _device(model)
    images = images.detach().float().to(device)
    n, _, h, w = images.shape
    d = h * w
    targets = targets.to(device).long()
    ranks = pixel_ranks(maps, seed).to(device)  # [N, HW]
    fractions = torch.linspace(0, 1, steps + 1)
    counts = (fractions * d).round().long().to(device)  # pixels switched at each step
    blurred = gaussian_blur(images, blur_sigma)
    filler = blurred if fill == "blur" else torch.zeros_like(images)
    origin = blurred if start == "blur" else torch.zeros_like(images)
    # Images per model call: whole curves of several images at once.
    per_chunk = max(1, batch_size // (steps + 1))
    curves: dict[str, list[Tensor]] = {"deletion": [], "insertion": []}
    with _inference(model):
        for start in range(0, n, per_chunk):
            sl = slice(start, start + per_chunk)
            x, xo, xf = images[sl], origin[sl], filler[sl]
            top = ranks[sl][:, None, :] < counts[None, :, None]  # [n, S+1, HW]
            top = top.view(-1, steps + 1, 1, h, w)
            t = targets[sl].repeat_interleave(steps + 1)
            deleted = torch.where(top, xf[:, None], x[:, None]).flatten(0, 1)
            inserted = torch.where(top, x[:, None], xo[:, None]).flatten(0, 1)
            for key, batch in (("deletion", deleted), ("insertion", inserted)):
                probs = model(batch).float().softmax(-1)
                curves[key].append(_pick(probs, t).view(-1, steps + 1))
    out: dict[str, Tensor] = {"fractions": fractions}
    for key, parts in curves.items():
        curve = torch.cat(parts).cpu()
        out[f"{key}_curve"] = curve
        out[f"{key}_auc"] = torch.trapezoid(curve, fractions, dim=1)
    return out


def average_drop_increase(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, batch_size: int = 256
) -> dict[str, Tensor]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018), per image.

    The image is multiplied by its map scaled to ``[0, 1]`` by its maximum (positive part),
    in the model's normalised input space, so suppressed pixels tend to the dataset's mean
    colour. ``average_drop`` is ``100 * max(0, Y - O) / Y`` and ``increase_in_confidence``
    is ``100 * [O > Y]``, with ``Y`` / ``O`` the target probability on the original / the
    masked image. Both are ``[N]``; their means are the paper's numbers.
    """
    device = _device(model)
    images = images.detach().float().to(device)
    pos = maps.detach().float().to(device).clamp_min(0)
    peak = pos.flatten(1).amax(1).view(-1, 1, 1)
    weights = torch.where(peak > 0, pos / peak.clamp_min(1e-12), torch.zeros_like(pos))
    y = _pick(predict_proba(model, images, batch_size), targets)
    o = _pick(predict_proba(model, images * weights[:, None], batch_size), targets)
    drop = 100 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return {
        "average_drop": drop.cpu(),
        "increase_in_confidence": 100 * (o > y).float().cpu(),
        "score": y.cpu(),
        "masked_score": o.cpu(),
    }


# -- localisation -----------------------------------------------------------------------


def connected_components(foreground: Tensor, max_iter: int | None = None) -> Tensor:
    """Label 8-connected components of a boolean ``[N, H, W]`` mask (0 = background).

    Label propagation: every foreground pixel starts with its own label and takes the
    largest label in its 3x3 neighbourhood until nothing changes (a max-pool flood fill),
    so each component ends up labelled by its largest pixel index + 1.
    """
    fg = foreground.bool()
    n, h, w = fg.shape
    labels = (torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, h, w))
    labels = labels * fg  # float32 holds integers up to 2**24 exactly
    fgf = fg.float()
    for _ in range(max_iter or h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fgf
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def largest_component(foreground: Tensor, weights: Tensor | None = None) -> Tensor:
    """Boolean ``[N, H, W]`` mask of each image's largest 8-connected component.

    Equal sizes are resolved by the larger sum of ``weights`` (the map) inside.
    """
    labels = connected_components(foreground)
    n, h, w = labels.shape
    flat = labels.flatten(1)
    sizes = torch.zeros(n, h * w + 1, device=labels.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    score = sizes
    if weights is not None:
        wpos = weights.detach().float().clamp_min(0).flatten(1)
        mass = torch.zeros_like(sizes).scatter_add_(1, flat, wpos)
        score = sizes + 0.5 * mass / mass.sum(1, keepdim=True).clamp_min(1e-12)  # < 1: ties only
    score[:, 0] = -1  # the background is never a component
    best = score.argmax(1)
    return (labels == best.view(n, 1, 1)) & foreground.bool()


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes ``[N, 4]`` as ``(x0, y0, x1, y1)`` pixel edges (x1, y1 exclusive).

    NaN rows for empty masks.
    """
    m = masks.bool()
    n, h, w = m.shape
    rows, cols = m.any(2), m.any(1)
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~rows.any(1)
    return torch.where(empty[:, None], torch.full_like(boxes, float("nan")), boxes)


def threshold_boxes(maps: Tensor, frac: float = 0.2) -> tuple[Tensor, Tensor]:
    """Weakly-supervised localisation box of each map (Zhou et al. 2016).

    Keeps pixels at or above ``frac`` times the map's maximum, takes the largest
    8-connected component and returns its box ``[N, 4]`` (see :func:`mask_boxes`) and the
    component ``[N, H, W]``. Maps whose maximum is not positive get a NaN box.
    """
    m = maps.detach().float()
    peak = m.flatten(1).amax(1).view(-1, 1, 1)
    fg = (m >= frac * peak) & (peak > 0)
    comp = largest_component(fg, m)
    return mask_boxes(comp), comp


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boxes ``[N, 4]`` ``(x0, y0, x1, y1)``; NaN where either box is NaN."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


def localisation(maps: Tensor, object_masks: Tensor | None, frac: float = 0.2) -> dict[str, Tensor]:
    """Boxes of each map and, where object masks exist, the localisation measures per image.

    Returns ``boxes [N, 4]`` always; with masks also ``gt_boxes``, ``box_iou`` (0 when the
    map yields no box, since nothing was localised), ``localisation_accuracy`` (IoU >= 0.5,
    as 0/1), ``pointing_game`` and ``energy_pointing_game`` (from :mod:`explain.metrics`).
    """
    maps = maps.detach().float().cpu()
    boxes, _ = threshold_boxes(maps, frac)
    out: dict[str, Tensor] = {"boxes": boxes}
    if object_masks is None:
        return out
    masks = object_masks.bool().cpu()
    has_gt = masks.flatten(1).any(1)
    gt = mask_boxes(masks)
    iou = box_iou(boxes, gt)
    iou = torch.where(torch.isnan(iou) & has_gt, torch.zeros_like(iou), iou)
    out["gt_boxes"] = gt
    out["box_iou"] = iou
    out["localisation_accuracy"] = torch.where(has_gt, (iou >= 0.5).float(), iou)
    nan = torch.full_like(iou, float("nan"))
    out["pointing_game"] = torch.where(has_gt, metrics.pointing_game(maps, masks), nan)
    out["energy_pointing_game"] = torch.where(has_gt, metrics.energy_in_mask(maps, masks), nan)
    return out


# -- agreement --------------------------------------------------------------------------


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of paired maps ``[N, ...]``; NaN where either map is constant."""
    x = a.detach().double().flatten(1)
    y = b.detach().double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    den = (x.norm(dim=1) * y.norm(dim=1))
    r = (x * y).sum(1) / den.clamp_min(1e-300)
    return torch.where(den > 0, r, torch.full_like(r, float("nan"))).float()


def threshold_iou(a: Tensor, b: Tensor, frac: float = 0.2) -> Tensor:
    """IoU of the regions at or above ``frac`` of each map's maximum, ``[N]``."""

    def region(m: Tensor) -> Tensor:
        m = m.detach().float().flatten(1)
        peak = m.amax(1, keepdim=True)
        return (m >= frac * peak) & (peak > 0)

    ra, rb = region(a), region(b)
    union = (ra | rb).sum(1).float()
    inter = (ra & rb).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


# -- sanity -----------------------------------------------------------------------------


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``[N, D]`` of each row (0-based), ties sharing their average rank."""
    flat = x.detach().double().flatten(1)
    srt = flat.sort(1).values.contiguous()
    lo = torch.searchsorted(srt, flat.contiguous(), right=False)
    hi = torch.searchsorted(srt, flat.contiguous(), right=True)
    return (lo + hi - 1).double() / 2


def spearman(a: Tensor, b: Tensor, absolute: bool = True) -> Tensor:
    """Spearman rank correlation of paired maps ``[N, ...]`` (ties get average ranks).

    ``absolute`` ranks ``|map|`` (Adebayo et al.'s ABS variant), so a sign flip of a signed
    gradient map is not counted as a change. NaN where either map is constant.
    """
    if absolute:
        a, b = a.abs(), b.abs()
    return pearson(average_ranks(a), average_ranks(b))


def _varies(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    return flat.amax(1) > flat.amin(1)


def cascade_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The cascading-randomisation order: ``(step label, module names)``, head first.

    With a declared features/head split: the classifier, then the trunk's top-level blocks
    from the last to the first. Plain layers of a flat trunk (VGG) are grouped into stages
    of consecutive convolutions of the same width, each with the layers that follow it.
    Without a split: the model's top-level children with parameters, last first.
    """
    found = find_split(model)
    if found is None:
        children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
        return [(n, [n]) for n, _ in reversed(children)]
    backbone, prefix = found
    steps: list[tuple[str, list[str]]] = []
    for name in ("classifier", "fc", "head_linear"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            steps.append((name, [prefix + name]))
            break
    trunk = getattr(backbone, "trunk", None)
    if not isinstance(trunk, nn.Module):
        return steps
    blocks: list[tuple[str, list[str]]] = []
    stage: list[str] = []
    width: int | None = None
    for name, child in trunk.named_children():
        full = f"{prefix}trunk.{name}"
        if any(True for _ in child.children()):  # a container block (ResNet layerN)
            if stage:
                blocks.append(("", stage))
                stage, width = [], None
            blocks.append((name, [full]))
            continue
        if isinstance(child, nn.Conv2d):
            if stage and child.out_channels != width:
                blocks.append(("", stage))
                stage = []
            width = child.out_channels
        stage.append(full)
    if stage:
        blocks.append(("", stage))
    for label, names in reversed(blocks):
        has_params = any(
            any(True for _ in model.get_submodule(n).parameters()) for n in names
        )
        if not has_params:
            continue
        if not label:
            first, last = names[0].split(".")[-1], names[-1].split(".")[-1]
            label = f"trunk.{first}-{last}" if first != last else f"trunk.{first}"
        steps.append((label, names))
    return steps


def reinitialize(model: nn.Module, names: list[str], seed: int) -> None:
    """Re-initialise (``reset_parameters``) every submodule of the named modules, seeded.

    BatchNorm layers get their default affine parameters and fresh running statistics.
    The global RNG stream is left as it was.
    """
    device = _device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in names:
            for sub in model.get_submodule(name).modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()


def cascading_randomization(
    model: nn.Module,
    explain_fns: Mapping[str, Callable[[nn.Module], Tensor]],
    *,
    seed: int = 0,
    keep: int = 4,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the head.

    A deep copy of ``model`` has its modules re-initialised step by step (see
    :func:`cascade_steps`); after each step every function in ``explain_fns`` (a model ->
    maps ``[N, H, W]``) is re-run and compared with its maps on the trained model.
    ``model`` itself is not modified.

    A randomised map that is constant while the trained one is not counts as correlation
    0; a constant trained map gives NaN (nothing to compare). Returns ``steps`` (labels),
    ``spearman`` ``{method: [S, N]}``, ``seconds`` per method and ``maps``
    ``{method: [S + 1, keep, H, W]}`` (trained first) for figures.
    """
    steps = cascade_steps(model)
    seconds = dict.fromkeys(explain_fns, 0.0)

    def timed(method: str, net: nn.Module) -> Tensor:
        t = time.perf_counter()
        maps = explain_fns[method](net).detach().float().cpu()
        seconds[method] += time.perf_counter() - t
        return maps

    reference = {m: timed(m, model) for m in explain_fns}
    if on_step is not None:
        on_step("trained")
    copy_model = copy.deepcopy(model)
    corr: dict[str, list[Tensor]] = {m: [] for m in explain_fns}
    kept: dict[str, list[Tensor]] = {m: [r[:keep]] for m, r in reference.items()}
    for i, (label, names) in enumerate(steps):
        reinitialize(copy_model, names, seed + 1000 * (i + 1))
        for method in explain_fns:
            maps = timed(method, copy_model)
            rho = spearman(reference[method], maps)
            # A randomised map that went flat (e.g. all zero after a ReLU) shares no ranking
            # with a structured reference: count it as 0 rather than dropping the image.
            flat = maps.flatten(1).amax(1) == maps.flatten(1).amin(1)
            rho = torch.where(flat & _varies(reference[method]), torch.zeros_like(rho), rho)
            corr[method].append(rho)
            kept[method].append(maps[:keep])
        if on_step is not None:
            on_step(label)
    return {
        "steps": [label for label, _ in steps],
        "spearman": {m: torch.stack(v) if v else torch.empty(0) for m, v in corr.items()},
        "maps": {m: torch.stack(v) for m, v in kept.items()},
        "seconds": seconds,
    }


# -- bias -------------------------------------------------------------------------------


def border_mask(h: int, w: int, width: int) -> Tensor:
    """Boolean ``[H, W]`` frame ``width`` pixels wide."""
    m = torch.ones(h, w, dtype=torch.bool)
    if 2 * width < min(h, w):
        m[width : h - width, width : w - width] = False
    return m


def region_energy(maps: Tensor, regions: Tensor) -> Tensor:
    """Share of each map's positive mass inside its region ``[N]`` (NaN for empty maps).

    ``regions`` is ``[N, H, W]`` or one ``[H, W]`` region for all maps.
    """
    regions = regions.bool()
    if regions.dim() == 2:
        regions = regions.expand(maps.shape[0], *regions.shape)
    return metrics.energy_in_mask(maps.detach().float().cpu(), regions.cpu())


def _paired_mean_se(diff: Tensor) -> tuple[float, float]:
    """Mean and standard error of paired differences (NaN when empty)."""
    n = diff.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(diff.float().mean())
    se = float(diff.float().std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, se


def counterfactual(
    model: nn.Module,
    clean: Tensor,
    stamped: Tensor,
    labels: Tensor,
    cue_classes: list[int],
    num_classes: int,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Accuracy and confidence of each class with and without the cue, on the same images.

    ``clean`` are the images without any cue, ``stamped`` the same images with the cue on
    every one of them (both in the model's input space). Per class ``c`` (``[K]`` tensors):

    * ``n``: images of class ``c``;
    * ``acc_without`` / ``acc_with``: accuracy on them without / with the cue;
    * ``conf_without`` / ``conf_with``: mean probability of the true class;
    * ``reliance``: ``acc_with - acc_without`` and ``reliance_se``, its standard error
      from the paired per-image differences;
    * ``attraction``: over images of classes outside ``cue_classes`` and other than ``c``,
      the share predicted as ``c`` with the cue minus the share without it
      (``attraction_n`` images, ``attraction_se`` its paired standard error).

    Also ``correct_without`` / ``correct_with``: ``[N]`` booleans per image.
    """
    labels = labels.long().cpu()
    p0 = predict_proba(model, clean, batch_size).cpu()
    p1 = predict_proba(model, stamped, batch_size).cpu()
    pred0, pred1 = p0.argmax(1), p1.argmax(1)
    k = num_classes
    ok0, ok1 = pred0 == labels, pred1 == labels
    acc0, n = group_mean(ok0.float(), labels, k)
    acc1, _ = group_mean(ok1.float(), labels, k)
    conf0, _ = group_mean(_pick(p0, labels), labels, k)
    conf1, _ = group_mean(_pick(p1, labels), labels, k)
    is_cue = torch.zeros(k, dtype=torch.bool)
    is_cue[[c for c in cue_classes if c < k]] = True
    pool = ~is_cue[labels]
    nan = torch.full((k,), float("nan"))
    reliance, reliance_se = nan.clone(), nan.clone()
    attraction, attraction_se = nan.clone(), nan.clone()
    attraction_n = torch.zeros(k, dtype=torch.long)
    for c in range(k):
        own = labels == c
        reliance[c], reliance_se[c] = _paired_mean_se(ok1[own].float() - ok0[own].float())
        sel = pool & (labels != c)
        attraction_n[c] = int(sel.sum())
        moved = (pred1[sel] == c).float() - (pred0[sel] == c).float()
        attraction[c], attraction_se[c] = _paired_mean_se(moved)
    return {
        "n": n,
        "acc_without": acc0,
        "acc_with": acc1,
        "conf_without": conf0,
        "conf_with": conf1,
        "reliance": reliance,
        "reliance_se": reliance_se,
        "attraction": attraction,
        "attraction_se": attraction_se,
        "attraction_n": attraction_n,
        "correct_without": ok0,
        "correct_with": ok1,
    }


def _significant(effect: float, se: float, threshold: float, z: float = 1.96) -> bool:
    if not math.isfinite(effect) or effect < threshold:
        return False
    # A zero standard error with a large effect (every image moved) is as clear as it gets.
    return not math.isfinite(se) or effect - z * se > 0


def flag_classes(cf: Mapping[str, Tensor], threshold: float = 0.2, min_n: int = 5) -> list[int]:
    """Classes that lean on the cue, from :func:`counterfactual`'s result.

    A class with at least ``min_n`` images is flagged when its ``reliance`` or
    ``attraction`` reaches ``threshold`` (20 points of accuracy or of predictions by
    default) and the lower end of its 95% interval (paired standard error) is above zero,
    so a small, noisy sample does not raise a flag on its own.
    """
    out = []
    for c in range(len(cf["n"])):
        if int(cf["n"][c]) < min_n:
            continue
        if _significant(float(cf["reliance"][c]), float(cf["reliance_se"][c]), threshold) or (
            _significant(float(cf["attraction"][c]), float(cf["attraction_se"][c]), threshold)
        ):
            out.append(c)
    return out


# -- JSON-ready summaries: what the audit reports per section ----------------------------


def by_class(values: Tensor, labels: Tensor, names: list[str], measure: str) -> dict[str, Any]:
    """:func:`summarize` per class, for the classes with at least one finite value."""
    values, labels = values.detach().float().cpu(), labels.long().cpu()
    out = {}
    for c, name in enumerate(names):
        v = values[labels == c]
        if bool(torch.isfinite(v).any()):
            out[name] = summarize(v, measure)
    return out


def accuracy_summary(
    labels: Tensor, preds: Tensor, names: list[str], confusion: Tensor
) -> dict[str, Any]:
    """Overall and per-class accuracy with Wilson intervals, and the confusion matrix."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    per_class = {}
    for c, name in enumerate(names):
        sel = labels == c
        per_class[name] = proportion(int((preds[sel] == c).sum()), int(sel.sum()))
    return {
        "accuracy": proportion(int((preds == labels).sum()), len(labels)),
        "per_class": per_class,
        "confusion_matrix": confusion.long().tolist(),
        "class_names": list(names),
        "higher_is_better": True,
    }


def localisation_summary(
    maps: Tensor, object_masks: Tensor | None, frac: float = 0.2
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Summaries of :func:`localisation`'s measures, and its per-image result."""
    per_image = localisation(maps, object_masks, frac)
    summary = {
        name: summarize(per_image[name], name)
        for name in available_measures("localisation")
        if name in per_image
    }
    return summary, per_image


def faithfulness_summary(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Deletion/insertion AUC, Average Drop and Increase in Confidence, summarised.

    Returns the summary (with the mean curves) and the per-image curves for figures.
    """
    di = deletion_insertion(model, images, maps, targets, steps=steps, batch_size=batch_size,
                            seed=seed)
    ad = average_drop_increase(model, images, maps, targets, batch_size)
    summary: dict[str, Any] = {
        name: summarize(src[name], name)
        for name, src in (("deletion_auc", di), ("insertion_auc", di), ("average_drop", ad),
                          ("increase_in_confidence", ad))
    }
    summary["curves"] = {
        "fractions": di["fractions"].tolist(),
        "deletion_mean": di["deletion_curve"].mean(0).tolist(),
        "insertion_mean": di["insertion_curve"].mean(0).tolist(),
    }
    return summary, di


def energy_by_class(
    maps: Tensor,
    labels: Tensor,
    names: list[str],
    cue_masks: Tensor | None = None,
    cue_regions: Tensor | None = None,
    border_frac: float = 0.1,
) -> dict[str, Any]:
    """Per class: the map energy in the image border and, with a known cue, on the cue.

    ``cue_masks`` marks where a cue was stamped on each image (empty where none was) and
    ``cue_regions`` where it would sit on each image; ``cue_energy`` is measured on the
    images that carry it, and ``cue_region_energy_without_cue`` in the same region of the
    images that do not (the baseline to read it against).
    """
    h, w = maps.shape[-2:]
    width = max(1, round(border_frac * min(h, w)))
    border = region_energy(maps, border_mask(h, w, width))
    out: dict[str, Any] = {"border_energy": by_class(border, labels, names, "border_energy")}
    if cue_masks is not None and cue_regions is not None:
        carries = cue_masks.flatten(1).any(1).cpu()
        region = region_energy(maps, cue_regions)
        nan = torch.full_like(region, float("nan"))
        out["cue_energy"] = by_class(torch.where(carries, region, nan), labels, names,
                                     "cue_energy")
        out["cue_region_energy_without_cue"] = by_class(
            torch.where(~carries, region, nan), labels, names, "cue_energy"
        )
    return out


def agreement_summary(a: Tensor, b: Tensor, frac: float = 0.2) -> dict[str, Any]:
    """Pearson correlation and thresholded-region IoU of paired maps, summarised."""
    r = pearson(a, b)
    return {
        "correlation": summarize(r, "cam_gradcam_correlation"),
        "iou": summarize(threshold_iou(a, b, frac), "cam_gradcam_iou"),
        "per_image_correlation": r.tolist(),
    }


def sanity_summary(spearman_by_step: Tensor, threshold: float = 0.5) -> dict[str, Any]:
    """Per-step summaries of a method's ``[S, N]`` correlations and its verdict.

    The method is flagged when, with every block re-initialised (the last step), its
    maps still keep a mean rank correlation of at least ``threshold`` with the trained
    model's: they do not depend on what the model learned. ``uncertain`` marks a verdict
    whose 95% interval spans the threshold.
    """
    per_step = [summarize(r, "sanity_spearman") for r in spearman_by_step]
    final = per_step[-1] if per_step else summarize([], "sanity_spearman")
    mean = final["mean"]
    lo, hi = final["ci95"]
    finite = all(isinstance(v, float) and math.isfinite(v) for v in (mean, lo, hi))
    return {
        "spearman": per_step,
        "head": per_step[0] if per_step else final,
        "final": final,
        "flagged": bool(isinstance(mean, float) and math.isfinite(mean) and mean >= threshold),
        # The verdict could flip with another sample: the interval spans the threshold.
        "uncertain": bool(finite and lo < threshold <= hi),
    }


def counterfactual_summary(
    cf: Mapping[str, Tensor], labels: Tensor, names: list[str], cue_classes: list[int],
    threshold: float = 0.2,
) -> dict[str, Any]:
    """:func:`counterfactual`'s result per class (with intervals) and the flagged classes."""
    labels = labels.long().cpu()
    table = {}
    for c, name in enumerate(names):
        sel = labels == c
        n = int(sel.sum())
        table[name] = {
            "n": n,
            "cue_class": c in cue_classes,
            "accuracy_without_cue": proportion(int(cf["correct_without"][sel].sum()), n),
            "accuracy_with_cue": proportion(int(cf["correct_with"][sel].sum()), n),
            "confidence_without_cue": float(cf["conf_without"][c]),
            "confidence_with_cue": float(cf["conf_with"][c]),
            "cue_reliance": float(cf["reliance"][c]),
            "cue_reliance_se": float(cf["reliance_se"][c]),
            "cue_attraction": float(cf["attraction"][c]),
            "cue_attraction_se": float(cf["attraction_se"][c]),
            "attraction_n": int(cf["attraction_n"][c]),
        }
    return {
        "n_images": len(labels),
        "threshold": threshold,
        "classes": table,
        "flagged": flag_classes(cf, threshold),
    }


def compare_models(models: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Side by side: per method and measure, each model's mean and the better one.

    ``better`` is the index of the model the measure's direction prefers (None on a tie,
    a missing value or a measure without a direction); no significance is implied.
    """
    sources = {
        "faithfulness": available_measures("faithfulness"),
        "localisation": available_measures("localisation"),
    }
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows: dict[str, Any] = {}
        for section, names in sources.items():
            for name in names:
                stats = [m[section]["methods"].get(method, {}).get(name) for m in models]
                if all(st is not None for st in stats):
                    rows[name] = _compare(stats, name)
        stats = [m["sanity"]["methods"].get(method, {}).get("final") for m in models]
        if all(st is not None for st in stats):
            rows["sanity_spearman"] = _compare(stats, "sanity_spearman")
        table[method] = rows
    return {
        "models": [m["label"] for m in models],
        "names": [m["name"] for m in models],
        "accuracy": [m["summary"]["accuracy"]["value"] for m in models],
        "methods": table,
    }


def _compare(stats: list[dict[str, Any]], measure: str) -> dict[str, Any]:
    info = get_measure(measure)
    means = [st["mean"] for st in stats]
    better = None
    finite = all(isinstance(v, float) and math.isfinite(v) for v in means)
    if finite and info.higher_is_better is not None and len(set(means)) > 1:
        best = max(means) if info.higher_is_better else min(means)
        better = means.index(best)
    return {"means": means, "n": [st["n"] for st in stats], "better": better,
            "higher_is_better": info.higher_is_better}
