"""Audit measures against hand-computed cases."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import explain
from explain.measures import bias, faithfulness, localisation, registry, sanity, statistics
from lit_modules.backbones import VGG16GAP, ResNet18Cifar

ROOT = Path(__file__).resolve().parents[1]


class WeightedPixels(nn.Module):
    """A two-class 'model' whose class-0 probability is ``sum_ij W_ij x_0ij`` exactly.

    Softmax of ``[log p, log(1 - p)]`` is ``[p, 1 - p]``, so every score along a deletion or
    insertion curve is a known function of the pixels kept.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (x[:, 0] * self.w).sum((1, 2)).clamp(1e-9, 1 - 1e-9)
        return torch.stack([p.log(), (1 - p).log()], 1)


def _trapezoid(ys: list[float]) -> float:
    dx = 1 / (len(ys) - 1)
    return sum((a + b) / 2 * dx for a, b in zip(ys, ys[1:], strict=False))


@pytest.mark.parametrize("steps", [16, 4])
def test_deletion_insertion_auc_matches_hand_computation(steps: int) -> None:
    w = torch.arange(1, 17, dtype=torch.float32).view(4, 4) / 136.0  # sums to 1
    model = WeightedPixels(w)
    image = torch.ones(1, 3, 4, 4)
    target = torch.tensor([0])
    ordered = sorted(w.flatten().tolist(), reverse=True)  # the perfect map's pixel order
    per_step = 16 // steps
    kept_mass = [sum(ordered[: k * per_step]) for k in range(steps + 1)]
    deletion = [1 - m for m in kept_mass]  # mean fill = 0 removes each pixel's weight
    insertion = kept_mass  # starting from the zero (mean) image
    out = faithfulness.deletion_insertion(model, image, w[None], target, steps=steps, fill="mean",
                               start="mean")
    assert torch.allclose(out["deletion_curve"][0], torch.tensor(deletion), atol=1e-5)
    assert torch.allclose(out["insertion_curve"][0], torch.tensor(insertion), atol=1e-5)
    assert out["deletion_auc"].item() == pytest.approx(_trapezoid(deletion), abs=1e-5)
    assert out["insertion_auc"].item() == pytest.approx(_trapezoid(insertion), abs=1e-5)
    # The reversed map deletes the least important pixels first: a worse (larger) area.
    worse = faithfulness.deletion_insertion(model, image, -w[None], target, steps=steps, fill="mean",
                                 start="mean")
    assert worse["deletion_auc"].item() > out["deletion_auc"].item()
    assert worse["insertion_auc"].item() < out["insertion_auc"].item()


def test_deletion_batches_many_images_and_blur_keeps_a_constant_image() -> None:
    w = torch.full((8, 8), 1 / 64)
    model = WeightedPixels(w)
    images = torch.rand(5, 3, 8, 8) * 0.5
    maps = torch.rand(5, 8, 8)
    t = torch.zeros(5, dtype=torch.long)
    small = faithfulness.deletion_insertion(model, images, maps, t, steps=8, batch_size=9)
    big = faithfulness.deletion_insertion(model, images, maps, t, steps=8, batch_size=1000)
    assert torch.allclose(small["deletion_curve"], big["deletion_curve"], atol=1e-6)
    # First point of deletion and last of insertion: the untouched image.
    p = (images[:, 0] * w).sum((1, 2))
    assert torch.allclose(small["deletion_curve"][:, 0], p, atol=1e-5)
    assert torch.allclose(small["insertion_curve"][:, -1], p, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(faithfulness.gaussian_blur(flat, 2.0), flat, atol=1e-6)


def test_quadratic_schedule_and_shared_ends_follow_the_hand_computation() -> None:
    """A quadratic schedule deletes 1/16, 1/4, 9/16 of the pixels at its inner points;
    ends scored once and passed in give the curves computed without them."""
    w = torch.arange(1, 17, dtype=torch.float32).view(4, 4) / 136.0
    model = WeightedPixels(w)
    image = torch.ones(1, 3, 4, 4)
    target = torch.tensor([0])
    fractions = faithfulness.curve_fractions(4, "quadratic")
    assert fractions.tolist() == pytest.approx([0, 1 / 16, 1 / 4, 9 / 16, 1])
    ordered = sorted(w.flatten().tolist(), reverse=True)
    kept_mass = [sum(ordered[:k]) for k in (0, 1, 4, 9, 16)]
    ends = faithfulness.curve_ends(model, image, target, fill="mean", start="mean")
    assert ends["original"].item() == pytest.approx(1.0) and ends["filled"].item() < 1e-6
    shared = faithfulness.deletion_insertion(model, image, w[None], target, steps=4,
                                             schedule="quadratic", fill="mean", start="mean",
                                             ends=ends)
    alone = faithfulness.deletion_insertion(model, image, w[None], target, steps=4,
                                            schedule="quadratic", fill="mean", start="mean")
    for out in (shared, alone):
        assert out["deletion_curve"][0].tolist() == pytest.approx([1 - m for m in kept_mass],
                                                                  abs=1e-5)
        assert out["insertion_curve"][0].tolist() == pytest.approx(kept_mass, abs=1e-5)
        assert out["deletion_auc"].item() == pytest.approx(
            torch.trapezoid(torch.tensor([1 - m for m in kept_mass]), fractions).item(), abs=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        faithfulness.curve_fractions(4, "cubic")


def test_many_maps_score_each_distinct_perturbed_image_once() -> None:
    """Curves of several maps together equal their one-at-a-time curves, and a map that
    ranks the pixels as another does costs no model call of its own."""
    w = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    w = w / w.sum()
    seen: list[int] = []

    class Counting(WeightedPixels):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return super().forward(x)

    model = Counting(w)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(3, dtype=torch.long)
    a = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    b = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    maps = {"a": a, "a_scaled": 3 * a, "b": b}  # a_scaled ranks every pixel as a does
    ends = faithfulness.curve_ends(model, images, t)
    seen.clear()
    many = faithfulness.deletion_insertion_many(model, images, maps, t, steps=8, ends=ends)
    together = sum(seen)
    for name, m in maps.items():
        alone = faithfulness.deletion_insertion(model, images, m, t, steps=8, ends=ends)
        for key in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
            torch.testing.assert_close(many[name][key], alone[key], rtol=0, atol=1e-6)
    # a and a_scaled share all 7 inner points of each image; b adds its own 7 (its masks
    # may meet a's at a step, which only saves more): 2 curves x 3 images x at most 14.
    assert together <= 2 * 3 * 14
    assert together >= 2 * 3 * 7


def test_average_drop_and_increase_in_confidence() -> None:
    w = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    model = WeightedPixels(w)
    image = torch.full((2, 3, 2, 2), 0.8)  # p = 0.8
    keep_top = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # keeps all the evidence: O = Y
    keep_half = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # O = 0.4: a 50% drop
    out = faithfulness.average_drop_increase(model, image, torch.stack([keep_top, keep_half]),
                                  torch.tensor([0, 0]))
    assert out["average_drop"].tolist() == pytest.approx([0.0, 50.0], abs=1e-3)
    assert out["increase_in_confidence"].tolist() == [0.0, 0.0]


def test_map_inside_the_mask_scores_pointing_game_and_energy_one() -> None:
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:10, 3:12] = True
    maps = torch.zeros(2, 16, 16)
    maps[0, 5:8, 4:9] = torch.rand(3, 5) + 0.1
    maps[1, 4:10, 3:12] = 1.0
    out = localisation.localisation(maps, mask)
    assert out["pointing_game"].tolist() == [1.0, 1.0]
    assert out["energy_pointing_game"].tolist() == pytest.approx([1.0, 1.0])
    assert out["box_iou"][1].item() == pytest.approx(1.0)
    assert out["localisation_accuracy"][1].item() == 1.0
    outside = torch.zeros(1, 16, 16)
    outside[0, 12:, 12:] = 1.0
    miss = localisation.localisation(outside, mask[:1])
    assert miss["pointing_game"].item() == 0.0 and miss["energy_pointing_game"].item() == 0.0


def test_threshold_box_of_a_known_blob() -> None:
    maps = torch.zeros(2, 32, 32)
    # Image 0: a rectangular blob, a smaller weaker blob elsewhere, noise below 20%.
    maps[0] = 0.1 * torch.rand(32, 32)
    maps[0, 5:13, 8:21] = 1.0
    maps[0, 25:28, 25:28] = 0.6
    # Image 1: a Gaussian blob; above 20% of its peak is a disc of radius s*sqrt(2 ln 5).
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    s = 3.0
    maps[1] = torch.exp(-((yy - 15) ** 2 + (xx - 18) ** 2) / (2 * s * s))
    boxes, comp = localisation.threshold_boxes(maps, 0.2)
    assert boxes[0].tolist() == [8.0, 5.0, 21.0, 13.0]  # x0, y0, x1, y1 (exclusive ends)
    r = math.floor(s * math.sqrt(2 * math.log(5)))
    assert boxes[1].tolist() == [18.0 - r, 15.0 - r, 18.0 + r + 1, 15.0 + r + 1]
    assert not comp[0, 26, 26]  # the weaker blob is not the largest component
    empty, _ = localisation.threshold_boxes(torch.zeros(1, 8, 8))
    assert torch.isnan(empty).all()


def test_connected_components_use_8_connectivity() -> None:
    fg = torch.zeros(1, 6, 6, dtype=torch.bool)
    fg[0, 0, 0] = fg[0, 1, 1] = fg[0, 2, 2] = True  # a diagonal: one component
    fg[0, 4:6, 4:6] = True  # a separate square
    labels = localisation.connected_components(fg)[0]
    assert labels[0, 0] == labels[1, 1] == labels[2, 2] != 0
    assert labels[4, 4] == labels[5, 5] != labels[0, 0]
    assert len(set(labels[fg[0]].tolist())) == 2
    assert localisation.largest_component(fg)[0].sum().item() == 4


def test_box_iou_hand_cases() -> None:
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 0.0, 6.0, 4.0], [4.0, 4.0, 6.0, 6.0]])
    assert localisation.box_iou(a, b).tolist() == pytest.approx([8 / 24, 0.0])


def test_spearman_with_ties() -> None:
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # Average ranks: a -> [0, 1.5, 1.5, 3], b -> [0, 1, 2, 3]; Pearson of those by hand.
    ra, rb = [0, 1.5, 1.5, 3], [0, 1, 2, 3]
    ma, mb = sum(ra) / 4, sum(rb) / 4
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    assert sanity.spearman(a, b).item() == pytest.approx(cov / math.sqrt(var_a * var_b), abs=1e-6)
    assert sanity.spearman(b, b.flip(1)).item() == pytest.approx(-1.0)
    assert sanity.spearman(b, b.exp()).item() == pytest.approx(1.0)  # monotone: rank-equal
    assert torch.isnan(sanity.spearman(torch.ones(1, 4), b)).all()


def test_randomisation_changes_gradcam_maps_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = ResNet18Cifar()
    images = torch.randn(6, 3, 32, 32)
    targets = torch.arange(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = sanity.cascading_randomization(
        model, {"gradcam": lambda m: explain.run(m, images, "gradcam", targets=targets)}, seed=0
    )
    assert res["steps"][:2] == ["classifier", "layer4"]
    rho = res["spearman"]["gradcam"]  # [steps, images]
    assert rho.shape == (len(res["steps"]), 6)
    assert torch.nanmean(rho[0]).item() < 0.6  # a new head alone already changes the maps
    assert torch.nanmean(rho[-1]).item() < 0.5  # whole network random: well below 1
    assert res["maps"]["gradcam"].shape[0] == len(res["steps"]) + 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_cascade_order_for_both_backbones() -> None:
    assert [s for s, _ in sanity.cascade_steps(ResNet18Cifar())] == [
        "classifier", "layer4", "layer3", "layer2", "layer1", "trunk.conv1-relu"
    ]
    vgg = sanity.cascade_steps(VGG16GAP())
    assert vgg[0][0] == "classifier" and len(vgg) == 5  # head + 4 conv stages by width
    first_stage = vgg[-1][1]
    assert first_stage[0] == "trunk.0"  # the input convolution is randomised last


def _cue_model() -> nn.Module:
    """Predicts the class written in channel 2's mean, but class 0 whenever the cue is on.

    Class 0 itself has no code, so without the cue it is read as class 1.
    """

    class CueModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            code = x[:, 2].mean((1, 2)).round().long().clamp(1, 3)
            logits = torch.nn.functional.one_hot(code, 4).float() * 5
            cue = x[:, 1, 0, 0] < -1
            logits[cue] = torch.nn.functional.one_hot(torch.tensor(0), 4).float() * 5
            return logits + self.dummy

    return CueModel()


def test_counterfactual_flags_the_class_that_needs_the_cue() -> None:
    labels = torch.arange(4).repeat_interleave(6)
    clean = torch.zeros(24, 3, 4, 4)
    clean[:, 2] = labels.clamp(min=1).float().view(-1, 1, 1)
    stamped, control = clean.clone(), clean.clone()
    stamped[:, 1, 0, 0] = -2.0  # the cue the model reads
    control[:, 1, 0, 0] = 0.7  # a patch at the same place that it does not read
    cf = bias.counterfactual(_cue_model(), clean, stamped, control, labels, [0], 4)
    assert cf["acc_without"][0].item() == 0.0 and cf["acc_with"][0].item() == 1.0
    assert cf["acc_control"][0].item() == 0.0
    assert cf["reliance"][0].item() == 1.0 and cf["reliance_margin"][0].item() == 1.0
    assert cf["attraction"][0].item() == 1.0  # every other image turns into class 0
    assert cf["attraction_margin"][0].item() == 1.0
    assert bias.flag_classes(cf) == [0]
    # A model that ignores the cue: nothing changes, nothing is flagged.
    honest = bias.counterfactual(_cue_model(), clean, clean, clean, labels, [0], 4)
    assert bias.flag_classes(honest) == []
    # A fragile model that reads any patch the same way: the cue moves everything to
    # class 0, but so does the control, so the margin is 0 and nothing is flagged.
    fragile = bias.counterfactual(_cue_model(), clean, stamped, stamped, labels, [0], 4)
    assert fragile["attraction"][0].item() == 1.0 and fragile["attraction_margin"][0] == 0.0
    assert bias.flag_classes(fragile) == []
    # A 20-point margin carried by one image of five has an interval reaching below 0.
    noisy = dict(cf, reliance_margin=torch.tensor([0.2, 0, 0, 0]),
                 reliance_lo=torch.tensor([-0.36, 0, 0, 0]),
                 attraction_margin=torch.zeros(4), attraction_lo=torch.zeros(4))
    assert bias.flag_classes(noisy) == []


def test_t_quantile_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 15, 30, 120):
        for p in (0.9, 0.975, 0.995):
            assert statistics.t_quantile(p, df) == pytest.approx(
                scipy_stats.t.ppf(p, df), rel=1e-7)
    assert statistics.t_quantile(0.025, 7) == pytest.approx(-scipy_stats.t.ppf(0.975, 7))
    mean, lo, hi = statistics.mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0]))
    half = scipy_stats.t.ppf(0.975, 4) * torch.tensor([1.0, 2, 3, 4, 6]).std().item() / 5**0.5
    assert (mean, lo, hi) == pytest.approx((3.2, 3.2 - half, 3.2 + half))


def test_registry_declares_directions_and_refuses_duplicates() -> None:
    names = registry.available_measures()
    for category in ("faithfulness", "localisation", "sanity", "bias"):
        assert registry.available_measures(category), category
    assert registry.get_measure("deletion_auc").higher_is_better is False
    assert registry.get_measure("insertion_auc").higher_is_better is True
    assert all(registry.get_measure(n).category in registry.CATEGORIES for n in names)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_measure("box_iou", category="localisation", higher_is_better=True,
                           description="again")
    with pytest.raises(KeyError, match="deletion_auc"):
        registry.get_measure("deletion")


def test_summaries_and_intervals() -> None:
    s = statistics.summarize(torch.tensor([1.0, 2.0, 3.0, float("nan")]), "box_iou")
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["higher_is_better"] is True
    lo, hi = s["ci95"]
    assert lo < 2.0 < hi
    p = statistics.proportion(0, 10)
    assert p["value"] == 0.0 and p["ci95"][0] == 0.0 and 0.2 < p["ci95"][1] < 0.35
    means, counts = statistics.group_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert means[0] == 2.0 and torch.isnan(means[1]) and counts.tolist() == [2, 0, 1]


@pytest.mark.parametrize("package", ["explain", "explain.measures"])
def test_engine_and_measures_import_neither_lightning_nor_matplotlib(package: str) -> None:
    code = (
        f"import sys, pkgutil, importlib, {package} as p; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'matplotlib')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
