"""The judgement rules of the report: thresholds, the lead method, and findings in words.

Every number that turns a measurement into a verdict lives here, named, so a reader can
find what "flagged" means in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import explain

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
PREFERRED_LEAD_METHOD = explain.DEFAULT_METHOD


def lead_method(methods: list[str] | dict[str, Any]) -> str | None:
    """The method that speaks for the model: Grad-CAM when it ran, else the first one."""
    names = list(methods)
    if PREFERRED_LEAD_METHOD in names:
        return PREFERRED_LEAD_METHOD
    return names[0] if names else None


@dataclass(frozen=True)
class Finding:
    """One headline sentence; ``flag`` marks a problem (drawn in red, listed first).

    A problem also says what kind it is (``shortcut``, ``bias``, ``sanity``), the class it
    concerns, its severity (``high`` for a problem confirmed by experiment, ``medium``
    otherwise) and the numbers behind it, so ``metrics.json`` can list it as a record.
    """

    text: str
    flag: bool = False
    kind: str = "note"
    cls: str | None = None
    severity: str = "info"
    numbers: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def record(self, model: str) -> dict[str, Any]:
        """The finding as ``metrics.json`` lists it."""
        return {"model": model, "kind": self.kind, "class": self.cls,
                "severity": self.severity, "text": self.text, "numbers": dict(self.numbers)}


SEVERITY_ORDER = ("high", "medium", "low", "info")


@dataclass
class Verdict:
    """What the audit concluded, in one place: the banner, ``metrics.json`` and the exit
    status of ``--fail_on_findings`` all read it."""

    status: str  # "findings" or "clean"
    confirmed_shortcuts: int
    bias_findings: int
    other_problems: int
    accuracy: float | None  # the first model's, on the audited split
    worst: str | None  # the most severe problem's sentence

    @classmethod
    def of(cls, problems: list[Finding], accuracy: float | None) -> Verdict:
        ranked = sorted(problems, key=lambda f: SEVERITY_ORDER.index(f.severity)
                        if f.severity in SEVERITY_ORDER else len(SEVERITY_ORDER))
        return cls(
            status="findings" if problems else "clean",
            confirmed_shortcuts=sum(f.kind == "shortcut" for f in problems),
            bias_findings=sum(f.kind == "bias" for f in problems),
            other_problems=sum(f.kind not in ("shortcut", "bias") for f in problems),
            accuracy=accuracy, worst=ranked[0].text if ranked else None)


@dataclass
class AuditResult:
    """What an audit returns: where the report is, the verdict and every problem found."""

    path: Path
    verdict: Verdict
    findings: list[dict[str, Any]]  # the records of metrics.json's ``findings``

    def __truediv__(self, other: str) -> Path:
        """``result / "report.html"``: a file of the report folder."""
        return self.path / other


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


def verdict_of(audit: Any) -> tuple[Verdict, list[dict[str, Any]]]:
    """The verdict over every model's problems (an :class:`~audit_report.state.AuditRun`
    whose models' findings are made), and those problems as records."""
    problems = [(m.label, f) for m in audit.models for f in m.findings if f.flag]
    summary = audit.models[0].results.get("summary")
    acc = getattr(summary, "accuracy", None)
    value = acc.get("value") if isinstance(acc, dict) else None
    return (Verdict.of([f for _, f in problems], value),
            [f.record(label) for label, f in problems])
