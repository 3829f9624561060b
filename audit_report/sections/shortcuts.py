"""Suspected shortcuts: a cue nobody declared, found from the maps and confirmed by experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import explain
from explain.measures import causal, discovery, tracking
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices

from ..figures import fig_hotspots, fig_transplant
from ..findings import Finding
from ..html import macro
from ..page import Drawing
from .base import VISUAL, Section

if TYPE_CHECKING:
    from markupsafe import Markup
    from torch import Tensor, nn

    from ..page import Page
    from ..settings import AuditSettings
    from ..state import AuditRun, ModelAudit

# A pixel-level method (explain/presets.py): Grad-CAM at a ResNet's layer4 has 4 x 4 cells
# at 32 x 32 and misses a 4-pixel cue; saliency resolves it and costs one backward for the
# true class.
DISCOVERY_METHOD = explain.DISCOVERY_METHOD
# The audit tests more candidates than the monitor warns about: a suspect here is only
# reported as a shortcut when the transplant experiment confirms it, so a lower bar costs a
# few transplant runs, not false alarms.
AUDIT_SUSPECT_Z = 2.5
# Images a saliency call explains at once: it holds a backward graph for each of them, and
# the 300 of the default discovery sample in one call took the default audit's peak memory
# from 1.9 to 2.6 GB (quickstart ResNet-18). The maps do not depend on the chunk.
DISCOVERY_CHUNK = 64
# What the audit tries on each candidate class, in this order (explain.measures.tracking):
# a fixed box, a cluster of the class's maps, each image's own hotspot. The colour move is
# run apart and reported as colour *reliance*, never as a confirmed shortcut: measured on
# real CIFAR-10 (bench/shortcut_discovery.py), models with no cue at all rely on their
# classes' natural colours as much as a tinted class's model relies on its tint (margins up
# to +0.91 on clean classes against +0.94 to +1.00 for a tint), so the move cannot tell them
# apart. A filter (a tint, a cast) is confirmed by the range test instead
# (causal.filter_test), run on every class apart from these, above its own higher bar.
#
# "cluster" (a cue on part of a class) was off for a while: on the quickstart's final model
# it confirmed a cluster of x_cross images whose shapes sit together (x 7-18, y 12-23:
# 56% flips against 6% for the same box from the rest of the class). Its fourth control,
# the rest of the class's own most salient window pasted at the box, flips as much (55%,
# margin +0.02): an object cluster, not a cue.
AUDIT_TESTS = ("box", "cluster", "moving")
# Bumped when what the section computes or stores changes, so an earlier report's cache is
# not reused (4: suspects stored as typed records; 5: margins' intervals clustered by
# source image; 6: the filter test; 7: the cluster test back, with its fourth control;
# 8: a box shared with another class's confirmed shortcut; 9: of boxes tied on margin, the
# smallest that keeps nearly all the flips; 10: unless the ring between them flips no more
# than the larger box's controls; 11: the images whose own peaks recur at one place, in
# the saliency maps and in Grad-CAM's, are tested as clusters before the map clusters).
SEARCH_VERSION = 11


@dataclass
class Margin:
    """A transplant's margin over a control: mean of paired differences, 95% t interval."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, iv: discovery.Interval) -> Margin:
        return cls(iv.mean, iv.low, iv.high, iv.n)


@dataclass
class Suspect:
    """One tested class: its hotspot, the test that speaks for it (the confirmed one, else
    the strongest), and for a confirmed box the cover test of the class's own images.

    ``class_name`` is ``class`` in ``metrics.json`` (the key the schema and users know).
    """

    class_name: str = field(metadata={"json": "class"})
    index: int
    kind: str  # the test: box, cluster, moving or filter (explain.measures.tracking)
    box: list[int] | None
    size: list[int] | None
    share: float
    lift: float
    z: float
    consistency: float
    largest_cluster_share: float
    flip_rate: float
    controls: dict[str, float]
    margins: dict[str, Margin]
    margin: Margin
    targets: int
    confirmed: bool
    #: A cluster test's images chosen by their own recurring peaks in this method's maps
    #: (explain.measures.discovery.peak_group); None for a cluster of maps, other tests.
    peaks: str | None = None
    #: A box shared with these classes' confirmed shortcuts (tracking.shared_test): the
    #: flips count towards any of them, ``own_flip_rate`` towards this class alone.
    shared_with: list[str] = field(default_factory=list)
    own_flip_rate: float | None = None
    accuracy: float | None = None
    accuracy_hotspot_covered: float | None = None
    accuracy_random_covered: float | None = None
    cover_drop_vs_random: Margin | None = None

    @property
    def inconclusive(self) -> bool:
        """Not confirmed, though the margin over every control reaches the bar on average
        (and, shared, enough flips into the class itself): the interval is what fails, as
        with too few source images; a larger sample may settle it either way."""
        return (not self.confirmed and self.margin.mean >= causal.MIN_FLIP_MARGIN
                and (self.own_flip_rate is None
                     or self.own_flip_rate >= causal.MIN_FLIP_MARGIN))

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> Suspect:
        """Rebuilt from the cache's plain dict (field names, nested margins as dicts)."""
        margins = {k: Margin(**v) for k, v in value["margins"].items()}
        drop = value.get("cover_drop_vs_random")
        return cls(**{**value, "margins": margins, "margin": Margin(**value["margin"]),
                      "cover_drop_vs_random": None if drop is None else Margin(**drop)})


@dataclass
class ClusterSpot:
    """A cluster of a class's maps with its own hotspot (share of the class's images)."""

    share: float
    box: list[int]
    lift: float
    consistency: float


@dataclass
class ClassSpot:
    """A class's hotspot: the class-mean map's best window, its lift (a detector only)."""

    box: list[int]
    lift: float
    z: float
    consistency: float
    n: int
    suspect: bool
    clusters: list[ClusterSpot]

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> ClassSpot:
        return cls(**{**value, "clusters": [ClusterSpot(**c) for c in value["clusters"]]})


@dataclass
class ColourReliance:
    """The colour move of one class: its statistics moved onto other classes' images."""

    flip_rate: float
    controls: dict[str, float]
    margin: Margin
    targets: int
    relies: bool

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> ColourReliance:
        return cls(**{**value, "margin": Margin(**value["margin"])})


@dataclass
class SelfCheck:
    """Where the data declares a cue: the found box against the declared one."""

    declared_box: list[int]
    declared_flip_rate: float
    found_box: list[int] | None
    found_flip_rate: float | None
    iou: float


def _typed(value: Any, kind: type) -> Any:
    """``value`` as ``kind``: as it is, or rebuilt from the cache's plain dict."""
    if isinstance(value, kind):
        return value
    rebuild = getattr(kind, "from_plain", None)
    return rebuild(value) if rebuild is not None else kind(**value)


@dataclass
class ShortcutResult:
    """Per class: the hotspot of the class-mean map; per suspect: the transplant and cover."""

    method: str
    n_images: int
    window: list[int]
    z_threshold: float
    min_lift: float
    smallest_flagged_lift: float
    classes: dict[str, ClassSpot]
    suspects: list[Suspect]
    colour: dict[str, ColourReliance] = field(default_factory=dict)  # class -> colour move
    declared_cue_found: bool | None = None  # a self-check where the data declares a cue
    self_check: dict[str, SelfCheck] | None = None  # per declared cue class
    mean_maps: Tensor | None = field(default=None, metadata=VISUAL)  # [K, H, W]
    examples: dict[str, dict[str, Tensor]] = field(default_factory=dict, metadata=VISUAL)
    images01: Tensor | None = field(default=None, metadata=VISUAL)

    def __post_init__(self) -> None:
        # From the cache the suspects come back as plain dicts (its safe loading holds
        # no classes of ours): typed again here, so every reader sees one type.
        self.suspects = [_typed(s, Suspect) for s in self.suspects]
        self.classes = {k: _typed(v, ClassSpot) for k, v in self.classes.items()}
        self.colour = {k: _typed(v, ColourReliance) for k, v in self.colour.items()}
        if self.self_check is not None:
            self.self_check = {k: _typed(v, SelfCheck) for k, v in self.self_check.items()}


def _box(window: tuple[int, int, int, int]) -> list[int]:
    return [int(v) for v in window]


def discovery_sample(audit: AuditRun, model: ModelAudit,
                     ) -> tuple[list[int], Tensor, Tensor, Tensor]:
    """The shortcut search's images (``discovery_images`` a class, seeded), their labels,
    and the model's :data:`DISCOVERY_METHOD` maps of the true class: ``(indices, images,
    labels, maps)``. The before/after section reads the same, so both agree."""
    settings = audit.settings
    dataset = audit.data_run.datamodule.dataset(settings.split)
    k = len(audit.sample.class_names)
    idx = stratified_indices(dataset_labels(dataset), settings.discovery_images * k,
                             settings.seed + 2)
    batch = sample_batch(dataset, idx)
    images, labels = batch["image"].float(), batch["label"].long()
    return idx, images, labels, true_class_maps(model.model, images, labels, DISCOVERY_METHOD)


def true_class_maps(model: nn.Module, images: Tensor, labels: Tensor, method: str) -> Tensor:
    """``method``'s maps of each image's true class, ``DISCOVERY_CHUNK`` images a call."""
    return torch.cat([
        explain.run(model, images[i:i + DISCOVERY_CHUNK], method,
                    targets=labels[i:i + DISCOVERY_CHUNK]).cpu()
        for i in range(0, len(labels), DISCOVERY_CHUNK)])


def peak_maps(model: nn.Module, images: Tensor, labels: Tensor,
              ) -> tuple[str, Tensor, Tensor] | None:
    """The search sample's :data:`explain.PEAK_METHOD` maps of the true class: the method's
    name, the maps normalised and their usable mask, the search's second view of where
    each image peaks (:func:`explain.measures.tracking.search_class`); None for a model
    that method cannot explain (the search then reads the saliency maps' peaks alone)."""
    try:
        maps = true_class_maps(model, images, labels, explain.PEAK_METHOD)
    except explain.ExplainError:
        return None
    return (explain.PEAK_METHOD, *discovery.normalise_maps(maps))


def discovery_key(settings: AuditSettings) -> dict[str, Any]:
    """What the discovery's result depends on besides the checkpoint, data, split and seed
    (its cache key, also read by the time estimate)."""
    return {"discovery_images": settings.discovery_images, "z": AUDIT_SUSPECT_Z,
            "min_lift": discovery.SUSPECT_MIN_LIFT, "method": DISCOVERY_METHOD,
            "peak_method": explain.PEAK_METHOD,
            "tests": list(AUDIT_TESTS) + ["colour", "filter"], "version": SEARCH_VERSION}


def _suspect(test: causal.CausalTest, name: str, hs: discovery.ClassHotspots,
             names: list[str] | None = None) -> Suspect:
    """One tested class as the report and metrics.json show it (``names``: every class's,
    for a test shared with other classes)."""
    spot = hs.hotspot
    nan = float("nan")
    return Suspect(
        class_name=name, index=test.label, kind=test.kind,
        box=_box(test.box) if test.box is not None else None,
        size=list(test.size) if test.size else None, share=test.share,
        lift=spot.lift if spot else nan, z=hs.z,
        consistency=spot.consistency if spot else nan,
        largest_cluster_share=max((c.share for c in hs.clusters), default=1.0),
        flip_rate=test.flip_rate, controls=dict(test.controls),
        margins={k: Margin.of(v) for k, v in test.intervals.items()},
        margin=Margin.of(test.margin), targets=test.n, confirmed=test.confirmed,
        shared_with=[names[c] for c in test.also] if names else [],
        own_flip_rate=test.own_rate, peaks=test.peaks)


def _examples(model: Any, images: Tensor, labels: Tensor, preds: Tensor, label: int,
              box: tuple[int, int, int, int], show: Any, settings: AuditSettings,
              count: int = 6) -> dict[str, Tensor]:
    """A few other-class images before and after the class's box is pasted onto them (from
    one of its images each, in turn), with the predictions, for the figure."""
    targets = torch.nonzero((labels != label) & (preds != label)).flatten()[:count]
    own = torch.nonzero(labels == label).flatten()
    before = images[targets]
    after = before.clone()
    x0, y0, x1, y1 = box
    for i in range(len(targets)):
        after[i, :, y0:y1, x0:x1] = images[own[i % len(own)], :, y0:y1, x0:x1]
    return {"before": show(before), "after": show(after),
            "pred_before": preds[targets],
            "pred_after": discovery.predict(model, after, settings.batch_size)}


class SuspectedShortcutsSection(Section):
    """Label-free shortcut discovery: it leads the page when it finds something."""

    id = "shortcuts"
    title = "Suspected shortcuts"

    def units(self, audit: AuditRun) -> int:
        return 1

    def compute(self, audit: AuditRun, model: ModelAudit) -> ShortcutResult:
        return audit.reuse(model, "shortcuts", lambda: self._discover(audit, model),
                           ShortcutResult, **discovery_key(audit.settings))

    def _discover(self, audit: AuditRun, model: ModelAudit) -> ShortcutResult:
        """Discovery on its own sample, the transplant and cover tests of each suspect."""
        settings, sample = audit.settings, audit.sample
        dm = audit.data_run.datamodule
        k = len(sample.class_names)
        idx, images, labels, maps = discovery_sample(audit, model)
        norm, usable = discovery.normalise_maps(maps)
        hotspots = discovery.class_hotspots(maps, labels, k, cluster=True, seed=settings.seed)
        mean_maps = torch.stack([tracking.class_mean_maps(norm, usable, labels, c)
                                 for c in range(k)])
        lifts = torch.tensor([h.hotspot.lift if h.hotspot else float("nan") for h in hotspots])
        names = sample.class_names
        classes = {}
        for h in hotspots:
            if h.hotspot is None:
                continue
            classes[names[h.label]] = ClassSpot(
                box=_box(h.hotspot.window), lift=h.hotspot.lift, z=h.z,
                consistency=h.hotspot.consistency, n=h.hotspot.n, suspect=False,
                clusters=[ClusterSpot(c.share, _box(c.hotspot.window), c.hotspot.lift,
                                      c.hotspot.consistency) for c in h.clusters])
        preds = discovery.predict(model.model, images, settings.batch_size)
        # The second view of where images peak, for the cluster tests; none on a collapsed
        # model, which is not tested.
        cam = None if causal.collapsed(preds) else peak_maps(model.model, images, labels)
        suspects, examples = [], {}
        denorm = getattr(dm, "denormalize", None)
        show = (lambda x: denorm(x).clamp(0, 1)) if denorm else (lambda x: x.clamp(0, 1))
        chosen: dict[int, causal.CausalTest | None] = {}
        for c in ([] if causal.collapsed(preds) else tracking.candidates(hotspots, k)):
            tests = tracking.search_class(
                model.model, images, labels, preds, norm, usable, c, AUDIT_TESTS,
                hotspots[c].clusters, seed=settings.seed, batch_size=settings.batch_size,
                maps_method=DISCOVERY_METHOD, peak_maps=cam)
            chosen[c] = next((t for t in tests if t.confirmed), None) or max(
                (t for t in tests if not t.screened and t.n), key=lambda t: t.margin.mean,
                default=None)
        # A class not confirmed by its own tests whose hotspot touches another class's
        # confirmed box: one cue on both classes splits its flips between them
        # (tracking.shared_test), so it is tested with that box, flips towards either.
        boxes = [(c, t.box) for c, t in chosen.items()
                 if t is not None and t.confirmed and t.kind == "box" and t.box is not None]
        for c, t in chosen.items():
            if t is None or not t.confirmed:
                chosen[c] = self._shared(model, images, labels, preds, norm, usable, c,
                                         boxes, settings) or t
        for c, test in chosen.items():
            if test is None:
                continue  # every test's flips alone stayed under the margin: not a suspect
            name = names[c]
            classes[name].suspect = True
            entry = _suspect(test, name, hotspots[c], names)
            if test.box is not None and test.confirmed:
                cover = discovery.cover_test(model.model, images, labels, c, test.box,
                                             seed=settings.seed, batch_size=settings.batch_size)
                entry.accuracy = cover.accuracy
                entry.accuracy_hotspot_covered = cover.accuracy_hotspot_covered
                entry.accuracy_random_covered = cover.accuracy_random_covered
                entry.cover_drop_vs_random = Margin.of(cover.drop_vs_random)
                examples[name] = _examples(model.model, images, labels, preds, c, test.box,
                                           show, settings)
            suspects.append(entry)
        filters = self._filters(model, images, labels, preds, hotspots, classes, names,
                                settings, done={s.index for s in suspects if s.confirmed})
        # A class confirmed by its range is shown by that test alone, not also by a box
        # that did not confirm.
        suspects = [s for s in suspects if s.index not in {f.index for f in filters}] + filters
        colour = {}
        for c in ([] if causal.collapsed(preds) else range(k)):
            t = causal.colour_test(model.model, images, labels, preds, c, settings.seed,
                                   settings.batch_size, screen=True)
            if t.n and not t.screened:
                colour[names[c]] = ColourReliance(t.flip_rate, dict(t.controls),
                                                  Margin.of(t.margin), t.n, t.confirmed)
        window = discovery.window_size(*images.shape[-2:])
        result = ShortcutResult(
            DISCOVERY_METHOD, len(idx), list(window), AUDIT_SUSPECT_Z,
            discovery.SUSPECT_MIN_LIFT,
            discovery.smallest_flagged_lift(lifts, AUDIT_SUSPECT_Z), classes,
            suspects, colour, mean_maps=mean_maps, examples=examples,
        )
        cue = getattr(dm, "cue", None)
        if cue is not None and cue.position != "random":
            self._self_check(result, cue, model, images, labels, preds, settings, names)
        return result

    @staticmethod
    def _shared(model: ModelAudit, images: Tensor, labels: Tensor, preds: Tensor,
                norm: Tensor, usable: Tensor, label: int,
                boxes: list[tuple[int, causal.Box]],
                settings: AuditSettings) -> causal.CausalTest | None:
        """The first shared test of class ``label`` with another class's confirmed box
        (``boxes``: class, box) that clears the monitor's discovery bar, else None."""
        tests = tracking.shared_tests(model.model, images, labels, preds, norm, usable, label,
                                      boxes, settings.seed, settings.batch_size)
        return next((t for t in tests if tracking.discovered(t)), None)

    @staticmethod
    def _filters(model: ModelAudit, images: Tensor, labels: Tensor, preds: Tensor,
                 hotspots: list[discovery.ClassHotspots], classes: dict[str, ClassSpot],
                 names: list[str], settings: AuditSettings, done: set[int]) -> list[Suspect]:
        """Every class not already confirmed, by the range test (a tint or cast has no place
        for a box): only confirmed ones are kept, as a class's natural range is evidence a
        clean model may use below the test's bar."""
        out = []
        tests = tracking.filter_tests(model.model, images, labels, preds, len(names), done,
                                      settings.seed, settings.batch_size)
        for c, t in tests.items():
            if t.confirmed:
                if names[c] in classes:
                    classes[names[c]].suspect = True
                out.append(_suspect(t, names[c], hotspots[c]))
        return out

    @staticmethod
    def _self_check(result: ShortcutResult, cue: Any, model: ModelAudit, images: Tensor,
                    labels: Tensor, preds: Tensor, settings: AuditSettings,
                    names: list[str]) -> None:
        """Where the data declares a cue: the found box's IoU with it, and the transplant of
        the declared box itself (the best a found box could do)."""
        h, w = images.shape[-2:]
        ys, xs = torch.nonzero(cue.mask(h, w), as_tuple=True)
        declared = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        checks = {}
        for c in cue.classes:
            found = next((s for s in result.suspects if s.index == c and s.confirmed
                          and s.box), None)
            told = causal.box_test(model.model, images, labels, preds, c, declared,
                                   seed=settings.seed, batch_size=settings.batch_size)
            checks[names[c]] = SelfCheck(
                declared_box=list(declared), declared_flip_rate=told.flip_rate,
                found_box=found.box if found else None,
                found_flip_rate=found.flip_rate if found else None,
                iou=causal.iou(tuple(found.box), declared) if found else 0.0)
        result.self_check = checks
        result.declared_cue_found = any(v.iou > 0 for v in checks.values())

    def leads(self, audit: AuditRun) -> bool:
        """The page opens with this section when any model has a confirmed suspect."""
        return any(s.confirmed for m in audit.models for s in m.results[self.id].suspects)

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: ShortcutResult) -> list[Finding]:
        out = []
        for s in result.suspects:
            what = _what(s)
            ctrl = " and ".join(f"{v:.0%}" for v in s.controls.values())
            if s.confirmed:
                into = " or ".join([s.class_name, *s.shared_with])
                own = (f" ({s.own_flip_rate:.0%} into {s.class_name} itself)"
                       if s.own_flip_rate is not None else "")
                out.append(Finding(
                    f"class {s.class_name}: shortcut confirmed by experiment: {what} turns "
                    f"{s.flip_rate:.0%} of other classes' images into {into}{own} against "
                    f"{ctrl} for the controls (n={s.targets}; {result.method} lift "
                    f"{s.lift:.1f}).", flag=True, kind="shortcut", cls=s.class_name,
                    severity="high", numbers={
                        "test": s.kind, "box": s.box, "flip_rate": s.flip_rate,
                        "controls": s.controls, "margin": s.margin,
                        "targets": s.targets}))
            elif s.inconclusive:
                low = min(m.low for m in s.margins.values())
                out.append(Finding(
                    f"class {s.class_name}: {what} turns {s.flip_rate:.0%} of other classes' "
                    f"images into it, {s.margin.mean * 100:.0f} points more than the "
                    f"strongest control ({ctrl}), but the lowest bound of the margins' 95% "
                    f"intervals is {low:+.2f}: inconclusive, not confirmed as a shortcut (the "
                    f"search had {result.n_images} images; more images a class, audit.py "
                    "--discovery_images, may settle it either way)."))
            else:
                out.append(Finding(
                    f"class {s.class_name}: {what} turns {s.flip_rate:.0%} of other classes' "
                    f"images into it, but not more than the controls ({ctrl}): not confirmed "
                    "as a shortcut."))
        for name, c in result.colour.items():
            if c.relies:
                out.append(Finding(
                    f"class {name}: predictions follow colour statistics: giving other classes' "
                    f"images its average colour turns {c.flip_rate:.0%} of them into {name} "
                    f"against {c.controls['other_class_colour']:.0%} with a third class's "
                    "colour. A tint or filter on this class would look like this; so does "
                    "reliance on its natural colours (this test cannot tell them apart)."))
        return out

    def intro(self, page: Page) -> Markup:
        return self.html("intro", result=page.audit.models[0].results[self.id],
                         filter_min_low=causal.FILTER_MIN_LOW)

    def render(self, page: Page, model: ModelAudit, result: ShortcutResult) -> Markup:
        suspects = []
        for s in result.suspects:
            ex = result.examples.get(s.class_name)
            transplant = None
            if ex is not None and len(ex["before"]) and s.box:
                transplant = page.figures.add(
                    f"transplant_{s.index}{page.tag(model)}",
                    Drawing(fig_transplant, ex["before"], ex["after"], s.box, [
                        [f"\u2192 {page.names[int(p)]}" for p in ex[key]]
                        for key in ("pred_before", "pred_after")]),
                    f"Other classes' images before (top) and after (bottom) the "
                    f"{s.class_name} box (yellow) is pasted onto them, with the model's "
                    "prediction above each.", "transplant examples")
            suspects.append((s, _what(s), transplant))
        hotspots = None
        if result.mean_maps is not None:
            boxes = {name: c.box for name, c in result.classes.items()}
            # Red only where the shortcut has a place: a filter's class keeps its hotspot
            # window, which is not where its shortcut is.
            confirmed = {s.class_name for s in result.suspects if s.confirmed and s.box}
            hotspots = page.figures.add(
                f"hotspots{page.tag(model)}",
                Drawing(fig_hotspots, result.mean_maps, list(result.classes), boxes, confirmed,
                        [c.lift for c in result.classes.values()]),
                f"Class-mean {result.method} map of each class (true class, each map "
                "normalised to sum 1 before averaging) with its hotspot window; red: a "
                "confirmed shortcut. A shortcut at a fixed place shows as a sharp spot; objects "
                "that move from image to image blur into a spread map.", "class-mean maps")
        plan = page.audit.results.get("removal_plan")
        removal = (_removal_note(plan)
                   if plan is not None and plan.model == model.label else None)
        return self.html("body", result=result, suspects=suspects,
                         control_words=CONTROL_WORDS, hotspots=hotspots, removal=removal)


def _removal_note(plan: Any) -> Markup:
    """The command that fine-tunes the confirmed shortcuts away, as the report shows it."""
    return macro("sections/shortcuts.html.j2", "removal_note")(plan=plan)


CONTROL_WORDS = {
    "salient_elsewhere": "its most salient window from elsewhere",
    "random_window": "a window from elsewhere",
    "other_class": "the same place from other classes",
    "rest_of_class": "the same box from the class's other images",
    "rest_of_class_salient": "the most salient window of the class's other images",
    "other_class_colour": "a third class's colour statistics",
    "other_class_range": "the range of a third class's image",
}


def _what(s: Suspect) -> str:
    """How a tested class's content reads in a sentence."""
    if s.kind == "colour":
        return "moving its colour statistics onto other images"
    if s.kind == "filter":
        return ("laying the range of its images (each channel's 2nd to 98th percentile) over "
                "other images: a tint or cast with no place")
    if s.kind == "moving":
        kh, kw = s.size
        return f"each of its images' own {kh}\u00d7{kw} hotspot"
    where = causal.box_label(tuple(s.box))
    if s.shared_with:
        return (f"the box {where}, where {' and '.join(s.shared_with)}'s confirmed shortcut "
                "is (its images carry it too)")
    if s.kind == "cluster" and s.peaks is not None:
        return (f"the box {where} cut from the {s.share:.0%} of its images whose own "
                f"{s.peaks + ' ' if s.peaks else ''}peaks recur there")
    if s.kind == "cluster":
        return f"the box {where} of a cluster of {s.share:.0%} of its images"
    return f"the box {where}"
