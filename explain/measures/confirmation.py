"""Confirming a suspected shortcut by experiment: the transplant and cover tests.

A hotspot window found by :mod:`explain.measures.discovery` is only a suspicion. Here its
pixels are pasted onto other classes' images (does the prediction follow them?) and
covered in the class's own images (does its accuracy fall?), each against controls with
the same pairing, with paired Student t intervals. A fragile model flips on any pasted
patch: only the margin over the controls is evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .inference import predict_proba
from .statistics import t_quantile

#: Transplant / cover tests: confidence level of the paired intervals; fewest targets.
LEVEL = 0.95
MIN_TARGETS = 5
#: The hotspot must also beat each control by this many flips per target on average. A
#: t interval on 0/1 differences is too narrow when discordant pairs are rare (4 of 216,
#: all one way, already "exclude zero"); a margin of 2 points is no shortcut anyway.
MIN_FLIP_MARGIN = 0.1


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


def clustered_interval(diff: Tensor, groups: Tensor, level: float = LEVEL) -> Interval:
    """Student t interval for the mean of ``diff`` ``[n]`` when the pairs come in groups
    (``groups`` ``[n]``: which source image each pair pasted from).

    A transplant pastes a few source images onto many targets: whether the box holds a
    *class-wide* cue is a question about the sources, and the targets of one source are
    not independent evidence of it. On a clean ResNet-18 (CIFAR-10, 4 sources a class)
    one car whose box held its wheel flipped 44% of its targets against 0% for its control
    while the other three sources flipped as much as theirs: +0.24 [+0.13, +0.35] with
    targets counted as independent, a false alarm. Here the variance is the cluster-robust
    one (sums of residuals per group, with the ``G / (G - 1)`` correction) and the t
    quantile has ``G - 1`` degrees of freedom: one source alone proves nothing (an
    infinite interval), a cue present in every source is as tight as before.
    """
    d = diff.detach().double().flatten().cpu()
    g = groups.detach().flatten().cpu()
    n = d.numel()
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    mean = float(d.mean())
    _, idx = torch.unique(g, return_inverse=True)
    count = int(idx.max()) + 1
    if count < 2:
        return Interval(mean, float("-inf"), float("inf"), n, level)
    sums = torch.zeros(count, dtype=torch.double).index_add_(0, idx, d - mean)
    var = count / (count - 1) * float((sums ** 2).sum()) / n ** 2
    half = t_quantile(0.5 + level / 2.0, count - 1) * math.sqrt(var)
    return Interval(mean, mean - half, mean + half, n, level)


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
