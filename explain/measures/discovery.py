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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .confirmation import (  # noqa: F401  (re-exported: discovery's public API)
    LEVEL,
    MIN_FLIP_MARGIN,
    MIN_TARGETS,
    CoverResult,
    Interval,
    TransplantResult,
    cover_test,
    paired_interval,
    predict,
    transplant_test,
)
from .inference import eval_no_grad

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


#: Recurring peaks: a class's images whose own best window of this side (1/8 of the image
#: side, 4 px at 32) sits at one place, within half a window. A cue on part of a class
#: puts most of its carriers' peaks on it, and map clustering mixes them with other
#: images (the benchmark's glyph on half of horse: 38-41 of the 50 carriers peak on it,
#: 0-4 of the 50 others and 2% of other classes' images; the best map cluster held 41
#: carriers of 50 members, or 17 of 26).
PEAK_WINDOW_FRACTION = 1 / 8
#: The group is worth a test when it holds at least this share of the class's usable maps
#: and this many times the share of other classes' maps peaking at the same place (on six
#: clean bench_small models of real CIFAR-10, 100 images a class, the best place of any
#: class held 10-19% of it against 3-7% of the other classes; the glyph's 41-44% against
#: 1-2%; with 30 images a class, 6 random peaks (20%) near one place of 30 happen).
PEAK_GROUP_MIN_SHARE = 0.25
PEAK_GROUP_MIN_RATIO = 3.0


def peak_group(norm_maps: Tensor, usable: Tensor, labels: Tensor, label: int,
               window_fraction: float = PEAK_WINDOW_FRACTION) -> Cluster | None:
    """The images of class ``label`` whose own peaks recur at one place, as a
    :class:`Cluster` (indices into ``norm_maps``), or None.

    Each usable map's peak is its best small window; every place where one of the class's
    peaks sits is scored by the share of the class's peaks near it (within half a window)
    minus the share of other classes' peaks near it, and the best place's group is kept
    when it passes ``PEAK_GROUP_MIN_SHARE``, ``PEAK_GROUP_MIN_RATIO`` and
    ``MIN_CLUSTER_SIZE``. A detector, not evidence: the transplant of the group's box
    decides (:func:`.tracking.search_class`)."""
    labels = labels.detach().long().cpu()
    usable = usable.detach().bool().cpu()
    own = torch.nonzero((labels == label) & usable).flatten()
    other = torch.nonzero((labels != label) & usable).flatten()
    if own.numel() < MIN_CLUSTER_SIZE or other.numel() == 0:
        return None
    h, w = norm_maps.shape[-2:]
    kh, kw = window_size(h, w, window_fraction)
    best = _window_mass(norm_maps.float(), (kh, kw)).flatten(1).argmax(1)
    ys, xs = best // (w - kw + 1), best % (w - kw + 1)
    near = ((ys[own, None] - ys[None, :]).abs() <= max(1, kh // 2)) & (
        (xs[own, None] - xs[None, :]).abs() <= max(1, kw // 2))  # [own, all]
    own_share = near[:, own].float().mean(1)
    other_share = near[:, other].float().mean(1)
    place = int((own_share - other_share).argmax())
    share, elsewhere = float(own_share[place]), float(other_share[place])
    members = own[near[place, own]]
    if (share < PEAK_GROUP_MIN_SHARE or share < PEAK_GROUP_MIN_RATIO * elsewhere
            or members.numel() < MIN_CLUSTER_SIZE):
        return None
    spot = hotspot(norm_maps[members], window_size(h, w), members.tolist())
    assert spot is not None  # members is not empty
    return Cluster(members.tolist(), share, spot)


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
