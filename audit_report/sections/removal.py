"""Before and after a shortcut fix: is the shortcut gone, and what did the fix cost?

Shown when a checkpoint under audit was fine-tuned with ``model.shortcut_removal`` (the
command ``remove_shortcuts.yaml`` holds): every model under audit is measured on each of
that run's shortcuts, side by side (``audit.py --ckpt before --ckpt after``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from explain.measures import discovery, reliance
from lit_modules.shortcut_removal import ShortcutRemoval

from ..findings import Finding
from .base import Section
from .shortcuts import discovery_sample

if TYPE_CHECKING:
    from ..page import Page
    from ..state import AuditRun, ModelAudit

def removal_spec(audit: AuditRun) -> ShortcutRemoval | None:
    """The shortcut removal of the first model under audit that was fine-tuned with one."""
    for m in audit.models:
        spec = getattr(m.model, "hparams", {}).get("shortcut_removal")
        if spec:
            return ShortcutRemoval.coerce(spec)
    return None


@dataclass
class ShortcutCheck:
    """One model's reliance on one shortcut, as measured and as judged."""

    cls: str
    index: int
    box: list[int] | None  # None: a filter (the range of the class's images)
    verdict: str  # gone | weakened | still there
    flip_rate: float
    controls: dict[str, float]
    margin: dict[str, float]  # mean, low, high, n of the margin over the strongest control
    targets: int
    accuracy: float
    class_accuracy: float
    class_accuracy_covered: float
    relevance_ratio: float
    rediscovered: bool  # this model's own shortcut search confirms the class again


@dataclass
class RemovalResult:
    """Per shortcut of the fix, this model's measures; whether the model is the fixed one."""

    fixed: bool  # this checkpoint was fine-tuned with the removal
    method: str  # the fix's counter-measure
    n_images: int
    checks: list[ShortcutCheck] = field(default_factory=list)


def _check(r: reliance.Reliance, name: str, rediscovered: bool) -> ShortcutCheck:
    m = r.transplant.margin
    return ShortcutCheck(
        cls=name, index=r.label, box=None if r.box is None else list(r.box),
        verdict=r.verdict,
        flip_rate=r.transplant.flip_rate, controls=dict(r.transplant.controls),
        margin={"mean": m.mean, "low": m.low, "high": m.high, "n": m.n},
        targets=r.transplant.n, accuracy=r.accuracy, class_accuracy=r.class_accuracy,
        class_accuracy_covered=r.class_accuracy_covered, relevance_ratio=r.relevance_ratio,
        rediscovered=rediscovered)


class ShortcutRemovalSection(Section):
    """The fix's proof: transplant, covered accuracy and relevance, before and after."""

    id = "shortcut-removal"
    title = "Shortcut removal: before and after"

    def compute(self, audit: AuditRun, model: ModelAudit) -> RemovalResult:
        spec = removal_spec(audit)
        assert spec is not None, "the removal section is listed only with a removal run"
        # Not cached: a few hundred images' saliency and predictions, seconds per model.
        return self._measure(audit, model, spec)

    def _measure(self, audit: AuditRun, model: ModelAudit,
                 spec: ShortcutRemoval) -> RemovalResult:
        settings = audit.settings
        names = audit.sample.class_names
        # The images of the shortcut search, so both agree.
        idx, images, labels, maps = discovery_sample(audit, model)
        norm, _ = discovery.normalise_maps(maps)
        found = model.results.get("shortcuts")
        again = {s.index for s in getattr(found, "suspects", []) if s.confirmed}
        own = getattr(model.model, "hparams", {}).get("shortcut_removal")
        result = RemovalResult(fixed=bool(own), method=spec.method, n_images=len(idx))
        for s in spec.shortcuts:
            r = reliance.measure(model.model, images, labels, s.class_index, s.box, maps=maps,
                                 norm_maps=norm, seed=settings.seed,
                                 batch_size=settings.batch_size)
            result.checks.append(_check(r, names[s.class_index], s.class_index in again))
        for f in spec.filters:
            r = reliance.measure_filter(model.model, images, labels, f.class_index,
                                        seed=settings.seed, batch_size=settings.batch_size)
            result.checks.append(_check(r, names[f.class_index], f.class_index in again))
        return result

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: RemovalResult) -> list[Finding]:
        if not result.fixed:
            return []
        out = []
        for c in result.checks:
            words = _sentence(c)
            if c.verdict == "gone":
                out.append(Finding(words))
            else:
                out.append(Finding(words, flag=True, kind="shortcut", cls=c.cls,
                                   severity="high" if c.verdict == "still there" else "medium",
                                   numbers={"test": "box" if c.box else "filter", "box": c.box,
                                            "flip_rate": c.flip_rate, "controls": c.controls,
                                            "margin": c.margin, "targets": c.targets,
                                            "after_removal": c.verdict}))
        return out

    def render_all(self, page: Page) -> Markup:
        models = page.audit.models
        results: list[RemovalResult] = [m.results[self.id] for m in models]
        shortcuts = []
        for k, check in enumerate(results[0].checks):
            row = [r.checks[k] for r in results]
            fixed = [c for c, r in zip(row, results, strict=True) if r.fixed]
            shortcuts.append((check, row, _sentence(fixed[-1]) if fixed else None))
        return self.html("body", models=models, results=results, shortcuts=shortcuts)

    def render(self, page: Page, model: ModelAudit, result: Any) -> Markup:
        return Markup()  # render_all draws the models side by side


def where(c: ShortcutCheck) -> str:
    """``the box x 0-8, y 0-8``, or ``its filter`` for a shortcut with no place."""
    if c.box is None:
        return "its filter (the range of its images)"
    x0, y0, x1, y1 = c.box
    return f"the box x {x0}-{x1}, y {y0}-{y1}"


def _sentence(c: ShortcutCheck) -> str:
    """The verdict on the fixed model in one sentence."""
    ctrl = " / ".join(f"{v:.0%}" for v in c.controls.values())
    moved, kept = (("pasted", "the box covered") if c.box is not None else
                   ("laid over other images", "another class's range"))
    tail = (f" ({moved}, it turns {c.flip_rate:.0%} of other classes' images into {c.cls} "
            f"against {ctrl} for the controls; {c.cls}'s images with {kept} are "
            f"recognised {c.class_accuracy_covered:.0%} of the time)")
    where_ = where(c)
    if c.verdict == "gone":
        return f"Class {c.cls} no longer relies on {where_}: the shortcut is gone{tail}."
    if c.verdict == "weakened":
        return f"Class {c.cls} relies less on {where_}, but not at the controls' level{tail}."
    return f"Class {c.cls} still relies on {where_}: the shortcut is still there{tail}."
