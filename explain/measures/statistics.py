"""Sample statistics with intervals: means, shares, per-class and per-group summaries."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .registry import get_measure


def summarize(values: Tensor | list[float], measure: str | None = None) -> dict[str, object]:
    """Mean, standard deviation, sample size and a 95% interval of the finite values.

    The interval is Student's t interval of the mean, or Wilson's for a ``share`` measure (0/1
    values per image). ``measure`` adds its direction, so every number in the report says
    which way is good.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    mean = float(v.mean()) if n else float("nan")
    std = float(v.std(unbiased=True)) if n > 1 else float("nan")
    # Student's t, not the normal 1.96: the sanity test's default n = 8 would be 17% too narrow.
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    ci = [mean - half, mean + half]
    interval = "t"
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


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom.

    The CDF is integrated numerically (Simpson's rule on the density, which is smooth) and
    inverted by bisection: exact to about 1e-9, no scipy needed at run time. Small samples
    need it: the normal 1.96 instead of t(0.975, 7) = 2.365 makes an 8-image interval 17%
    too narrow.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:  # for t >= 0
        x = torch.linspace(0.0, t, 2001, dtype=torch.float64)
        pdf = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x * x / df))
        weights = torch.ones(2001, dtype=torch.float64)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return 0.5 + float((weights * pdf).sum()) * (t / 2000) / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return float("inf")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its t interval ``(mean, lo, hi)``; NaN bounds if n < 2."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, n - 1) * float(v.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half
