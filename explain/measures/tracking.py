"""Following shortcuts through a run: which classes to test each epoch, and their states.

The monitor's verdict is the causal test (:mod:`.causal`), never the lift: a class-mean
hotspot is only a *detector* (it falls as the model learns the object while the shortcut
stays, and it flares on broken epochs). Every epoch :class:`ShortcutTracker`

1. re-tests every shortcut it already follows, with the box it was confirmed with,
   whether or not the class's lift still stands out; its state becomes ``confirmed``,
   ``weakened`` (not at the controls' level, no longer confirmed) or ``gone`` (the
   margin over the strongest control small and its interval reaching zero);
2. screens the candidate classes (:func:`candidates`: every class with a usable map when
   there are at most ``ALL_CANDIDATES_MAX``, so the rule does not assume that most classes
   are clean) with one window at the hotspot, and searches the box (:func:`.box_search.search_box`)
   of those whose flips pass the screen; a box whose margin's whole 95% interval is at
   least 10 points (:func:`discovered`) is followed from then on;
3. tests a candidate whose own search found nothing, and whose class-mean hotspot touches
   a followed box of another class, with that box, counting flips towards either class
   (:func:`shared_test`: one patch on two classes splits its flips between them).

Events (first confirmation, gone, back) are returned for the caller to print. State is
plain Python (lists, ints, strings) so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import box_search, causal, discovery
from .causal import Box, CausalTest
from .confirmation import MIN_FLIP_MARGIN, CoverResult, cover_test
from .discovery import MIN_CLUSTER_SIZE, SUSPECT_MIN_LIFT, ClassHotspots

#: Up to this many classes every class with a usable map is tested every epoch; beyond,
#: the ``TOP_CANDIDATES`` highest lifts of at least ``SUSPECT_MIN_LIFT``.
ALL_CANDIDATES_MAX = 16
TOP_CANDIDATES = 8
KINDS = ("box", "cluster", "colour", "filter", "moving")

STATES = ("confirmed", "weakened", "gone", "suspected", "clear", "no usable map", "not tested")


@dataclass
class Followed:
    """A confirmed shortcut the tracker keeps testing: class, kind and box."""

    label: int
    kind: str
    box: Box | None
    size: tuple[int, int] | None
    since: int  # epoch of the first confirmation
    state: str = "confirmed"
    also: tuple[int, ...] = ()  # classes whose followed box this class's cue shares

    def to_state(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind,
                "box": list(self.box) if self.box else None,
                "size": list(self.size) if self.size else None,
                "since": self.since, "state": self.state, "also": list(self.also)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Followed:
        return cls(int(d["label"]), str(d["kind"]),
                   tuple(int(v) for v in d["box"]) if d.get("box") else None,  # type: ignore[arg-type]
                   tuple(int(v) for v in d["size"]) if d.get("size") else None,  # type: ignore[arg-type]
                   int(d["since"]), str(d.get("state", "confirmed")),
                   tuple(int(v) for v in d.get("also") or ()))


@dataclass
class ClassRow:
    """One class at one epoch: its detector (lift), its best test and its state."""

    label: int
    state: str
    lift: float | None = None
    test: CausalTest | None = None
    followed: Followed | None = None
    note: str = ""
    #: A followed shared cue kept by its own images' need of the box (:func:`needs_box`).
    cover: CoverResult | None = None


@dataclass
class Event:
    """A change worth a line on the console: ``confirmed``, ``gone`` or ``back``."""

    kind: str
    label: int
    test: CausalTest
    box: Box | None


@dataclass
class EpochVerdict:
    """One epoch's rows (one per class), its events, and why nothing was tested if so."""

    epoch: int
    rows: list[ClassRow]
    events: list[Event] = field(default_factory=list)
    note: str = ""  # ``{}`` stands for the class every image was predicted as
    collapsed_to: int | None = None

    def describe_note(self, names: Sequence[str]) -> str:
        return self.note.format(names[self.collapsed_to] if self.collapsed_to is not None
                                else "")

    @property
    def confirmed(self) -> list[int]:
        return [r.label for r in self.rows if r.state == "confirmed"]


#: A *new* shortcut needs the whole 95% interval of its margin at or above this (a followed
#: one stays confirmed with the interval above zero and a mean of MIN_FLIP_MARGIN). The
#: monitor tests every class, several boxes and every epoch on a few fixed images: on real
#: CIFAR-10 with no cue, a bench_small run confirmed an object region (margin +0.17, 47%
#: flips against 30%) under the plain rule; a planted patch clears this bar at once (bird
#: +0.94, the quickstart's square +0.46 [+0.34, +0.58]).
DISCOVERY_MIN_LOW = MIN_FLIP_MARGIN


#: Followed boxes of two classes where this much of the smaller lies in the other are one
#: cue shared by the classes (:func:`.causal.overlap_share`): each one's re-test counts
#: flips towards both. A patch on two classes is found with boxes of different sizes
#: around it (cat's x 0-11 and dog's x 2-6 on the benchmark's shared case).
SHARED_MIN_OVERLAP = 0.5
#: The least share of a followed shared cue's flips into the class itself that keeps it
#: confirmed (a new one needs MIN_FLIP_MARGIN).
SHARED_OWN_MIN = MIN_FLIP_MARGIN / 2


def needs_box(cover: CoverResult) -> bool:
    """The class's own images lose at least ``MIN_FLIP_MARGIN`` of their accuracy with the
    box covered, more than with a same-size window elsewhere covered, the paired interval
    above zero: the reliance side of a shared cue whose pasted flips went elsewhere."""
    d = cover.drop_vs_random
    return d.n > 0 and d.low > 0 and d.mean >= MIN_FLIP_MARGIN


def discovered(test: CausalTest) -> bool:
    """Enough to start following a shortcut: confirmed, and its margin's whole interval at
    or above ``DISCOVERY_MIN_LOW``."""
    return test.confirmed and test.margin.low >= DISCOVERY_MIN_LOW


def candidates(hotspots: Sequence[ClassHotspots], num_classes: int,
               all_max: int = ALL_CANDIDATES_MAX, top: int = TOP_CANDIDATES) -> list[int]:
    """Classes to screen: every class with a usable map up to ``all_max`` classes; beyond,
    the ``top`` largest lifts of at least ``SUSPECT_MIN_LIFT`` (absolute, so a dataset
    where half the classes carry a cue still has its candidates)."""
    usable = [h for h in hotspots if h.hotspot is not None]
    if num_classes <= all_max:
        return [h.label for h in usable]
    strong = [h for h in usable if h.hotspot is not None and h.hotspot.lift >= SUSPECT_MIN_LIFT]
    strong.sort(key=lambda h: -h.hotspot.lift if h.hotspot else 0.0)
    return sorted(h.label for h in strong[:top])


def class_mean_maps(norm_maps: Tensor, usable: Tensor, labels: Tensor, label: int) -> Tensor:
    sel = (labels == label) & usable
    return norm_maps[sel].mean(0) if bool(sel.any()) else torch.zeros(norm_maps.shape[-2:])


class ShortcutTracker:
    """Per-epoch causal tests of candidate classes and of every shortcut already confirmed.

    Args:
        kinds: which tests search for new shortcuts: ``box`` (a place), ``colour`` (colour
            statistics), ``filter`` (a class's per-channel range), ``moving`` (each image's
            own hotspot).
        seed: the tests' pairing; fixed over the run, so epochs differ by the model only.
    """

    def __init__(self, kinds: Sequence[str] = ("box",), seed: int = 0,
                 batch_size: int = 256) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown shortcut test kind(s) {bad}; choose from {list(KINDS)}")
        self.kinds = tuple(kinds)
        self.seed = seed
        self.batch_size = batch_size
        self.followed: dict[int, Followed] = {}

    def state_dict(self) -> list[dict[str, Any]]:
        return [f.to_state() for f in self.followed.values()]

    def follow(self, label: int, box: Box | None, since: int = -1) -> None:
        """Test ``box`` of class ``label`` every epoch from now on, as a shortcut confirmed
        before the run (``since`` -1: a fix of a known shortcut); ``box`` None: the class's
        filter (the range test). No-op when the class is already followed."""
        if label in self.followed:
            return
        if box is None:
            self.followed[label] = Followed(label, "filter", None, None, since)
            return
        x0, y0, x1, y1 = box
        self._add(Followed(label, "box", tuple(box), (y1 - y0, x1 - x0), since))

    def _add(self, f: Followed) -> None:
        """Follow ``f``, linked with every followed box of another class in the same place
        (``SHARED_MIN_OVERLAP``): one cue on several classes, each one's re-test counting
        flips towards all of them (see :func:`shared_test`)."""
        if f.kind == "box" and f.box is not None:
            for other in self.followed.values():
                if (other.kind == "box" and other.box is not None and other.label != f.label
                        and causal.overlap_share(other.box, f.box) >= SHARED_MIN_OVERLAP):
                    other.also = tuple(sorted({*other.also, f.label}))
                    f.also = tuple(sorted({*f.also, other.label}))
        self.followed[f.label] = f

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.followed = {int(d["label"]): Followed.from_state(d) for d in state}

    def baseline(self, model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                 norm_maps: Tensor, usable: Tensor, num_classes: int) -> EpochVerdict:
        """The followed shortcuts tested once more without changing any state: the
        "before" point of a run that sets out to remove them (epoch -1)."""
        labels, preds = labels.long().cpu(), preds.long().cpu()
        rows = []
        for f in self.followed.values():
            t = self._retest(f, model, images, labels, preds, norm_maps, usable)
            state = "confirmed" if t.confirmed else "gone" if t.gone else "weakened"
            rows.append(ClassRow(f.label, state, None, t, f))
        return EpochVerdict(-1, rows, [], "before this run's first training step")

    def _retest(self, f: Followed, model: nn.Module, images: Tensor, labels: Tensor,
                preds: Tensor, norm_maps: Tensor, usable: Tensor) -> CausalTest:
        if f.kind == "colour":
            return causal.colour_test(model, images, labels, preds, f.label, self.seed,
                                      self.batch_size)
        if f.kind == "filter":
            return causal.filter_test(model, images, labels, preds, f.label, self.seed,
                                      self.batch_size)
        if f.kind == "moving" and f.size is not None:
            return self._moving(model, images, labels, preds, norm_maps, usable, f.label,
                                f.size, screen=False)
        assert f.box is not None
        # Every image of the class is a source: the box was fixed when it was confirmed
        # (on one half's maps, pasted from the other), nothing here chooses it from these
        # maps any more, and the margin's interval is clustered by source: 8 sources
        # instead of 4 are what keeps a moderate cue from flickering to "weakened".
        sources = torch.nonzero((labels == f.label) & usable).flatten().tolist()
        t = causal.box_test(model, images, labels, preds, f.label, f.box, sources,
                            seed=self.seed, batch_size=self.batch_size, norm_maps=norm_maps,
                            also=f.also)
        if f.also:
            # A followed shared cue's split between its classes flickers from epoch to
            # epoch; half the bar towards the class itself keeps it, none does not.
            t.own_min = SHARED_OWN_MIN
        return t

    def _shared(self, model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                norm_maps: Tensor, usable: Tensor, label: int) -> CausalTest | None:
        """Class ``label`` tested with a box another class is followed with, where the
        hotspot of its class-mean map touches that box; a flip towards either class counts
        (:func:`shared_test`). The first one confirmed, else the one with the most flips,
        else None."""
        boxes = [(f.label, f.box) for f in self.followed.values()
                 if f.kind == "box" and f.box is not None and f.label != label]
        tests = list(shared_tests(model, images, labels, preds, norm_maps, usable, label,
                                  boxes, self.seed, self.batch_size))
        hit = next((t for t in tests if discovered(t)), None)
        return hit or max(tests, key=lambda t: t.flip_rate if t.n else -1.0, default=None)

    def _moving(self, model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                norm_maps: Tensor, usable: Tensor, label: int, size: tuple[int, int],
                screen: bool) -> CausalTest:
        return _moving(model, images, labels, preds, norm_maps, usable, label, size, screen,
                       self.seed, self.batch_size)

    def _search(self, model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                norm_maps: Tensor, usable: Tensor, label: int) -> list[CausalTest]:
        return search_class(model, images, labels, preds, norm_maps, usable, label,
                            self.kinds, seed=self.seed, batch_size=self.batch_size)

    def step(self, epoch: int, model: nn.Module, images: Tensor, labels: Tensor,
             preds: Tensor, norm_maps: Tensor, usable: Tensor,
             hotspots: Sequence[ClassHotspots], num_classes: int) -> EpochVerdict:
        """Test this epoch; ``norm_maps``/``usable`` from :func:`.discovery.normalise_maps`
        of the true-class maps at the images' size, ``hotspots`` from
        :func:`.discovery.class_hotspots`."""
        labels, preds = labels.long().cpu(), preds.long().cpu()
        lifts = {h.label: (h.hotspot.lift if h.hotspot else None) for h in hotspots}
        if causal.collapsed(preds):
            note = ("not tested: every fixed image is predicted as one class ({}), so no "
                    "class can be judged this epoch")
            rows = [ClassRow(c, "not tested", lifts.get(c), None, self.followed.get(c), note)
                    for c in range(num_classes)]
            return EpochVerdict(epoch, rows, [], note, collapsed_to=int(preds[0]))
        rows: dict[int, ClassRow] = {}
        changes: dict[int, Event] = {}  # a followed shortcut's gone / back, by class
        events: list[Event] = []
        before = {f.label: f.state for f in self.followed.values()}

        def judge(f: Followed) -> None:
            t = self._retest(f, model, images, labels, preds, norm_maps, usable)
            f.state = "confirmed" if t.confirmed else "gone" if t.gone else "weakened"
            cover = None
            if f.state == "weakened" and f.also and f.box is not None:
                # The shared cue still acts, but its pasted flips went to the other class
                # this epoch: the class's own images say whether it still needs the box.
                cover = cover_test(model, images, labels, f.label, f.box, seed=self.seed,
                                   batch_size=self.batch_size)
                if needs_box(cover):
                    f.state = "confirmed"
            changes.pop(f.label, None)
            if f.state == "gone" and before[f.label] != "gone":
                changes[f.label] = Event("gone", f.label, t, f.box)
            elif f.state == "confirmed" and before[f.label] == "gone":
                changes[f.label] = Event("back", f.label, t, f.box)
            rows[f.label] = ClassRow(f.label, f.state, lifts.get(f.label), t, f, cover=cover)

        for f in list(self.followed.values()):
            judge(f)
        for c in candidates(hotspots, num_classes):
            if c in rows:
                continue
            tests = self._search(model, images, labels, preds, norm_maps, usable, c)
            hit = next((t for t in tests if discovered(t)), None)
            if hit is None and lifts.get(c) is not None:
                shared = self._shared(model, images, labels, preds, norm_maps, usable, c)
                if shared is not None:
                    tests.append(shared)
                    hit = shared if discovered(shared) else None
            if hit is not None:
                size = hit.size
                f = Followed(c, hit.kind, hit.box, size, epoch, also=hit.also)
                for a in hit.also:  # the partner's retests count this class's flips too
                    partner = self.followed[a]
                    partner.also = tuple(sorted({*partner.also, c}))
                self._add(f)
                events.append(Event("confirmed", c, hit, hit.box))
                rows[c] = ClassRow(c, "confirmed", lifts.get(c), hit, f)
                # A partner judged earlier this epoch on its own flips alone (the split
                # may have moved to this class) is judged again as the shared cue.
                for a in f.also:
                    if a in before and rows[a].state != "confirmed":
                        judge(self.followed[a])
                continue
            best = max(tests, key=lambda t: (t.flip_rate if t.n else -1.0), default=None)
            suspected = any(not t.screened and t.n for t in tests)
            rows[c] = ClassRow(c, "suspected" if suspected else "clear", lifts.get(c), best)
        for c in range(num_classes):
            if c not in rows:
                rows[c] = ClassRow(c, "no usable map" if lifts.get(c) is None else "not tested",
                                   lifts.get(c))
        return EpochVerdict(epoch, [rows[c] for c in sorted(rows)],
                            list(changes.values()) + events)


def _moving(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
            norm_maps: Tensor, usable: Tensor, label: int, size: tuple[int, int],
            screen: bool, seed: int, batch_size: int) -> CausalTest:
    own = torch.nonzero((labels == label) & usable).flatten()
    wins = causal.image_hotspots(norm_maps[own], size)
    return causal.moving_test(model, images, labels, preds, label,
                              dict(zip(own.tolist(), wins, strict=True)), seed, batch_size,
                              screen=screen, norm_maps=norm_maps)


def sharing(norm_maps: Tensor, usable: Tensor, labels: Tensor, label: int,
            boxes: Sequence[tuple[int, Box]]) -> list[tuple[int, Box]]:
    """The (class, box) pairs of ``boxes`` (other classes' shortcuts) that the hotspot of
    class ``label``'s mean map touches: the boxes worth a :func:`shared_test`."""
    if not boxes:
        return []
    h, w = norm_maps.shape[-2:]
    side = box_search.window_size(h, w, box_search.SCREEN_FRACTION)
    hotspot = box_search.best_window(class_mean_maps(norm_maps, usable, labels, label), side)
    return [(c, b) for c, b in boxes if c != label and causal.iou(hotspot, b) > 0]


def shared_test(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                norm_maps: Tensor, usable: Tensor, label: int, other: int, box: Box,
                seed: int = 0, batch_size: int = 256) -> CausalTest:
    """Does class ``label`` carry the cue of class ``other``, a shortcut at ``box``?

    One patch on two classes tells the model "one of these two"; pasted, it sends a target
    to either class, whichever the rest of the image favours, and the split flickers from
    epoch to epoch (the quickstart's circle: 30% into circle and 48% into square, same
    patch). Counted towards either class, against controls counted the same way, the
    shared cue shows whole; :attr:`.causal.CausalTest.own_rate` must still reach
    ``MIN_FLIP_MARGIN`` towards ``label`` itself. The box is ``other``'s, already chosen
    by evidence, so every usable image of the class is a source."""
    sources = torch.nonzero((labels == label) & usable).flatten().tolist()
    return causal.box_test(model, images, labels, preds, label, box, sources,
                           seed=seed, batch_size=batch_size, screen=True,
                           norm_maps=norm_maps, also=(other,))


def shared_tests(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                 norm_maps: Tensor, usable: Tensor, label: int,
                 boxes: Sequence[tuple[int, Box]], seed: int = 0,
                 batch_size: int = 256) -> Iterator[CausalTest]:
    """:func:`shared_test` of class ``label`` with each of ``boxes`` (other classes'
    shortcuts: class, box) that its hotspot touches (:func:`sharing`), one at a time."""
    for other, box in sharing(norm_maps, usable, labels, label, boxes):
        yield shared_test(model, images, labels, preds, norm_maps, usable, label, other, box,
                          seed, batch_size)


def halves(labels: Tensor, usable: Tensor, label: int) -> tuple[list[int], list[int]]:
    """The class's images with a usable map split in two (alternately, in index order): the
    box is *chosen* on the first half's maps and *pasted* from the second half's images.
    Chosen and pasted from the same images, a class whose few objects happen to sit
    together would carry its objects in the box it chose; a cue is in every image."""
    own = torch.nonzero((labels == label) & usable).flatten().tolist()
    if len(own) < 2:
        return own, own
    return own[0::2], own[1::2]


#: Clusters of a class tested on their own: at most this share of the class (a larger one
#: is the class itself, already tested as a whole) and at least MIN_CLUSTER_SIZE images.
CLUSTER_MAX_SHARE = 0.8
#: Clusters tested per class: the largest one under CLUSTER_MAX_SHARE (each test costs
#: forwards of the model; on a 2-core CPU a ResNet-18 makes about 100 a second).
MAX_CLUSTER_TESTS = 1


def _testable(cluster: Any, own: set[int]) -> bool:
    """A group of the class's images worth its own test: not most of the class (that is the
    class-wide test), not too small, and the class has other images for its controls."""
    return bool(cluster.share <= CLUSTER_MAX_SHARE and len(cluster.indices) >= MIN_CLUSTER_SIZE
                and own - {int(i) for i in cluster.indices})


def search_class(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                 norm_maps: Tensor, usable: Tensor, label: int,
                 kinds: Sequence[str] = ("box",), clusters: Sequence[Any] = (),
                 seed: int = 0, batch_size: int = 256, maps_method: str = "",
                 peak_maps: tuple[str, Tensor, Tensor] | None = None) -> list[CausalTest]:
    """The screened tests of one class, in the order of ``kinds``, stopping at the first
    confirmed one. ``box``: the hotspot window screened, then the box searched;
    ``cluster``: the group of images whose own peaks recur at one place
    (:func:`.discovery.peak_group`), then the largest of ``clusters`` (from
    :func:`.discovery.class_hotspots`): each group's box cut from its members, against
    the same box cut from the class's other images too (``peak_maps``: a second
    explanation method's name, normalised maps and usable mask, whose own recurring peaks
    are a group too; ``maps_method`` names ``norm_maps``' method for the tests' ``peaks``);
    ``moving``: each image's own smallest-size hotspot; ``colour``: the colour move;
    ``filter``: one of the class's images' range laid over each target."""
    h, w = images.shape[-2:]
    side = box_search.window_size(h, w, box_search.SCREEN_FRACTION)
    chooser, sources = halves(labels, usable, label)
    mean_map = norm_maps[chooser].mean(0) if chooser else torch.zeros(h, w)
    out: list[CausalTest] = []
    for kind in kinds:
        if kind == "box":
            box = box_search.best_window(mean_map, side)
            tests = [causal.box_test(model, images, labels, preds, label, box, sources,
                                     seed=seed, batch_size=batch_size, screen=True,
                                     norm_maps=norm_maps, stop="flips")]
            if not tests[0].screened and tests[0].n:
                tests = [box_search.search_box(model, images, labels, preds, label, mean_map,
                                           sources, seed=seed, batch_size=batch_size,
                                           norm_maps=norm_maps)]
        elif kind == "cluster":
            own = set(torch.nonzero((labels == label) & usable).flatten().tolist())
            tests = []
            # The images whose own peaks recur at one place first (the purer group of a
            # cue on part of the class; in the maps, then in the second method's), then
            # the largest map clusters (numbered by size); each group with the maps its
            # box is chosen on (a peak group: the view that found it).
            views = [(maps_method, norm_maps, usable)] + ([peak_maps] if peak_maps else [])
            groups: list[tuple[Any, Tensor, str | None]] = []
            for method, maps, ok in views:
                cl = discovery.peak_group(maps, ok, labels, label)
                if (cl is not None and _testable(cl, own)
                        and all(cl.indices != g.indices for g, _, _ in groups)):
                    groups.append((cl, maps, method))
            groups += [(cl, norm_maps, None) for cl in clusters
                       if _testable(cl, own)][:MAX_CLUSTER_TESTS]
            for cl, maps, method in groups:
                members = [int(i) for i in cl.indices]
                rest = sorted(own - set(members))
                cmean = maps[members[0::2]].mean(0)  # chosen on half, pasted from the rest
                test = causal.box_test(model, images, labels, preds, label,
                                       box_search.best_window(cmean, side), members[1::2], rest,
                                       seed=seed, batch_size=batch_size, screen=True,
                                       kind="cluster", share=cl.share, norm_maps=norm_maps,
                                       stop="flips")
                if not test.screened and test.n:
                    test = box_search.search_box(
                        model, images, labels, preds, label, cmean, sources=members[1::2],
                        seed=seed, batch_size=batch_size, others_of_class=rest,
                        kind="cluster", share=cl.share, norm_maps=norm_maps)
                test.peaks = method
                tests.append(test)
                if test.confirmed:
                    break
        elif kind == "moving":
            # The smallest window: a moving cue is small, and an object's own best window
            # is itself class evidence wherever it sits (a small part of it is not).
            small = box_search.window_size(h, w, box_search.BOX_FRACTIONS[0])
            tests = [_moving(model, images, labels, preds, norm_maps, usable, label, small,
                             True, seed, batch_size)]
        elif kind == "filter":
            tests = [causal.filter_test(model, images, labels, preds, label, seed, batch_size,
                                        screen=True)]
        else:
            tests = [causal.colour_test(model, images, labels, preds, label, seed, batch_size,
                                        screen=True)]
        out += tests
        if any(t.confirmed for t in tests):
            break
    return out


def filter_tests(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                 num_classes: int, skip: Sequence[int] = (), seed: int = 0,
                 batch_size: int = 256) -> dict[int, CausalTest]:
    """The screened filter test (:func:`.causal.filter_test`) of every class but ``skip``
    (those already confirmed otherwise): a tint has no place, so no hotspot picks the
    classes. None on a collapsed epoch."""
    if causal.collapsed(preds):
        return {}
    return {c: causal.filter_test(model, images, labels, preds, c, seed, batch_size,
                                  screen=True)
            for c in range(num_classes) if c not in skip}


def summary_markdown(verdict: EpochVerdict, names: Sequence[str]) -> str:
    """The epoch's table: class, box, lift, flips vs controls, state (TensorBoard text)."""
    when = "before this run's training" if verdict.epoch < 0 else f"at epoch {verdict.epoch}"
    lines = [f"**Shortcuts {when}**", ""]
    if verdict.note:
        lines += [_md(verdict.describe_note(names)), ""]
    lines += ["| class | test | box | lift | flips | controls | margin (95%) | state |",
              "| --- | --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in verdict.rows:
        t = r.test
        box = r.followed.box if r.followed else (t.box if t else None)
        kind = t.kind if t else (r.followed.kind if r.followed else "")
        lift = "no usable map" if r.lift is None else f"{r.lift:.1f}"
        if t is None or not t.n:
            flips = ctrl = margin = "-"
        else:
            flips = f"{t.flip_rate:.0%} of {t.n}" + (
                f" ({t.own_rate:.0%} into {_md(names[r.label])} itself)"
                if t.own_rate is not None else "")
            ctrl = (" / ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in t.controls.items())
                    or "skipped (flips < 10%)")
            m = t.margin
            margin = (f"{m.mean:+.2f} {causal.interval_text(m, with_level=False)}"
                      if t.intervals else "-")
        state = r.state + (
            "" if not r.followed else " (known before this run)" if r.followed.since < 0
            else f" (since epoch {r.followed.since})")
        if r.cover is not None:
            state += (f"; its own images right {r.cover.accuracy:.0%}, "
                      f"{r.cover.accuracy_hotspot_covered:.0%} with the box covered, "
                      f"{r.cover.accuracy_random_covered:.0%} with a window elsewhere covered")
        place = causal.box_label(box) if kind in ("box", "cluster") else (
            "each image's own" if kind == "moving" else "whole image" if kind else "-")
        if t is not None and t.also:
            kind += ", shared with " + ", ".join(_md(names[a]) for a in t.also)
        lines.append(f"| {_md(names[r.label])} | {kind or '-'} | {place} | {lift} | {flips} | "
                     f"{ctrl} | {margin} | {state} |")
    lines += ["", "A shortcut is found when the pasted content turns more other-class images "
              "into the class than every control with the margin's whole 95% interval "
              "(clustered by source image) at or above 0.10; it stays confirmed while the "
              "interval is above 0 and the margin >= 0.10; gone: margin < 0.10 with its interval reaching 0; weakened: "
              "in between. A box shared with another class (one cue on both) counts a flip "
              "towards either, and at least 10% must turn into the class itself (5% to stay "
              "confirmed); under that, the class stays confirmed while covering the box in "
              "its own images costs at least 10 points of their accuracy more than covering "
              "a window elsewhere."]
    return "\n".join(lines)


def _md(text: str) -> str:
    """A class name safe in a markdown table cell (TensorBoard renders it as HTML)."""
    return html.escape(str(text)).replace("|", "&#124;")
