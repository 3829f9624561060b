"""Finding an undeclared shortcut: hotspots, suspects, clusters, transplant and cover tests.

Everything is synthetic and seeded: 10 classes of 6x6 zero-mean colour templates at random
places (never in the top-left corner) on 32x32 images, and hand-built models that read
the template wherever it is (template matching + global max), optionally plus a fixed
4x4 top-left region.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explain
from explain.measures import discovery as D

SIDE = 32
NUM_CLASSES = 10
OBJ = 6
CUE = (0, 0, 4, 4)  # x0, y0, x1, y1: the region the shortcut model reads
CUE_CLASS = 3


def templates() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (NUM_CLASSES, 3, OBJ, OBJ), generator=g).float() * 2 - 1
    # Zero mean: a flat background of any level scores 0 against every template.
    return t - t.mean(dim=(2, 3), keepdim=True)


def make_images(per_class: int = 24, seed: int = 0, cue_share: float = 1.0,
                spread: float = 0.0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects at random places; ``cue_share`` of class 3 gets the top-left region +3.

    ``spread``: each image's background level is uniform in ``[-spread, spread]``.
    """
    g = torch.Generator().manual_seed(seed)
    t = templates()
    n = per_class * NUM_CLASSES
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    level = (torch.rand(n, generator=g) * 2 - 1) * spread
    x = level.view(-1, 1, 1, 1) + noise * torch.randn(n, 3, SIDE, SIDE, generator=g)
    pos = torch.randint(OBJ, SIDE - OBJ + 1, (n, 2), generator=g)
    cue = torch.rand(n, generator=g) < cue_share
    for i in range(n):
        y0, x0 = pos[i].tolist()
        x[i, :, y0:y0 + OBJ, x0:x0 + OBJ] += t[labels[i]]
        if labels[i] == CUE_CLASS and cue[i]:
            x[i, :, CUE[1]:CUE[3], CUE[0]:CUE[2]] += 3.0
    return x, labels


class ObjectModel(nn.Module):
    """Reads the object anywhere; ``cue`` adds a class-3 bump from the top-left region.

    ``"bright"``: class 3 when the region is bright (a real shortcut). ``"fragile"``:
    class 3 when the region differs from the image's own background at all, so any pasted
    patch from another image flips it.
    """

    def __init__(self, cue: str = "none") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES, OBJ, bias=False)
        self.drop = nn.Dropout(0.5)  # to check that eval mode is used and restored
        with torch.no_grad():
            self.conv.weight.copy_(templates())
        self.cue = cue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.drop(0.1 * self.conv(x).amax(dim=(2, 3)))
        if self.cue == "none":
            return logits
        region = x[:, :, CUE[1]:CUE[3], CUE[0]:CUE[2]].mean(dim=(1, 2, 3))
        if self.cue == "bright":
            bump = 20 * F.relu(region - 1.5)
        else:
            bump = 1000 * F.relu((region - x.mean(dim=(1, 2, 3))).abs() - 0.02)
        return logits + bump[:, None] * F.one_hot(torch.tensor(CUE_CLASS), NUM_CLASSES)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def blob_maps(labels: torch.Tensor, seed: int, cue: torch.Tensor | None = None,
              cue_box: tuple[int, int, int, int] = (26, 26, 30, 30)) -> torch.Tensor:
    """Hand-made maps: a Gaussian blob at a random place, faint noise, optionally a cue."""
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    yy, xx = torch.meshgrid(torch.arange(SIDE * 1.0), torch.arange(SIDE * 1.0), indexing="ij")
    c = torch.rand(n, 2, generator=g) * (SIDE - 8) + 4
    m = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 12.5)
    m = m / m.flatten(1).sum(1).view(-1, 1, 1) + 2e-4 * torch.rand(n, SIDE, SIDE, generator=g)
    if cue is not None:
        x0, y0, x1, y1 = cue_box
        m[cue, y0:y1, x0:x1] += 1.0 / ((x1 - x0) * (y1 - y0))
    return m


@pytest.fixture(scope="module")
def shortcut_run() -> tuple[D.DiscoveryResult, ObjectModel, dict]:
    x, y = make_images()
    model = ObjectModel("bright").train()
    maps = explain.run(model, x, "saliency", targets=y)
    state = torch.random.get_rng_state()
    result = D.discover(model, x, y, maps, seed=0)
    info = {"rng_same": torch.equal(state, torch.random.get_rng_state()),
            "modes": [m.training for m in model.modules()], "n": len(y)}
    return result, model, info


# -- the shortcut is found, located and confirmed ----------------------------------------


def test_fixed_region_model_is_a_confirmed_suspect(shortcut_run) -> None:
    result, _, _ = shortcut_run
    assert [s.label for s in result.suspects] == [CUE_CLASS]
    h = result.classes[CUE_CLASS]
    assert h.suspect and h.z >= D.SUSPECT_Z and h.hotspot.lift >= 10
    others = [c.z for c in result.classes if c.label != CUE_CLASS]
    assert max(others) < D.SUSPECT_Z
    assert result.window_size == (6, 6)
    assert h.hotspot.window == (0, 0, 6, 6)
    assert iou(h.hotspot.box, CUE) >= 0.5
    assert h.hotspot.consistency == 1.0
    t = result.transplants[CUE_CLASS]
    assert t.confirmed and result.confirmed == [CUE_CLASS]
    assert t.flip_rate == 1.0 and t.flip_rate_random_window == 0.0
    assert t.flip_rate_other_class == 0.0
    assert t.vs_random_window.low > 0.9 and t.vs_other_class.low > 0.9
    assert len(t.targets) == 9 * 24  # every other-class image was predicted right before
    assert t.examples_after.shape == t.examples_before.shape == (8, 3, SIDE, SIDE)
    # The example shows the pasted cue and nothing else changed.
    diff = (t.examples_after - t.examples_before).abs().sum(1) > 0
    assert diff[:, 6:, :].sum() == 0 and diff[:, :, 6:].sum() == 0
    assert bool(diff[:, :4, :4].all())
    # Controls never paste from inside the hotspot.
    for x0, y0, _, _ in t.control_windows:
        assert x0 >= 6 or y0 >= 6


def test_cover_and_model_state(shortcut_run) -> None:
    result, model, info = shortcut_run
    cover = result.covers[CUE_CLASS]
    # The model reads the object too: covering the cue keeps class 3 right here.
    assert cover.accuracy == 1.0 and len(cover.indices) == 24
    assert 0.0 <= cover.accuracy_hotspot_covered <= 1.0
    assert cover.drop_vs_random.n == 24
    # Train flags restored (the dropout would have made predictions noisy), RNG untouched.
    assert all(info["modes"]) and all(m.training for m in model.modules())
    assert info["rng_same"]


def test_cover_drops_accuracy_when_the_class_needs_the_cue() -> None:
    x, y = make_images(per_class=12, seed=1)
    model = ObjectModel("bright")
    with torch.no_grad():
        model.conv.weight[CUE_CLASS] = 0  # class 3 has nothing but the shortcut
    cover = D.cover_test(model, x, y, CUE_CLASS, (0, 0, 6, 6), fill=0.0, seed=0)
    assert cover.accuracy == 1.0
    assert cover.accuracy_hotspot_covered == 0.0 and cover.accuracy_random_covered == 1.0
    assert cover.drop_vs_random.mean == 1.0 and cover.drop_vs_random.low == 1.0
    assert len(cover.example_indices) == 8


def test_object_reading_model_is_not_flagged() -> None:
    x, y = make_images()  # class 3 still carries the cue; this model ignores it
    model = ObjectModel("none")
    maps = explain.run(model, x, "saliency", targets=y)
    result = D.discover(model, x, y, maps, seed=0)
    assert result.suspects == [] and result.transplants == {} and result.confirmed == []
    assert max(c.z for c in result.classes) < D.SUSPECT_Z


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_object_maps_give_no_suspect(seed: int) -> None:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(30)
    classes = D.class_hotspots(blob_maps(labels, seed), labels, NUM_CLASSES, cluster=False)
    assert D.find_suspects(classes) == []
    lifts = [c.hotspot.lift for c in classes]
    assert max(lifts) < 10 and min(lifts) > 1
    assert max(c.z for c in classes) < D.SUSPECT_Z


def test_fragile_model_is_suspect_but_not_confirmed() -> None:
    # Any patch that is not the target's own background flips towards class 3.
    x, y = make_images(spread=3.0, noise=0.02)
    model = ObjectModel("fragile")
    maps = explain.run(model, x, "saliency", targets=y)
    result = D.discover(model, x, y, maps, seed=0)
    assert [s.label for s in result.suspects] == [CUE_CLASS]
    t = result.transplants[CUE_CLASS]
    # The hotspot alone looks damning...
    assert t.flip_rate > 0.95
    # ... but the controls flip as often, so the margin is no evidence.
    assert t.flip_rate_random_window > 0.95 and t.flip_rate_other_class > 0.95
    assert t.vs_random_window.low <= 0
    assert t.vs_random_window.mean < D.MIN_FLIP_MARGIN
    assert t.vs_other_class.mean < D.MIN_FLIP_MARGIN
    assert not t.confirmed and result.confirmed == []


# -- a cue on part of a class is its own cluster ------------------------------------------


def half_class_cue(seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """30 labels a class; about half of class 5 carries a cue at the bottom right (seeded).
    Returns labels, the carriers' mask and the cue's box."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(30)
    g = torch.Generator().manual_seed(100 + seed)
    cue = (labels == 5) & (torch.rand(labels.numel(), generator=g) < 0.5)
    return labels, cue, (26, 26, 30, 30)


@pytest.mark.parametrize("seed", [0, 1])
def test_cue_on_half_a_class_is_its_own_cluster(seed: int) -> None:
    labels, cue, cue_box = half_class_cue(seed)
    classes = D.class_hotspots(blob_maps(labels, seed, cue, cue_box), labels, NUM_CLASSES,
                               seed=seed)
    carriers = set(torch.nonzero(cue).flatten().tolist())
    best = max(classes[5].clusters, key=lambda cl: len(carriers & set(cl.indices)))
    found = carriers & set(best.indices)
    # Measured over 12 seeds: purity >= 0.8 with recall >= 0.7 in 7 of them; the weakest
    # seed still gives 0.56 / 0.5. The hotspot is what the report needs to be right.
    assert len(found) / len(best.indices) >= 0.55  # purity
    assert len(found) / len(carriers) >= 0.5  # recall
    assert abs(best.share - len(best.indices) / 30) < 1e-9
    assert iou(best.hotspot.box, cue_box) >= 0.5
    assert best.hotspot.consistency >= 0.5
    assert 2 <= len(classes[5].clusters) <= D.MAX_CLUSTERS
    assert sum(len(cl.indices) for cl in classes[5].clusters) == 30


@pytest.mark.parametrize("seed", [0, 1])
def test_the_images_whose_peaks_recur_on_a_half_class_cue_are_its_peak_group(seed: int) -> None:
    labels, cue, cue_box = half_class_cue(seed)
    norm, usable = D.normalise_maps(blob_maps(labels, seed, cue, cue_box))
    group = D.peak_group(norm, usable, labels, 5)
    assert group is not None
    carriers = set(torch.nonzero(cue).flatten().tolist())
    # Every carrier; over 12 seeds nothing else in 11, two blobs beside the cue in one.
    assert carriers <= set(group.indices) and len(group.indices) <= len(carriers) + 2
    assert group.share == pytest.approx(len(group.indices) / 30)
    assert iou(group.hotspot.box, cue_box) >= 0.5
    # Blobs anywhere: no other class's peaks recur anywhere.
    assert [c for c in range(NUM_CLASSES) if D.peak_group(norm, usable, labels, c)] == [5]
    # Images at their own size: the same maps with 16 empty columns on the right (the
    # peak window is then 4 x 6 px, a sixth wider than the cue).
    wide = torch.cat([norm, torch.zeros(*norm.shape[:2], 16)], dim=2)
    again = D.peak_group(wide, usable, labels, 5)
    assert again is not None and carriers <= set(again.indices)
    assert len(again.indices) <= len(carriers) + 2
    assert iou(again.hotspot.box, cue_box) >= 0.5


def test_a_place_where_every_class_peaks_is_no_peak_group() -> None:
    """Every class's maps peak at one place (objects centred, say): a class shares it with
    the others, so nothing singles it out."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(30)
    everyone = torch.ones(labels.numel(), dtype=torch.bool)
    norm, usable = D.normalise_maps(blob_maps(labels, 0, everyone, (14, 14, 18, 18)))
    assert all(D.peak_group(norm, usable, labels, c) is None for c in range(NUM_CLASSES))
    # The same place on half of class 5 alone: found.
    norm, usable = D.normalise_maps(blob_maps(labels, 0, (labels == 5) & (torch.arange(
        labels.numel()) % 2 == 0), (14, 14, 18, 18)))
    assert D.peak_group(norm, usable, labels, 5) is not None


def test_clusters_are_seeded_and_leave_the_global_rng_alone() -> None:
    labels = torch.zeros(30, dtype=torch.long)
    norm, _ = D.normalise_maps(blob_maps(labels, 0))
    state = torch.random.get_rng_state()
    a = D.cluster_maps(norm, seed=3)
    b = D.cluster_maps(norm, seed=3)
    assert torch.equal(a, b) and torch.equal(state, torch.random.get_rng_state())
    counts = torch.bincount(a)
    assert bool((counts[:-1] >= counts[1:]).all())  # numbered by size


# -- pieces -------------------------------------------------------------------------------


def test_paired_interval_known_values() -> None:
    d = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    iv = D.paired_interval(d)
    se = math.sqrt(0.7 * 0.3 * 10 / 9) / math.sqrt(10)  # sample sd / sqrt(n)
    assert iv.mean == pytest.approx(0.7)
    assert iv.high - iv.mean == pytest.approx(2.262157 * se, rel=1e-5)
    assert iv.low == pytest.approx(0.7 - 2.262157 * se, rel=1e-5) and iv.excludes_zero_above
    flat = D.paired_interval(torch.zeros(8))
    assert flat.low == flat.high == 0.0 and not flat.excludes_zero_above
    assert D.paired_interval(torch.empty(0)).n == 0


def test_robust_z_floor_and_window_size() -> None:
    z = D.robust_z(torch.tensor([2.0, 2.0, 2.0, 2.0, 3.0]))
    # MAD is 0: the floor (0.2 x median 2.0 = 0.4) sets the scale.
    assert D.MAD_FLOOR_FRACTION == 0.2
    assert z[-1].item() == pytest.approx(1.0 / (1.4826 * 0.4), rel=1e-5)
    assert z[:4].abs().max().item() == 0.0
    z = D.robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))  # median 3, MAD 1
    assert z[-1].item() == pytest.approx(97 / 1.4826, rel=1e-5)
    assert D.window_size(32, 32) == (6, 6) and D.window_size(64, 96) == (12, 18)
    assert D.window_size(4, 4, 0.01) == (1, 1)


def test_hotspot_lift_and_consistency_by_hand() -> None:
    maps = torch.zeros(4, 8, 8)
    maps[:, 0:2, 0:2] = 1.0  # every map: all its mass in the top-left 2x2
    maps[3] = 1.0  # except one flat map
    hs = D.hotspot(D.normalise_maps(maps)[0], (2, 2))
    assert hs.window == (0, 0, 2, 2)
    assert hs.area_share == pytest.approx(4 / 64)
    assert hs.mass == pytest.approx((3 * 1.0 + 4 / 64) / 4)
    assert hs.lift == pytest.approx(hs.mass / (4 / 64))
    assert hs.consistency == 0.75 and hs.agreeing == [0, 1, 2]
    norm, ok = D.normalise_maps(torch.stack([-torch.ones(8, 8), torch.full((8, 8), math.nan)]))
    assert not ok.any() and norm.abs().sum() == 0
