"""Audit measures: how faithful, well localised, sane and biased explanation maps are.

Torch only: no Lightning, no matplotlib (a test checks). Every measure is declared in the
registry (:func:`register_measure`) with its category and whether higher is better, so the
report and ``metrics.json`` can say the direction of every number they show. Maps are raw
``[N, H, W]`` tensors (one map per image, at input resolution) as :func:`explain.run`
returns them for a ``targets`` tensor; images are ``[N, 3, H, W]`` in the model's
(normalised) input space.

One module per concern: :mod:`.registry`, :mod:`.statistics`, :mod:`.inference`,
:mod:`.map_scores` (the monitor's per-map numbers), :mod:`.faithfulness`,
:mod:`.localisation`, :mod:`.agreement`, :mod:`.sanity`, :mod:`.bias`,
:mod:`.comparison`, :mod:`.discovery` (shortcuts nobody declared) and :mod:`.confirmation` (its transplant and cover tests).
"""

from __future__ import annotations

from . import (
    agreement,
    bias,
    comparison,
    confirmation,
    discovery,
    faithfulness,
    inference,
    localisation,
    map_scores,
    registry,
    sanity,
    statistics,
)
from .registry import MeasureInfo, available_measures, get_measure, register_measure

__all__ = [
    "MeasureInfo",
    "agreement",
    "available_measures",
    "bias",
    "comparison",
    "confirmation",
    "discovery",
    "faithfulness",
    "get_measure",
    "inference",
    "localisation",
    "map_scores",
    "register_measure",
    "registry",
    "sanity",
    "statistics",
]
