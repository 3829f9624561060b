"""Two models side by side: per method and measure, which one the direction prefers."""

from __future__ import annotations

import math
from typing import Any

from .registry import available_measures, get_measure


def compare_models(models: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Side by side: per method and measure, each model's mean and the better one.

    Each model is ``{"label", "name", "accuracy", "faithfulness", "localisation",
    "sanity"}``, the last three mapping method -> measure -> summary (sanity: its
    ``final`` step).

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
                stats = [m[section].get(method, {}).get(name) for m in models]
                if all(st is not None for st in stats):
                    rows[name] = _compare(stats, name)
        stats = [m["sanity"].get(method, {}).get("final") for m in models]
        if all(st is not None for st in stats):
            rows["sanity_spearman"] = _compare(stats, "sanity_spearman")
        table[method] = rows
    return {
        "models": [m["label"] for m in models],
        "names": [m["name"] for m in models],
        "accuracy": [m["accuracy"] for m in models],
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
