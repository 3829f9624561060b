"""Causal tests of a suspected shortcut, shared by the monitor (every epoch) and the audit.

A map says where a model looks; only an experiment says what it relies on. Every test
here changes other classes' images towards one class ``label`` and counts how many the
model then calls ``label`` ("flips"), against controls that make the same kind of change
without the suspected cue, paired image by image:

* :func:`box_test`: a box cut from the class's images, pasted at the same place (a patch,
  a tag, a watermark at a fixed place). Controls: a same-size window from elsewhere in the
  same source, pasted at the box (``random_window``); the box cut from another class's
  image (``other_class``). ``others_of_class`` adds two controls for a cluster of the
  class, from the class's images *outside* the cluster: the same box cut from them
  (``rest_of_class``: an object cluster pastes object pixels either way; a cue cluster
  does not), and, with maps, each one's own most salient window of the box's size pasted
  at the box (``rest_of_class_salient``: a cluster of images whose objects merely sit in
  the box has the same object evidence elsewhere in the rest of the class).
* :func:`moving_test`: each source's *own* hotspot window, pasted at the same place of the
  target: a cue that changes place needs no shared box. Same two controls per source.
* :func:`colour_test`: no place at all (a tint, a filter): each target's per-channel mean
  and standard deviation are replaced by the class's; control: the same move with a third
  class's statistics. A class's natural colours move it too (frog is green): this test
  measures colour *reliance* and confirms no shortcut on its own.
* :func:`filter_test`: a filter laid over every image of a class (a tint, a cast, a
  contrast change): each target's per-channel range (2nd to 98th percentile) is given the
  range of one of the class's images; control: the range of a third class's image. Nearly
  every photograph spans dark to bright whatever its class, so natural classes hardly move
  it; a filter does. It confirms only above a higher bar (``FILTER_MIN_LOW``).

A test is :attr:`CausalTest.confirmed` when every interval of (flip - control) lies
above zero (paired per target and clustered by the source image each target was pasted
from: the question is whether the *class's* images carry the cue, and a few sources are
pasted onto many targets; see :func:`.confirmation.clustered_interval`) and the smallest
mean margin is at least ``MIN_FLIP_MARGIN``;
:attr:`CausalTest.gone` when the margin over the strongest control is below that and its
interval reaches zero. :mod:`.box_search` picks a box by this evidence among windows of
several sizes. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .confirmation import (
    LEVEL,
    MIN_FLIP_MARGIN,
    MIN_TARGETS,
    Interval,
    _paste,
    _random_windows,
    clustered_interval,
    paired_interval,
    predict,
)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends), pixels

#: Most targets a test pastes onto, and how many a screen uses: a cue that flips 30% of the
#: targets shows the 3 flips the screen needs in 24 with probability 0.97. A ResNet-18 at
#: 32 x 32 predicts about 100 images a second on 2 CPU cores: these counts set the cost.
MAX_TARGETS = 64
SCREEN_TARGETS = 24
#: A screen passes when the flips, and their margin over each control, reach this on its
#: SCREEN_TARGETS targets (the full test then decides, with MIN_FLIP_MARGIN and its interval).
SCREEN_MARGIN = MIN_FLIP_MARGIN


@dataclass
class CausalTest:
    """One experiment on class ``label``: flips towards it against paired controls."""

    label: int
    kind: str  # box | moving | colour | filter | cluster
    box: Box | None  # where a box or cluster test pasted; None for moving and colour
    size: tuple[int, int] | None  # window (h, w) of box, moving and cluster tests
    n: int  # targets: other classes' images not predicted ``label`` before
    flip_rate: float
    controls: dict[str, float] = field(default_factory=dict)  # control -> its flip rate
    intervals: dict[str, Interval] = field(default_factory=dict)  # control -> flip - control
    share: float = 1.0  # cluster tests: the cluster's share of the class
    #: Cluster tests of a group of images whose own peaks recur at one place
    #: (:func:`.discovery.peak_group`): the explanation method of those maps ("" when the
    #: caller did not name it); None for a cluster of maps and for every other test.
    peaks: str | None = None
    screened: bool = False  # controls skipped: the flips alone were under MIN_FLIP_MARGIN
    min_low: float = 0.0  # confirmed only when every interval's low bound is above this
    #: Classes whose predictions count as flips too: a cue ``label`` shares with them (one
    #: patch on two classes sends a pasted image to either); empty for a class's own cue.
    also: tuple[int, ...] = ()
    #: With ``also``: the share of targets that turn into ``label`` itself, and the least
    #: of it a confirmation needs (less for a shared cue already followed: its split
    #: between the classes flickers from epoch to epoch while the cue stays).
    own_rate: float | None = None
    own_min: float = MIN_FLIP_MARGIN

    @property
    def margin(self) -> Interval:
        """The paired interval over the strongest control (the smallest mean margin)."""
        if not self.intervals:
            nan = float("nan")
            return Interval(nan, nan, nan, 0)
        return min(self.intervals.values(), key=lambda iv: iv.mean)

    @property
    def strongest_control(self) -> float:
        return max(self.controls.values(), default=float("nan"))

    @property
    def confirmed(self) -> bool:
        """Every interval above zero (above ``min_low``) and the smallest mean margin >=
        ``MIN_FLIP_MARGIN``."""
        return (self.n >= MIN_TARGETS and bool(self.intervals) and all(
            iv.excludes_zero_above and iv.low > self.min_low and iv.mean >= MIN_FLIP_MARGIN
            for iv in self.intervals.values())
            # A shared cue must also send images to the class itself, not only to the
            # class it shares the cue with.
            and (self.own_rate is None or self.own_rate >= self.own_min))

    @property
    def gone(self) -> bool:
        """At the controls' level: the margin is small and its interval reaches zero."""
        m = self.margin
        if self.screened:
            return self.flip_rate < MIN_FLIP_MARGIN
        return self.n >= MIN_TARGETS and m.mean < MIN_FLIP_MARGIN and not m.excludes_zero_above

    def describe(self, names: Sequence[str]) -> str:
        """One clause for a warning or a table: flips against the controls."""
        ctrl = " / ".join(f"{v:.0%}" for v in self.controls.values()) or "not run"
        m = self.margin
        tail = (f", margin {m.mean:+.2f} ({interval_text(m)})" if self.intervals else "")
        into = " or ".join(names[c] for c in (self.label, *self.also))
        own = (f", {self.own_rate:.0%} into {names[self.label]}"
               if self.own_rate is not None else "")
        return (f"{self.flip_rate:.0%} of {self.n} other-class images turn into "
                f"{into} (controls {ctrl}{tail}{own})")


def interval_text(m: Interval, with_level: bool = True) -> str:
    """``95% [low, high]`` (without ``95% `` for a table whose header says it), or why
    there is none (a test pasted from one source image: the interval is unbounded)."""
    if math.isfinite(m.low) and math.isfinite(m.high):
        return ("95% " if with_level else "") + f"[{m.low:+.2f}, {m.high:+.2f}]"
    return "one source image: no interval"


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def overlap_share(a: Box, b: Box) -> float:
    """The share of the smaller box that lies inside the other (1: one holds the other)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def box_label(box: Box | None) -> str:
    """``x 0-8, y 0-8``: how a box reads in a sentence."""
    if box is None:
        return "no fixed place"
    x0, y0, x1, y1 = box
    return f"x {x0}-{x1}, y {y0}-{y1}"


def place_words(kind: str, box: Box | None) -> str:
    """Where a test's cue is, in a sentence: its box, or what stands for a place in the
    tests without one (one wording for the monitor's lines and the audit's)."""
    if box is not None:
        return box_label(box)
    return {"moving": "each image's own hotspot",
            "filter": "the range of its images' channels",
            "colour": "its colour statistics"}.get(kind, "no fixed place")


# -- shared plumbing ----------------------------------------------------------------------


def collapsed(preds: Tensor) -> bool:
    """True when every image is predicted as one class: nothing can flip *towards* a class
    in a meaningful way, and a hotspot then says nothing (a broken epoch)."""
    return preds.numel() > 0 and bool((preds == preds[0]).all())


def _targets(labels: Tensor, preds: Tensor, label: int, seed: int,
             max_targets: int = MAX_TARGETS, also: Sequence[int] = ()) -> Tensor:
    """Other classes' images not predicted ``label`` already (a seeded subset if many);
    with ``also``, neither of those classes nor predicted as one of them."""
    group = torch.tensor([label, *also])
    t = torch.nonzero(~torch.isin(labels, group) & ~torch.isin(preds, group)).flatten()
    if t.numel() > max_targets:
        g = torch.Generator().manual_seed(seed)
        t = t[torch.randperm(t.numel(), generator=g)[:max_targets]].sort().values
    return t


def _flips(model: nn.Module, label: int, variants: dict[str, Tensor], batch_size: int,
           also: Sequence[int] = ()) -> dict[str, Tensor]:
    """0/1 flips towards ``label`` (or one of ``also``) of each variant batch, all
    predicted in one pass; with ``also``, ``cue_own`` holds the cue's flips towards
    ``label`` alone."""
    names = list(variants)
    n = len(variants[names[0]])
    preds = predict(model, torch.cat([variants[k] for k in names]), batch_size)
    group = torch.tensor([label, *also])
    out = {k: torch.isin(p, group).float() for k, p in zip(names, preds.split(n), strict=True)}
    if also and "cue" in variants:
        out["cue_own"] = (preds[names.index("cue") * n:][:n] == label).float()
    return out


def _result(label: int, kind: str, box: Box | None, size: tuple[int, int] | None,
            flips: dict[str, Tensor], level: float, share: float = 1.0,
            sources: Tensor | None = None, also: Sequence[int] = ()) -> CausalTest:
    """``sources``: the source image of each target; the intervals are then clustered by
    source (:func:`.confirmation.clustered_interval`)."""
    main = flips.pop("cue")
    own = flips.pop("cue_own", None)

    def interval(diff: Tensor) -> Interval:
        return (paired_interval(diff, level) if sources is None
                else clustered_interval(diff, sources, level))

    return CausalTest(
        label=label, kind=kind, box=box, size=size, n=int(main.numel()),
        flip_rate=float(main.mean()) if main.numel() else float("nan"),
        controls={k: float(v.mean()) for k, v in flips.items()},
        intervals={k: interval(main - v) for k, v in flips.items()},
        share=share, also=tuple(also),
        own_rate=float(own.mean()) if own is not None and own.numel() else None)


def _empty(label: int, kind: str, box: Box | None, size: tuple[int, int] | None,
           share: float = 1.0) -> CausalTest:
    return CausalTest(label, kind, box, size, 0, float("nan"), share=share)


def _other_images(labels: Tensor, targets: Tensor, exclude: Sequence[int],
                  g: torch.Generator) -> Tensor:
    """For each target, a random image of a class that is neither the target's nor in
    ``exclude`` (falls back to any image that is not the target itself)."""
    out = []
    for t in targets.tolist():
        bad = torch.tensor([int(labels[t])] + [int(c) for c in exclude])
        pool = torch.nonzero(~torch.isin(labels, bad)).flatten()
        if pool.numel() == 0:
            pool = torch.nonzero(torch.arange(labels.numel()) != t).flatten()
        out.append(int(pool[torch.randint(pool.numel(), (1,), generator=g)]))
    return torch.tensor(out, dtype=torch.long)


# -- the tests ----------------------------------------------------------------------------


#: The window-from-elsewhere control may overlap the tested box up to this IoU. Zero: any
#: overlap can carry part of a cue (a quarter of a magenta square still reads as the
#: square: a briefly trained model flipped 92% of images with such "controls"); objects
#: that merely sit in the box's region are handled by choosing the box on half of the
#: class's images and pasting from the other half.
ELSEWHERE_MAX_IOU = 0.0


def salient_elsewhere(norm_maps: Tensor, avoid: Sequence[Box], size: tuple[int, int],
                      ) -> list[Box]:
    """Each map's best ``size`` window away from its ``avoid`` box (IoU at most
    ``ELSEWHERE_MAX_IOU``): where the image holds the most evidence besides the tested box
    (its object, for a class image)."""
    kh, kw = size
    mass = F.avg_pool2d(norm_maps.unsqueeze(1).float(), (kh, kw), stride=1).squeeze(1)
    hh, ww = mass.shape[-2:]
    ys = torch.arange(hh).view(-1, 1)
    xs = torch.arange(ww).view(1, -1)
    out = []
    for m, (ax0, ay0, ax1, ay1) in zip(mass, avoid, strict=True):
        iw = (torch.minimum(xs + kw, torch.tensor(ax1)) - torch.maximum(xs, torch.tensor(ax0)))
        ih = (torch.minimum(ys + kh, torch.tensor(ay1)) - torch.maximum(ys, torch.tensor(ay0)))
        inter = iw.clamp_min(0) * ih.clamp_min(0)
        union = kh * kw + (ax1 - ax0) * (ay1 - ay0) - inter
        apart = inter <= ELSEWHERE_MAX_IOU * union
        if not apart.any():
            apart = (xs != ax0) | (ys != ay0)
        best = int(torch.where(apart, m, torch.full_like(m, -1.0)).flatten().argmax())
        y0, x0 = divmod(best, ww)
        out.append((x0, y0, x0 + kw, y0 + kh))
    return out


def box_test(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor, label: int,
             box: Box, sources: Sequence[int] | None = None,
             others_of_class: Sequence[int] | None = None, seed: int = 0,
             batch_size: int = 256, screen: bool = False, level: float = LEVEL,
             kind: str = "box", share: float = 1.0,
             norm_maps: Tensor | None = None, stop: str = "full",
             also: Sequence[int] = ()) -> CausalTest:
    """Paste ``box`` cut from class ``label``'s images (``sources``: default all of them)
    onto the same place of other classes' images; flips against the controls.

    ``also``: classes that share the cue (a flip towards one of them counts; their images
    are neither targets nor the other-class control's sources).

    ``preds`` are the model's predictions of ``images`` (the targets are those not
    already ``label``). ``screen``: first paste onto ``SCREEN_TARGETS`` targets alone and
    stop there when the flips stay under ``MIN_FLIP_MARGIN`` (no margin can reach it).
    With ``norm_maps`` (every image's true-class map at the images' size) the
    window-from-elsewhere control is each source's *most salient* window away from the
    box (``salient_elsewhere``) instead of a random one: a class whose objects merely sit
    there often flips as much with its objects' best window from elsewhere, a cue does not.
    """
    labels, preds = labels.long().cpu(), preds.long().cpu()
    size = (box[3] - box[1], box[2] - box[0])
    own = torch.nonzero(labels == label).flatten()
    pool = torch.as_tensor(list(sources), dtype=torch.long) if sources else own

    def make(targets: Tensor, g: torch.Generator) -> Made:
        n = targets.numel()
        src = pool[torch.randint(pool.numel(), (n,), generator=g)]
        base = images[targets]

        def controls() -> dict[str, Tensor]:
            if norm_maps is not None:
                windows = salient_elsewhere(norm_maps[src], [box] * n, size)
                elsewhere = "salient_elsewhere"
            else:
                windows = _random_windows(n, size, tuple(images.shape[-2:]), box, g)
                elsewhere = "random_window"
            out = {
                elsewhere: _paste(base, images[src], windows, box),
                "other_class": _paste(
                    base, images[_other_images(labels, targets, [label, *also], g)],
                    [box] * n, box),
            }
            if others_of_class:
                rest = torch.as_tensor(list(others_of_class), dtype=torch.long)
                pick = rest[torch.randint(rest.numel(), (n,), generator=g)]
                out["rest_of_class"] = _paste(base, images[pick], [box] * n, box)
                if norm_maps is not None:
                    # The class's other images' own best window, wherever it sits: a
                    # cluster of images whose objects merely sit in the box pastes object
                    # evidence, and so does this control; a cue cluster's box does more.
                    wins = image_hotspots(norm_maps[pick], size)
                    out["rest_of_class_salient"] = _paste(base, images[pick], wins, box)
            return out

        return _paste(base, images[src], [box] * n, box), controls, src

    if pool.numel() == 0:
        return _empty(label, kind, box, size, share)
    return _drive(model, labels, preds, label, kind, box, size, make, seed, batch_size,
                  screen, level, share, stop, also)


Controls = Callable[[], dict[str, Tensor]]
#: What a test's ``make`` returns: the changed targets, their controls (built on demand),
#: and each target's source image (None when every target gets the same change).
Made = tuple[Tensor, Controls, Tensor | None]


def _drive(model: nn.Module, labels: Tensor, preds: Tensor, label: int, kind: str,
           box: Box | None, size: tuple[int, int] | None,
           make: Callable[[Tensor, torch.Generator], Made], seed: int,
           batch_size: int, screen: bool, level: float, share: float = 1.0,
           stop: str = "full", also: Sequence[int] = ()) -> CausalTest:
    """Run a test built by ``make(targets, generator) -> (changed images, controls,
    sources)``:
    screened on a seeded subset of the targets first when ``screen``, then in full.
    ``stop``: ``"flips"`` returns the screen's flips alone (no controls), ``"screen"`` the
    screen with its controls, ``"full"`` goes on to the full test when the screen passes."""
    targets = _targets(labels, preds, label, seed, also=also)
    if targets.numel() == 0:
        return _empty(label, kind, box, size, share)
    if screen:
        # The screen: the flips on a few targets, then the margin over the controls on the
        # same few; the full test runs only when both reach SCREEN_MARGIN.
        sub = _subset(targets, SCREEN_TARGETS, seed)
        cue, controls, src = make(sub, torch.Generator().manual_seed(seed))
        flips = _flips(model, label, {"cue": cue}, batch_size, also)
        passed = float(flips["cue"].mean()) >= SCREEN_MARGIN
        if passed and stop != "flips":
            flips.update(_flips(model, label, controls(), batch_size, also))
            main = flips["cue"]
            passed = all(float((main - v).mean()) >= SCREEN_MARGIN
                         for k, v in flips.items() if k != "cue")
        if not passed or stop != "full":
            out = _result(label, kind, box, size, flips, level, share, src, also)
            out.screened = not passed
            return out
    cue, controls, src = make(targets, torch.Generator().manual_seed(seed))
    flips = _flips(model, label, {"cue": cue, **controls()}, batch_size, also)
    return _result(label, kind, box, size, flips, level, share, src, also)


def _subset(targets: Tensor, count: int, seed: int) -> Tensor:
    if targets.numel() <= count:
        return targets
    g = torch.Generator().manual_seed(seed + 1)
    return targets[torch.randperm(targets.numel(), generator=g)[:count]].sort().values


def image_hotspots(norm_maps: Tensor, size: tuple[int, int]) -> list[Box]:
    """Each map's own best ``size`` window (maps ``[N, H, W]`` at the images' size)."""
    kh, kw = size
    mass = F.avg_pool2d(norm_maps.unsqueeze(1).float(), (kh, kw), stride=1).squeeze(1)
    best = mass.flatten(1).argmax(1)
    width = mass.shape[-1]
    return [(int(b) % width, int(b) // width, int(b) % width + kw, int(b) // width + kh)
            for b in best]


def moving_test(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor, label: int,
                windows: dict[int, Box], seed: int = 0, batch_size: int = 256,
                screen: bool = False, level: float = LEVEL,
                norm_maps: Tensor | None = None) -> CausalTest:
    """Paste each source's own hotspot window (``windows``: image index -> box, the class's
    images) at the same place of a target; flips against the same two controls (with
    ``norm_maps``, the source's most salient window elsewhere, as in :func:`box_test`)."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    sources = sorted(windows)
    first = windows[sources[0]] if sources else (0, 0, 1, 1)
    size = (first[3] - first[1], first[2] - first[0])
    if not sources:
        return _empty(label, "moving", None, size)
    pool = torch.tensor(sources, dtype=torch.long)

    def make(targets: Tensor, g: torch.Generator) -> Made:
        n = targets.numel()
        src = pool[torch.randint(pool.numel(), (n,), generator=g)]
        wins = [windows[int(s)] for s in src]
        base = images[targets]

        def controls() -> dict[str, Tensor]:
            if norm_maps is not None:
                elsewhere = salient_elsewhere(norm_maps[src], wins, size)
                name = "salient_elsewhere"
            else:
                hw = tuple(images.shape[-2:])
                elsewhere = [_random_windows(1, size, hw, w, g)[0] for w in wins]
                name = "random_window"
            other = images[_other_images(labels, targets, [label], g)]
            return {name: _paste_each(base, images[src], elsewhere, wins),
                    "other_class": _paste_each(base, other, wins, wins)}

        return _paste_each(base, images[src], wins, wins), controls, src

    return _drive(model, labels, preds, label, "moving", None, size, make, seed, batch_size,
                  screen, level)


def _paste_each(targets: Tensor, sources: Tensor, src: Sequence[Box], dst: Sequence[Box],
                ) -> Tensor:
    """Source ``i``'s window ``src[i]`` into target ``i`` at ``dst[i]`` (same sizes)."""
    out = targets.clone()
    for i, ((sx0, sy0, sx1, sy1), (dx0, dy0, dx1, dy1)) in enumerate(zip(src, dst, strict=True)):
        out[i, :, dy0:dy1, dx0:dx1] = sources[i, :, sy0:sy1, sx0:sx1]
    return out


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    x = images.float().flatten(2)
    return x.mean(-1), x.std(-1).clamp_min(1e-6)


def colour_test(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor, label: int,
                seed: int = 0, batch_size: int = 256, screen: bool = False,
                level: float = LEVEL) -> CausalTest:
    """Give other classes' images the colour statistics of class ``label``: each target's
    per-channel mean and standard deviation (in the model's input space) are replaced by
    the class's average ones. Control (``other_class_colour``): the same move with the
    average statistics of a third class, drawn per target."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    present = torch.unique(labels).tolist()
    if label not in present or len(present) < 3:
        return _empty(label, "colour", None, None)
    mean, std = _channel_stats(images)
    cls_mean = {c: mean[labels == c].mean(0) for c in present}
    cls_std = {c: std[labels == c].mean(0) for c in present}

    def make(targets: Tensor, g: torch.Generator) -> Made:
        n = targets.numel()
        unit = ((images[targets].float() - mean[targets][..., None, None])
                / std[targets][..., None, None])

        def move(classes: list[int]) -> Tensor:
            m = torch.stack([cls_mean[c] for c in classes])[..., None, None]
            s = torch.stack([cls_std[c] for c in classes])[..., None, None]
            return (unit * s + m).to(images.dtype)

        def controls() -> dict[str, Tensor]:
            third = []
            for t in targets.tolist():
                pool = [c for c in present if c not in (label, int(labels[t]))]
                third.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
            return {"other_class_colour": move(third)}

        # Every target gets the same class statistics: no per-source grouping.
        return move([label] * n), controls, None

    return _drive(model, labels, preds, label, "colour", None, None, make, seed, batch_size,
                  screen, level)


#: The per-channel percentiles that bound an image's range in :func:`filter_test`.
FILTER_QUANTILES = (0.02, 0.98)
#: A filter test confirms only when its interval's low bound clears this, not zero: a
#: class's own range is class evidence a clean model may use (set on six bench_small
#: models, three clean and three beside a tinted truck: the clean classes' low bounds
#: reached +0.10, truck's were +0.48 to +0.65; BENCHMARKS.md, "A tint found by its range").
FILTER_MIN_LOW = 0.25


def channel_ranges(images: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's per-channel low percentile and span (``FILTER_QUANTILES``), ``[N, C]``
    each; ``kthvalue`` rather than ``quantile``, which refuses large inputs."""
    x = images.float().flatten(2)
    n = x.shape[-1]
    lo_k, hi_k = (min(n, max(1, round(q * (n - 1)) + 1)) for q in FILTER_QUANTILES)
    lo = x.kthvalue(lo_k, dim=-1).values
    hi = x.kthvalue(hi_k, dim=-1).values
    return lo, (hi - lo).clamp_min(1e-6)


def lay_range(images: Tensor, lo: Tensor, span: Tensor, new_lo: Tensor, new_span: Tensor,
              ) -> Tensor:
    """``images`` ``[N, C, H, W]`` rescaled per channel so that each image's range (``lo``,
    ``span``: ``[N, C]``, from :func:`channel_ranges`) becomes ``new_lo``, ``new_span``: a
    filter's linear part (a tint, a cast, a contrast change) laid over, or taken off."""
    unit = (images.float() - lo[..., None, None]) / span[..., None, None]
    return (unit * new_span[..., None, None] + new_lo[..., None, None]).to(images.dtype)


def filter_test(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor, label: int,
                seed: int = 0, batch_size: int = 256, screen: bool = False,
                level: float = LEVEL) -> CausalTest:
    """Lay the range of one of class ``label``'s images over each target: per channel, the
    target is rescaled so that its 2nd and 98th percentiles become the source's (in the
    model's input space). Control (``other_class_range``): the same with the range of an
    image of a third class. Intervals clustered by source image; confirmed above
    ``FILTER_MIN_LOW``."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    own = torch.nonzero(labels == label).flatten()
    if own.numel() == 0 or torch.unique(labels).numel() < 3:
        return _empty(label, "filter", None, None)
    lo, span = channel_ranges(images)

    def make(targets: Tensor, g: torch.Generator) -> Made:
        def lay(src: Tensor) -> Tensor:
            return lay_range(images[targets], lo[targets], span[targets], lo[src], span[src])

        src = own[torch.randint(own.numel(), (targets.numel(),), generator=g)]
        return (lay(src),
                lambda: {"other_class_range": lay(_other_images(labels, targets, [label], g))},
                src)

    test = _drive(model, labels, preds, label, "filter", None, None, make, seed, batch_size,
                  screen, level)
    test.min_low = FILTER_MIN_LOW
    return test
