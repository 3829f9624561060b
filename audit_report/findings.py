"""The judgement rules of the report: thresholds, the lead method, and findings in words.

Every number that turns a measurement into a verdict lives here, named, so a reader can
find what "flagged" means in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A method fails the sanity check when, with the whole network re-initialised, its maps
# still keep this mean rank correlation with the trained model's (Adebayo et al. 2018).
SANITY_FLAG_THRESHOLD = 0.5
# A class leans on a declared cue when the cue moves its accuracy, or other classes'
# predictions towards it, by this much more than a control patch does.
COUNTERFACTUAL_THRESHOLD = 0.2
# Fewer images of a class than this never raise a counterfactual flag.
COUNTERFACTUAL_MIN_IMAGES = 5
# On a GAP + Linear head CAM and Grad-CAM are equal up to scale: below this, suspect a bug.
CAM_AGREEMENT_MIN = 0.99
# Border energy worth a line: at least this many times the border's share of the area
# (capped at 95%), on at least this many images.
BORDER_ENERGY_FACTOR = 2.0
BORDER_ENERGY_CAP = 0.95
BORDER_MIN_IMAGES = 3
# The border band's width as a share of the image's shorter side.
BORDER_FRACTION = 0.1
# The method whose maps stand for the model where one method must be chosen (the
# images x classes grid, the bias figure, the border-energy finding, the filmstrip).
PREFERRED_LEAD_METHOD = "gradcam"


def lead_method(methods: list[str] | dict[str, Any]) -> str | None:
    """The method that speaks for the model: Grad-CAM when it ran, else the first one."""
    names = list(methods)
    if PREFERRED_LEAD_METHOD in names:
        return PREFERRED_LEAD_METHOD
    return names[0] if names else None


@dataclass(frozen=True)
class Finding:
    """One headline sentence; ``flag`` marks a problem (drawn in red, listed first)."""

    text: str
    flag: bool = False


def mean_of(stat: dict[str, Any] | None) -> float:
    """A summary's mean, or -inf where there is none (so it never wins a max)."""
    v = (stat or {}).get("mean")
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else float("-inf")


def flag_evidence(
    name: str, row: dict[str, Any], energy: dict[str, Any] | None, method: str | None,
    cue_area: float, threshold: float,
) -> list[str]:
    """Plain-words evidence for a class flagged by the counterfactual test."""
    out = []
    if energy and energy.get("n") and method is not None:
        out.append(
            f"{energy['mean']:.0%} of {method} energy on the cue patch, which covers "
            f"{cue_area:.1%} of the image (n={energy['n']})"
        )
    if math.isfinite(row["cue_reliance_margin"]) and row["cue_reliance_margin"] >= threshold:
        out.append(
            f"accuracy is {row['accuracy_with_cue']['value']:.0%} with the cue, "
            f"{row['accuracy_without_cue']['value']:.0%} without it and "
            f"{row['accuracy_with_control']['value']:.0%} with a control patch in its place "
            f"(n={row['n']})"
        )
    margin = row["cue_attraction_margin"]
    if math.isfinite(margin) and margin >= threshold:
        out.append(
            f"stamping the cue on other classes' images turns {margin:.0%} more of them "
            f"into {name} than a control patch does (n={row['attraction_n']})"
        )
    return out
