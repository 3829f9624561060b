"""Finding a shortcut nobody declared: class hotspots, map clusters, transplant and cover tests.

Torch only (no Lightning, no matplotlib). The inputs are what the engine gives:

* ``maps`` ``[N, H, W]``: each image's map for its *true* class (``explain.run(model,
  images, method, targets=labels)``), raw; only the positive part is used;
* ``labels`` ``[N]`` class indices; ``images`` ``[N, 3, H, W]`` in the model's
  (normalised) input space; ``model`` any classifier returning logits.

The chain (:func:`discover` runs all of it):

1. :func:`class_hotspots`: per class, the mean of the per-image maps normalised to sum 1.
   Objects move between images, a shortcut at a fixed place does not, so it survives the
   averaging. Every ``k x k`` window is scored at once (``avg_pool2d``); the best window's
   mass over its area share is the *lift*, and the share of the class's images whose own
   map puts more than ``CONSISTENCY_FACTOR`` times the area share there the *consistency*.
   :func:`cluster_maps` splits each class's maps (spectral clustering) so that a cue on
   part of a class shows as its own cluster with its own hotspot.
2. :func:`find_suspects`: a class is a suspect when its lift stands out from the other
   classes' (robust z-score with a floored MAD) *and* is large in absolute terms.
   Clusters do not make suspects: a handful of a class's objects that happen to sit
   together has a cluster hotspot as strong as a cue's, and pasting that window pastes
   the object, so even the transplant test would "confirm" it.
3. :func:`transplant_test`: paste the hotspot's pixels from the class's images onto other
   classes' images and count flips towards the class, against two controls with the same
   pairing; :func:`cover_test`: cover the hotspot in the class's own images and count the
   accuracy lost, against covering a random window.

Only the transplant's margin over *both* controls confirms a shortcut: a fragile model
flips on any pasted patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inference import eval_no_grad, predict_proba
from .statistics import t_quantile

# -- thresholds (named so the report can state them) -------------------------------------

#: Window side as a fraction of the image side: 6 px at 32 x 32 (a small watermark or tag).
WINDOW_FRACTION = 6 / 32
#: An image "agrees" with a hotspot when its own map puts more than this many times the
#: window's area share in the window.
CONSISTENCY_FACTOR = 3.0
#: A suspect's lift must stand this many robust standard deviations above the classes'
#: median (3.5 is Iglewicz and Hoaglin's cut-off for modified z-scores) ...
SUSPECT_Z = 3.5
#: ... and be at least this large: twice the mass an even map would put in the window.
SUSPECT_MIN_LIFT = 2.0
#: Floor on the MAD, as a fraction of the median lift: ten clean classes can have nearly
#: identical lifts, and a zero MAD would make any small excess look infinitely unusual.
MAD_FLOOR_FRACTION = 0.2
#: 1.4826 * MAD estimates the standard deviation of a normal sample.
MAD_TO_SD = 1.4826
#: Clusters: side of the pooled maps, most clusters, fewest maps per cluster on average
#: (a class with fewer than twice this many maps is one cluster).
CLUSTER_GRID = 8
MAX_CLUSTERS = 4
MIN_CLUSTER_SIZE = 5
#: Tight box: pixels of the best window holding at least this fraction of its peak.
BOX_PEAK_FRACTION = 0.5
#: Transplant / cover tests: confidence level of the paired intervals; fewest targets.
LEVEL = 0.95
MIN_TARGETS = 5
#: The hotspot must also beat each control by this many flips per target on average. A
#: t interval on 0/1 differences is too narrow when discordant pairs are rare (4 of 216,
#: all one way, already "exclude zero"); a margin of 2 points is no shortcut anyway.
MIN_FLIP_MARGIN = 0.1


# -- results -----------------------------------------------------------------------------


@dataclass
class Hotspot:
    """The best window of a mean map and how strongly the maps behind it agree.

    Boxes are ``(x0, y0, x1, y1)`` pixels with exclusive ends, at the maps' resolution.
    ``window`` is the scored ``k x k`` window; ``box`` is the part of it holding the
    mass (pixels at least ``BOX_PEAK_FRACTION`` of the window's peak), for display and
    for comparing with a known cue region.
    """

    window: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    mass: float  # share of the mean map's mass in the window
    area_share: float  # window area / image area
    lift: float  # mass / area_share: 1 = no more than an even map
    consistency: float  # share of the images whose own map puts > 3x area_share there
    n: int  # images behind the mean map (maps with positive mass)
    agreeing: list[int] = field(default_factory=list)  # their dataset indices


@dataclass
class Cluster:
    """One group of a class's maps (spectral clustering) and its own hotspot."""

    indices: list[int]  # dataset indices of the members
    share: float  # members / the class's usable maps
    hotspot: Hotspot


@dataclass
class ClassHotspots:
    """Everything the hotspot analysis says about one class."""

    label: int
    hotspot: Hotspot | None  # None when the class has no usable map
    z: float  # robust z-score of the class lift among all classes
    clusters: list[Cluster] = field(default_factory=list)
    suspect: bool = False


@dataclass
class Suspect:
    """A class whose hotspot stands out, and the window to test."""

    label: int
    window: tuple[int, int, int, int]
    sources: list[int]  # class images whose own map agrees (cut the pixels from these)
    lift: float
    z: float


@dataclass
class Interval:
    """Mean of paired differences with its two-sided interval (Student t)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def excludes_zero_above(self) -> bool:
        """True when the whole interval is above zero."""
        return self.n > 0 and math.isfinite(self.low) and self.low > 0


@dataclass
class TransplantResult:
    """Flips towards the suspect class when its hotspot is pasted onto other images.

    ``targets`` are the other classes' images not predicted as the class before; each is
    paired with one source image of the class (``sources``), one random window position
    in that source (``control_windows``, control a) and one other-class image
    (``control_others``, control b). Rates are shares of the targets.
    """

    label: int
    window: tuple[int, int, int, int]
    targets: list[int]
    sources: list[int]
    control_windows: list[tuple[int, int, int, int]]
    control_others: list[int]
    flip_rate: float
    flip_rate_random_window: float
    flip_rate_other_class: float
    vs_random_window: Interval  # hotspot flip - control (a) flip, per target
    vs_other_class: Interval  # hotspot flip - control (b) flip, per target
    confirmed: bool
    example_indices: list[int]  # dataset indices of the shown targets
    examples_before: Tensor  # [E, 3, H, W]
    examples_after: Tensor  # [E, 3, H, W] with the hotspot pasted


@dataclass
class CoverResult:
    """Accuracy of the class's own images with the hotspot covered vs a random window."""

    label: int
    window: tuple[int, int, int, int]
    indices: list[int]
    random_windows: list[tuple[int, int, int, int]]
    accuracy: float
    accuracy_hotspot_covered: float
    accuracy_random_covered: float
    drop_vs_random: Interval  # correct(random covered) - correct(hotspot covered)
    example_indices: list[int]
    examples_before: Tensor
    examples_after: Tensor


@dataclass
class DiscoveryResult:
    """The whole chain: every class's hotspots, the suspects and their tests."""

    window_size: tuple[int, int]
    classes: list[ClassHotspots]
    suspects: list[Suspect]
    transplants: dict[int, TransplantResult]
    covers: dict[int, CoverResult]

    @property
    def confirmed(self) -> list[int]:
        """Suspect classes whose transplant beat both controls."""
        return [c for c, t in self.transplants.items() if t.confirmed]


# -- statistics --------------------------------------------------------------------------


def paired_interval(diff: Tensor, level: float = LEVEL) -> Interval:
    """Student t interval for the mean of paired differences ``diff`` ``[n]``.

    For 0/1 outcomes the differences are -1, 0 or 1; the t interval on them is the usual
    paired-proportion interval with a small-sample t quantile instead of 1.96. When every
    difference is equal the interval collapses to that value (no spread, no doubt).
    """
    d = diff.detach().double().flatten().cpu()
    n = d.numel()
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    mean = float(d.mean())
    if n == 1:
        return Interval(mean, float("-inf"), float("inf"), 1, level)
    se = float(d.std(unbiased=True)) / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Interval(mean, mean - half, mean + half, n, level)


def _median_mad(values: Tensor) -> tuple[float, float]:
    """Median and median absolute deviation (both middles averaged for an even count)."""
    v = values.double().sort().values
    mid = [(v.numel() - 1) // 2, v.numel() // 2]
    med = float(v[mid].mean())
    dev = (v - med).abs().sort().values
    return med, float(dev[mid].mean())


def _robust_scale(med: float, mad: float, floor_fraction: float) -> float:
    return MAD_TO_SD * max(mad, floor_fraction * abs(med), 1e-12)


def robust_z(values: Tensor, floor_fraction: float = MAD_FLOOR_FRACTION) -> Tensor:
    """``(v - median) / (1.4826 * MAD)`` with the MAD floored at ``floor_fraction * |median|``.

    NaN entries are ignored in the median and MAD and stay NaN.
    """
    v = values.detach().double().cpu()
    ok = torch.isfinite(v)
    out = torch.full_like(v, float("nan"))
    if ok.any():
        med, mad = _median_mad(v[ok])
        out[ok] = (v[ok] - med) / _robust_scale(med, mad, floor_fraction)
    return out.float()


def smallest_flagged_lift(lifts: Tensor, z_threshold: float = SUSPECT_Z,
                          min_lift: float = SUSPECT_MIN_LIFT) -> float:
    """The lift a new class would need to be a suspect among classes with these ``lifts``.

    What a report says when nothing was found: how strong a cue it could have caught.
    """
    v = lifts.detach().double().cpu()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return float("nan")
    med, mad = _median_mad(v)
    return max(min_lift, med + z_threshold * _robust_scale(med, mad, MAD_FLOOR_FRACTION))


# -- maps and windows --------------------------------------------------------------------


def window_size(height: int, width: int, fraction: float = WINDOW_FRACTION) -> tuple[int, int]:
    """Window ``(kh, kw)`` as a fraction of the image side (at least 1 pixel, at most all)."""
    kh = min(height, max(1, round(fraction * height)))
    kw = min(width, max(1, round(fraction * width)))
    return kh, kw


def normalise_maps(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Positive part of each map ``[N, H, W]`` scaled to sum 1, and which maps were usable.

    A map with no positive mass (or with non-finite values) says nothing about where the
    model looked: it is returned as zeros and marked unusable rather than made uniform.
    """
    m = maps.detach().float().cpu()
    finite = torch.isfinite(m).flatten(1).all(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp_min(0)
    total = m.flatten(1).sum(1)
    ok = finite & (total > 0)
    out = torch.where(ok.view(-1, 1, 1), m / total.clamp_min(1e-30).view(-1, 1, 1),
                      torch.zeros_like(m))
    return out, ok


def _window_mass(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Mass of every valid window of ``maps`` ``[B, H, W]``: ``[B, H-kh+1, W-kw+1]``."""
    kh, kw = size
    return F.avg_pool2d(maps.unsqueeze(1), (kh, kw), stride=1).squeeze(1) * (kh * kw)


def _tight_box(mean_map: Tensor, window: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = window
    part = mean_map[y0:y1, x0:x1]
    peak = float(part.max())
    if peak <= 0:
        return window
    ys, xs = torch.nonzero(part >= BOX_PEAK_FRACTION * peak, as_tuple=True)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


def hotspot(norm_maps: Tensor, size: tuple[int, int], indices: Sequence[int] | None = None,
            ) -> Hotspot | None:
    """Best window of the mean of normalised maps ``[n, H, W]`` (each summing to 1).

    ``indices`` are the maps' dataset indices (for ``agreeing``); default ``0..n-1``.
    Returns None for an empty set.
    """
    n, h, w = norm_maps.shape
    if n == 0:
        return None
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    kh, kw = size
    mean_map = norm_maps.mean(0)
    scores = _window_mass(mean_map.unsqueeze(0), size)[0]
    best = int(scores.flatten().argmax())
    y0, x0 = divmod(best, scores.shape[1])
    window = (x0, y0, x0 + kw, y0 + kh)
    area_share = kh * kw / (h * w)
    mass = float(scores.flatten()[best])
    own = norm_maps[:, y0:y0 + kh, x0:x0 + kw].flatten(1).sum(1)
    agree = own > CONSISTENCY_FACTOR * area_share
    return Hotspot(
        window=window,
        box=_tight_box(mean_map, window),
        mass=mass,
        area_share=area_share,
        lift=mass / area_share,
        consistency=float(agree.float().mean()),
        n=n,
        agreeing=[idx[i] for i in torch.nonzero(agree).flatten().tolist()],
    )


# -- clustering --------------------------------------------------------------------------


def _kmeans(x: Tensor, k: int, generator: torch.Generator, restarts: int = 4,
            iters: int = 50) -> Tensor:
    """k-means with k-means++ seeding from ``generator``; the best of ``restarts`` runs."""
    n = x.shape[0]
    best_labels, best_inertia = torch.zeros(n, dtype=torch.long), float("inf")
    for _ in range(restarts):
        first = int(torch.randint(n, (1,), generator=generator))
        centres = [x[first]]
        for _ in range(1, k):
            d2 = torch.cdist(x, torch.stack(centres)).pow(2).amin(1)
            if float(d2.sum()) <= 0:
                nxt = int(torch.randint(n, (1,), generator=generator))
            else:
                nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
            centres.append(x[nxt])
        c = torch.stack(centres)
        labels = torch.cdist(x, c).argmin(1)
        for _ in range(iters):
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # empty: keep centre
            new = torch.cdist(x, c).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float((x - c[labels]).pow(2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels.clone(), inertia
    return best_labels


def cluster_maps(norm_maps: Tensor, max_clusters: int = MAX_CLUSTERS, grid: int = CLUSTER_GRID,
                 seed: int = 0) -> Tensor:
    """Spectral clustering of a class's normalised maps ``[n, H, W]``: a cluster id per map.

    Maps are pooled to ``grid x grid`` (a cue and an object are cells apart; pixel noise is
    averaged away) and *centred* on the class's mean before the cosine affinity (clamped
    at 0). Without centring the mass every map shares (diffuse background, the mean
    object) makes all maps look alike; after it, a cue on part of the class is a deviation
    its carriers share and the others lack. A k-nearest-neighbour graph (as in SpRAy) was
    tried and grouped maps by object position instead of by cue.

    The count is the largest eigengap of the normalised Laplacian among 2..``max_clusters``
    clusters; the rows of those eigenvectors, scaled to unit length (Ng, Jordan and Weiss
    2002), are grouped by seeded k-means. A class without structure is still split (into
    object positions): clusters describe, they do not flag; the lift z-score and the
    transplant test decide. Clusters are numbered by size, largest first.
    """
    n = norm_maps.shape[0]
    if n < 2 * MIN_CLUSTER_SIZE or max_clusters < 2:
        return torch.zeros(n, dtype=torch.long)
    small = F.adaptive_avg_pool2d(norm_maps.unsqueeze(1).double(), grid).flatten(1)
    small = small - small.mean(0, keepdim=True)
    unit = small / small.norm(dim=1, keepdim=True).clamp_min(1e-30)
    affinity = (unit @ unit.T).clamp_min(0)
    affinity.fill_diagonal_(0)
    degree = affinity.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-30).rsqrt(), torch.zeros_like(degree))
    laplacian = torch.eye(n, dtype=affinity.dtype) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    evals, evecs = torch.linalg.eigh(laplacian)
    top = min(max_clusters, n - 1)
    gaps = evals[2:top + 1] - evals[1:top]  # gaps[j] follows j + 2 clusters
    k = int(gaps.argmax()) + 2
    emb = evecs[:, :k]
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-30)
    labels = _kmeans(emb.float(), k, torch.Generator().manual_seed(seed))
    counts = torch.bincount(labels, minlength=k)
    order = torch.argsort(-counts, stable=True)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(k)
    return remap[labels]


# -- per-class analysis and suspects ----------------------------------------------------


def class_hotspots(maps: Tensor, labels: Tensor, num_classes: int | None = None,
                   window_fraction: float = WINDOW_FRACTION, cluster: bool = True,
                   max_clusters: int = MAX_CLUSTERS, seed: int = 0) -> list[ClassHotspots]:
    """Hotspot, robust z-score and clusters of every class, from true-class maps ``[N, H, W]``.

    The suspect fields are filled by :func:`find_suspects`.
    """
    labels = labels.detach().long().cpu()
    k = num_classes if num_classes is not None else int(labels.max()) + 1 if labels.numel() else 0
    norm, ok = normalise_maps(maps)
    size = window_size(*norm.shape[-2:], window_fraction)
    out = []
    for c in range(k):
        idx = torch.nonzero((labels == c) & ok).flatten()
        hs = hotspot(norm[idx], size, idx.tolist())
        clusters: list[Cluster] = []
        if hs is not None and cluster:
            ids = cluster_maps(norm[idx], max_clusters=max_clusters, seed=seed + c)
            for j in range(int(ids.max()) + 1 if ids.numel() else 0):
                members = idx[ids == j]
                chs = hotspot(norm[members], size, members.tolist())
                if chs is not None:
                    clusters.append(Cluster(members.tolist(), members.numel() / idx.numel(), chs))
        out.append(ClassHotspots(label=c, hotspot=hs, z=float("nan"), clusters=clusters))
    lifts = torch.tensor([h.hotspot.lift if h.hotspot else float("nan") for h in out])
    for h, z in zip(out, robust_z(lifts).tolist(), strict=True):
        h.z = z
    return out


def find_suspects(classes: list[ClassHotspots], z_threshold: float = SUSPECT_Z,
                  min_lift: float = SUSPECT_MIN_LIFT) -> list[Suspect]:
    """Mark and return the suspect classes of :func:`class_hotspots`' result.

    A class is a suspect when its lift has a robust z-score of at least ``z_threshold``
    among the classes *and* is at least ``min_lift``: standing out from the others is the
    evidence, the absolute floor keeps a uniformly flat set of classes from flagging its
    least flat member. Fewer than 3 classes with maps give no suspects (no spread to
    compare with).
    """
    usable = [h for h in classes if h.hotspot is not None]
    suspects = []
    for h in classes:
        h.suspect = (len(usable) >= 3 and h.hotspot is not None and h.z >= z_threshold
                     and h.hotspot.lift >= min_lift)
        if h.suspect and h.hotspot is not None:
            suspects.append(Suspect(h.label, h.hotspot.window, h.hotspot.agreeing,
                                    h.hotspot.lift, h.z))
    return suspects


# -- model plumbing ----------------------------------------------------------------------


def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted classes ``[N]`` (long, CPU), batched, in eval mode under ``no_grad``."""
    if len(images) == 0:
        return torch.empty(0, dtype=torch.long)
    return predict_proba(model, images, batch_size).argmax(-1).cpu()


def _random_windows(count: int, size: tuple[int, int], image: tuple[int, int],
                    avoid: tuple[int, int, int, int], generator: torch.Generator,
                    ) -> list[tuple[int, int, int, int]]:
    """``count`` random windows of ``size`` inside ``image`` that do not touch ``avoid``.

    When the window is too large to miss ``avoid`` anywhere, any position but ``avoid``'s
    own is allowed.
    """
    kh, kw = size
    h, w = image
    ys = torch.arange(h - kh + 1).view(-1, 1).expand(-1, w - kw + 1).flatten()
    xs = torch.arange(w - kw + 1).view(1, -1).expand(h - kh + 1, -1).flatten()
    ax0, ay0, ax1, ay1 = avoid
    apart = (xs + kw <= ax0) | (xs >= ax1) | (ys + kh <= ay0) | (ys >= ay1)
    if not apart.any():
        apart = (xs != ax0) | (ys != ay0)
    if not apart.any():  # the window is the whole image: nowhere else to go
        apart = torch.ones_like(apart)
    pool = torch.nonzero(apart).flatten()
    pick = pool[torch.randint(pool.numel(), (count,), generator=generator)]
    return [(int(xs[i]), int(ys[i]), int(xs[i]) + kw, int(ys[i]) + kh) for i in pick]


def _paste(targets: Tensor, sources: Tensor, src_windows: Sequence[tuple[int, int, int, int]],
           dst: tuple[int, int, int, int]) -> Tensor:
    """Copy each source's window into the same-size ``dst`` window of its target."""
    out = targets.clone()
    x0, y0, x1, y1 = dst
    for i, (sx0, sy0, sx1, sy1) in enumerate(src_windows):
        out[i, :, y0:y1, x0:x1] = sources[i, :, sy0:sy1, sx0:sx1]
    return out


def _examples(indices: Tensor, before: Tensor, after: Tensor, prefer: Tensor,
              count: int) -> tuple[list[int], Tensor, Tensor]:
    """Up to ``count`` examples, those where ``prefer`` is True first (flips, losses)."""
    order = torch.argsort((~prefer).long(), stable=True)[:count]
    return indices[order].tolist(), before[order].clone(), after[order].clone()


# -- confirmation ------------------------------------------------------------------------


def transplant_test(model: nn.Module, images: Tensor, labels: Tensor, label: int,
                    window: tuple[int, int, int, int], sources: Sequence[int] | None = None,
                    seed: int = 0, batch_size: int = 256, max_targets: int | None = 512,
                    level: float = LEVEL, num_examples: int = 8) -> TransplantResult:
    """Paste class ``label``'s hotspot ``window`` onto other classes' images; count flips.

    Each target (an image of another class not predicted ``label`` before) gets the window
    from one source image of the class (``sources``, default all its images), and two
    controls with the same pairing: (a) a same-size window from a random position of the
    same source that does not touch the hotspot, pasted at the same place; (b) the same
    window of another image of another class. Confirmed when the hotspot's flips beat both
    controls: the lower end of each paired t interval (``level``) is above zero and the
    mean margin is at least ``MIN_FLIP_MARGIN``.
    """
    labels = labels.detach().long().cpu()
    images = images.detach()
    g = torch.Generator().manual_seed(seed)
    own = torch.nonzero(labels == label).flatten()
    src_pool = torch.tensor(list(sources), dtype=torch.long) if sources else own
    if src_pool.numel() == 0:
        src_pool = own
    others = torch.nonzero(labels != label).flatten()
    pred0 = predict(model, images[others], batch_size)
    targets = others[pred0 != label]
    if max_targets is not None and targets.numel() > max_targets:
        targets = targets[torch.randperm(targets.numel(), generator=g)[:max_targets]].sort().values
    n = targets.numel()
    size = (window[3] - window[1], window[2] - window[0])
    h, w = images.shape[-2:]
    empty = images[:0].clone()
    if n == 0 or src_pool.numel() == 0 or others.numel() < 2:
        nan_iv = paired_interval(torch.empty(0), level)
        return TransplantResult(label, window, targets.tolist(), [], [], [], float("nan"),
                                float("nan"), float("nan"), nan_iv, nan_iv, False, [], empty,
                                empty)
    src = src_pool[torch.randint(src_pool.numel(), (n,), generator=g)]
    ctrl_windows = _random_windows(n, size, (h, w), window, g)
    # Control (b): another other-class image, never the target itself (that would paste
    # its own pixels back).
    pos = torch.searchsorted(others, targets)
    shift = torch.randint(1, others.numel(), (n,), generator=g)
    ctrl_other = others[(pos + shift) % others.numel()]
    base = images[targets]
    pasted = _paste(base, images[src], [window] * n, window)
    ctrl_a = _paste(base, images[src], ctrl_windows, window)
    ctrl_b = _paste(base, images[ctrl_other], [window] * n, window)
    preds = predict(model, torch.cat([pasted, ctrl_a, ctrl_b]), batch_size)
    flip, flip_a, flip_b = ((p == label).float() for p in preds.split(n))
    iv_a = paired_interval(flip - flip_a, level)
    iv_b = paired_interval(flip - flip_b, level)
    confirmed = n >= MIN_TARGETS and all(
        iv.excludes_zero_above and iv.mean >= MIN_FLIP_MARGIN for iv in (iv_a, iv_b))
    ex_idx, ex_before, ex_after = _examples(targets, base, pasted, flip.bool(), num_examples)
    return TransplantResult(
        label=label, window=window, targets=targets.tolist(), sources=src.tolist(),
        control_windows=ctrl_windows, control_others=ctrl_other.tolist(),
        flip_rate=float(flip.mean()), flip_rate_random_window=float(flip_a.mean()),
        flip_rate_other_class=float(flip_b.mean()), vs_random_window=iv_a, vs_other_class=iv_b,
        confirmed=confirmed, example_indices=ex_idx, examples_before=ex_before,
        examples_after=ex_after,
    )


def cover_test(model: nn.Module, images: Tensor, labels: Tensor, label: int,
               window: tuple[int, int, int, int], fill: float | Tensor = 0.0, seed: int = 0,
               batch_size: int = 256, level: float = LEVEL,
               num_examples: int = 8) -> CoverResult:
    """Cover ``window`` in class ``label``'s images with ``fill``; accuracy lost vs a random window.

    ``fill`` is a value in the model's input space (0 = the dataset mean for normalised
    images) or a tensor broadcastable to ``[3, kh, kw]`` (e.g. per-channel means).
    Each image also gets one random same-size window covered (not touching the hotspot);
    ``drop_vs_random`` is the paired interval of correct(random) - correct(hotspot).
    """
    labels = labels.detach().long().cpu()
    g = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(labels == label).flatten()
    n = idx.numel()
    x0, y0, x1, y1 = window
    size = (y1 - y0, x1 - x0)
    base = images.detach()[idx]
    rand_windows = _random_windows(n, size, tuple(base.shape[-2:]), window, g)
    covered = base.clone()
    covered[:, :, y0:y1, x0:x1] = torch.as_tensor(fill, dtype=base.dtype, device=base.device)
    rand_covered = base.clone()
    for i, (rx0, ry0, rx1, ry1) in enumerate(rand_windows):
        rand_covered[i, :, ry0:ry1, rx0:rx1] = torch.as_tensor(fill, dtype=base.dtype,
                                                                 device=base.device)
    if n == 0:
        nan = float("nan")
        return CoverResult(label, window, [], [], nan, nan, nan,
                           paired_interval(torch.empty(0), level), [], base, base)
    preds = predict(model, torch.cat([base, covered, rand_covered]), batch_size)
    ok0, ok1, ok2 = ((p == label).float() for p in preds.split(n))
    lost = ok0.bool() & ~ok1.bool()
    ex_idx, ex_before, ex_after = _examples(idx, base, covered, lost, num_examples)
    return CoverResult(
        label=label, window=window, indices=idx.tolist(), random_windows=rand_windows,
        accuracy=float(ok0.mean()), accuracy_hotspot_covered=float(ok1.mean()),
        accuracy_random_covered=float(ok2.mean()),
        drop_vs_random=paired_interval(ok2 - ok1, level),
        example_indices=ex_idx, examples_before=ex_before, examples_after=ex_after,
    )


def discover(model: nn.Module, images: Tensor, labels: Tensor, maps: Tensor,
             num_classes: int | None = None, window_fraction: float = WINDOW_FRACTION,
             fill: float | Tensor = 0.0, cluster: bool = True, seed: int = 0,
             batch_size: int = 256, z_threshold: float = SUSPECT_Z) -> DiscoveryResult:
    """Hotspots for every class -> suspects -> transplant and cover tests for each suspect.

    ``maps`` ``[N, H, W]`` are the true-class maps of ``images`` ``[N, 3, H, W]`` (upsampled
    to the images' size if they are smaller). The window side is ``window_fraction`` of
    the image side. ``z_threshold`` can be lower than the monitor's (which has no
    experiment to confirm with): here every suspect must still pass the transplant test.
    """
    if maps.shape[-2:] != images.shape[-2:]:
        maps = F.interpolate(maps.detach().float().unsqueeze(1), size=tuple(images.shape[-2:]),
                             mode="bilinear", align_corners=False).squeeze(1)
    if num_classes is None:
        with eval_no_grad(model):
            device = next((p.device for p in model.parameters()), images.device)
            num_classes = int(model(images[:1].to(device)).shape[-1])
    classes = class_hotspots(maps, labels, num_classes, window_fraction, cluster, seed=seed)
    suspects = find_suspects(classes, z_threshold)
    transplants, covers = {}, {}
    for s in suspects:
        transplants[s.label] = transplant_test(model, images, labels, s.label, s.window,
                                               s.sources, seed=seed, batch_size=batch_size)
        covers[s.label] = cover_test(model, images, labels, s.label, s.window, fill=fill,
                                     seed=seed, batch_size=batch_size)
    return DiscoveryResult(window_size(*images.shape[-2:], window_fraction), classes, suspects,
                           transplants, covers)
