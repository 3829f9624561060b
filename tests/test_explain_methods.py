"""Method-level behaviour: exact identities, closed forms and options.

Exact identities on the real backbones (random weights, random inputs): Grad-CAM =
HiResCAM = CAM up to scale on GAP heads, Integrated Gradients completeness, saliency equals
the autograd gradient. Closed forms on GAP + Linear heads: Ablation-CAM's score drop and
Recipro-CAM's logit map. Options and batching on the tiny test network.
"""

from __future__ import annotations

import pytest
import torch
from helpers import pearson
from torch import nn

import explain
from explain.cam import principal_projection
from explain.gradient import quadrature
from explain.perturbation import grid_segments, kmeans_segments
from lit_modules.backbones import resnet18_cifar, vgg16_gap

BACKBONES = {"resnet18_cifar": resnet18_cifar, "vgg16_gap": vgg16_gap}


def _backbone(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BACKBONES[name]().eval()


def _images(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- exact identities -----------------------------------------------------------------------
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_gradcam_equals_hirescam_equals_cam_on_gap_heads(backbone):
    model = _backbone(backbone, seed=11)
    x = _images(2, seed=12)
    cam = explain.run(model, x, "cam")
    grad = explain.run(model, x, "gradcam")
    hires = explain.run(model, x, "hirescam")
    hw = model.features(x[:1]).shape[-2:].numel()
    # Exactly, not only up to correlation: Grad-CAM = HiResCAM = CAM / (h w).
    scale = cam.abs().amax()
    torch.testing.assert_close(grad * hw, cam, atol=1e-5 * float(scale), rtol=1e-4)
    torch.testing.assert_close(hires * hw, cam, atol=1e-5 * float(scale), rtol=1e-4)
    for other in (grad, hires):
        assert pearson(cam.flatten(0, 1), other.flatten(0, 1)).min() > 0.9999


def _completeness_error(model, x, targets, per_image=False, **options) -> torch.Tensor:
    maps = explain.run(model, x, "integrated_gradients", targets=targets, **options)
    baseline = options.get("baseline")
    with torch.no_grad():
        base = torch.zeros_like(x) if baseline is None else torch.full_like(x, baseline)
        diff = model(x) - model(base)  # [B, K]
    if targets is not None:
        diff = diff[torch.arange(x.shape[0]), targets].unsqueeze(1)
        maps = maps.unsqueeze(1)
    total = maps.sum((-2, -1))
    scale = diff.abs().amax(1, keepdim=True) if per_image else diff.abs()
    return (total - diff).abs() / scale


@pytest.mark.parametrize(
    ("backbone", "rule", "baseline"),
    [("resnet18_cifar", "gausslegendre", None), ("vgg16_gap", "gausslegendre", 0.5)],
)
def test_integrated_gradients_completeness(backbone, rule, baseline):
    # sum of attributions = score(x) - score(baseline), within 1% at 64 steps
    model = _backbone(backbone, seed=21)
    x = _images(2, seed=22)
    err = _completeness_error(
        model, x, torch.tensor([2, 7]), steps=64, rule=rule, baseline=baseline, batch_size=128
    )
    assert err.max() < 0.01, f"completeness off by {err.max():.3%}"


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_integrated_gradients_completeness_every_class(rule, tiny_explain_net):
    # All classes from one run; a class whose score barely moves is judged against the
    # image's largest score change (the quadrature error does not shrink with it).
    model = tiny_explain_net().eval()
    x = _images(3, seed=23, size=16)
    err = _completeness_error(model, x, None, per_image=True, steps=128, rule=rule)
    assert err.max() < 0.01, f"completeness off by {err.max():.3%}"


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_saliency_is_the_autograd_gradient(backbone):
    model = _backbone(backbone, seed=31)
    x = _images(2, seed=32)
    maps = explain.run(model, x, "saliency")
    signed = explain.run(model, x, "saliency", reduce="sum")
    for c in (0, 4, 9):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[:, c].sum(), xi)
        torch.testing.assert_close(maps[:, c], g.abs().amax(1), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(signed[:, c], g.sum(1), rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


# -- closed forms on a GAP + Linear head ---------------------------------------------------
def test_ablationcam_matches_the_closed_form_score_drop():
    # Zeroing channel k of the last map lowers logit c by W[c, k] * mean(A_k), exactly.
    model = _backbone("resnet18_cifar", seed=41)
    x = _images(2, seed=42)
    with torch.no_grad():
        act = model.features(x)
        logits = model(x)
    drop = torch.einsum("ck,bk->bck", model.classifier.weight, act.mean((-2, -1)))
    for relative in (False, True):
        w = (drop / logits.unsqueeze(-1) if relative else drop).detach()
        expected = torch.einsum("bck,bkhw->bchw", w, act).clamp_min(0)
        expected = explain.upsample(expected, (32, 32))
        maps = explain.run(model, x, "ablationcam", relative=relative)
        torch.testing.assert_close(
            maps, expected, rtol=2e-3, atol=1e-4 * float(expected.abs().max())
        )


def test_reciprocam_logit_point_equals_bias_plus_cam():
    model = _backbone("vgg16_gap", seed=51)
    x = _images(2, seed=52)
    recipro = explain.run(model, x, "reciprocam", score="logit", kernel="point")
    cam = explain.run(model, x, "cam", relu=False)
    hw = model.features(x[:1]).shape[-2:].numel()
    expected = model.classifier.bias.view(1, -1, 1, 1) + cam / hw
    torch.testing.assert_close(recipro, expected.detach(), rtol=1e-4, atol=1e-5)
    # Softmax scores: the class probabilities of those logits at each cell, upsampled.
    probs = explain.run(model, x, "reciprocam")
    with torch.no_grad():
        act = model.features(x)
        # Only cell (i, j) kept: GAP gives A[:, i, j] / hw, the head adds the bias.
        cells = torch.einsum("ck,bkhw->bchw", model.classifier.weight, act) / hw
        cells = cells + model.classifier.bias.view(1, -1, 1, 1)
    expected_probs = explain.upsample(cells.softmax(1), (32, 32))
    torch.testing.assert_close(probs, expected_probs, rtol=1e-4, atol=1e-6)
    gauss = explain.run(model, x, "reciprocam", kernel="gaussian")
    assert gauss.shape == probs.shape and not torch.allclose(gauss, probs)


def test_eigencam_is_the_sign_fixed_first_principal_component():
    model = _backbone("resnet18_cifar", seed=61)
    x = _images(2, seed=62)
    maps = explain.run(model, x, "eigencam", relu=False)
    assert torch.equal(maps[:, 0], maps[:, 7])  # class-agnostic: one map for every class
    assert not explain.get("eigencam").class_specific
    with torch.no_grad():
        act = model.features(x).double()
    rows = act.flatten(2).transpose(1, 2)
    rows = rows - rows.mean(1, keepdim=True)
    _, vecs = torch.linalg.eigh(rows.transpose(1, 2) @ rows)  # covariance eigenvectors
    axis = vecs[..., -1]
    axis = axis * torch.where(axis.sum(-1, keepdim=True) < 0, -1.0, 1.0).double()
    proj = torch.einsum("bnk,bk->bn", rows, axis).reshape(2, *act.shape[-2:])
    torch.testing.assert_close(
        principal_projection(act.float()).double(),
        proj,
        rtol=1e-4,
        atol=1e-4 * float(proj.abs().max()),
    )
    torch.testing.assert_close(
        maps[:, 0],
        explain.upsample(proj.float(), (32, 32)),
        rtol=1e-4,
        atol=1e-4 * float(proj.abs().max()),
    )


# -- options, batching, seeding (tiny network) ---------------------------------------------
CHUNKED = {
    "scorecam": {},
    "ablationcam": {},
    "reciprocam": {"kernel": "gaussian"},
    "occlusion": {"window": 4, "stride": 2},
    "lime": {"samples": 40},
    "integrated_gradients": {"steps": 7},
    "smoothgrad": {"samples": 5},
}


@pytest.mark.parametrize("split", [True, False], ids=["split", "hooked"])
@pytest.mark.parametrize("method", sorted(CHUNKED))
def test_batch_size_does_not_change_the_result(method, split, tiny_explain_net):
    model = tiny_explain_net(split=split)
    x = _images(3, seed=71, size=16)
    kw = dict(CHUNKED[method], **({} if split else {"layer": "block"}))
    if not explain.get(method).needs_layer:
        kw.pop("layer", None)
    small = explain.run(model, x, method, batch_size=1, **kw)
    big = explain.run(model, x, method, batch_size=10_000, **kw)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-5 * float(big.abs().max()))


def test_scorecam_score_options_differ_as_documented(tiny_explain_net):
    model = tiny_explain_net()
    x = _images(2, seed=81, size=16)
    logit = explain.run(model, x, "scorecam", score="logit")
    soft = explain.run(model, x, "scorecam", score="softmax")
    chan = explain.run(model, x, "scorecam", score="channel_softmax")
    assert not torch.allclose(logit, soft) and not torch.allclose(soft, chan)
    with pytest.raises(explain.ExplainError, match="score must be"):
        explain.run(model, x, "scorecam", score="probability")


def _scorecam_by_hand(model: nn.Module, x: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Score-CAM with logit scores as a plain loop, one masked forward per image and channel
    (only the ``top_k`` channels of largest sum A_k^2 per image when given)."""
    side = x.shape[-1]
    with torch.no_grad():
        act = model.features(x)
        up = nn.functional.interpolate(act, size=(side, side), mode="bilinear",
                                       align_corners=False)
        weights = torch.zeros(len(x), act.shape[1], model(x[:1]).shape[1])
        for b in range(len(x)):
            channels = (range(act.shape[1]) if top_k is None
                        else act[b].pow(2).sum((1, 2)).topk(top_k).indices.tolist())
            for k in channels:
                m = up[b, k]
                m = (m - m.min()) / (m.max() - m.min() + 1e-8)
                weights[b, k] = model((x[b] * m)[None])[0]
        expected = torch.einsum("bkc,bkhw->bchw", weights, act).clamp_min(0)
    return explain.upsample(expected, (side, side))


def test_scorecam_matches_a_plain_loop_with_dead_channels(tiny_explain_net):
    # Dead (constant) channels give all-zero masks; the engine scores them with one blank
    # forward. A plain loop over every channel must agree.
    model = tiny_explain_net().eval()
    with torch.no_grad():
        model.block.bn2.weight[:3] = 0
        model.block.bn2.bias[:3] = -50.0  # channels 0-2 end at zero after the ReLU
    x = _images(2, seed=82, size=16)
    maps = explain.run(model, x, "scorecam", score="logit")
    with torch.no_grad():
        assert (model.features(x)[:, :3] == 0).all()
    expected = _scorecam_by_hand(model, x)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_occlusion_a_linear_model_gives_its_weights():
    # For logits = sum(w * x), a 1x1 window with zero fill drops logit c by sum_ch w*x.
    torch.manual_seed(91)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x = _images(2, seed=92, size=6)
    maps = explain.run(model, x, "occlusion", window=1, stride=1)
    w = model[1].weight.detach().view(4, 3, 6, 6)
    expected = torch.einsum("cdhw,bdhw->bchw", w, x)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    # 4x4 windows at offsets 0 and 2: a pixel gets the mean drop of the windows on it.
    wide = explain.run(model, x, "occlusion", window=4, stride=2, fill=0.25)
    contrib = torch.einsum("cdhw,bdhw->bchw", w, x - 0.25)
    total, count = torch.zeros(2, 4, 6, 6), torch.zeros(6, 6)
    for top in (0, 2):
        for left in (0, 2):
            window = (..., slice(top, top + 4), slice(left, left + 4))
            total[window] += contrib[window].sum((-2, -1), keepdim=True)
            count[window[1:]] += 1
    torch.testing.assert_close(wide, total / count, rtol=1e-4, atol=1e-5)
    with pytest.raises(explain.ExplainError, match="skips pixels"):
        explain.run(model, x, "occlusion", window=2, stride=3)


def test_lime_recovers_a_linear_model_and_is_seeded():
    # The score of a linear model is exactly linear in the on/off pattern of the segments,
    # so the weighted least squares surrogate recovers each segment's contribution.
    torch.manual_seed(101)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x = _images(2, seed=102, size=8)
    maps = explain.run(model, x, "lime", cells=4, samples=200, ridge=1e-6)
    w = model[1].weight.detach().view(3, 3, 8, 8)
    contrib = torch.einsum("cdhw,bdhw->bchw", w, x)  # per-pixel contribution
    seg = nn.functional.avg_pool2d(contrib, 2) * 4  # per 2x2 segment sum
    expected = seg.repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(maps, expected, rtol=1e-3, atol=1e-4)
    again = explain.run(model, x, "lime", cells=4, samples=200, ridge=1e-6)
    assert torch.equal(maps, again)
    other = explain.run(model, x, "lime", cells=4, samples=30, seed=5)
    assert not torch.allclose(other, explain.run(model, x, "lime", cells=4, samples=30, seed=6))
    # k-means segments: the same exact recovery, each pixel getting its segment's sum.
    labels = kmeans_segments(x, 2)
    kmeans = explain.run(model, x, "lime", segments="kmeans", cells=2, samples=60, ridge=1e-6)
    onehot = nn.functional.one_hot(labels.flatten(1), 4).double()  # [B, HW, S]
    per_segment = torch.einsum("bcp,bps->bcs", contrib.flatten(2).double(), onehot)
    expected = torch.einsum("bcs,bps->bcp", per_segment, onehot).view(2, 3, 8, 8)
    torch.testing.assert_close(kmeans.double(), expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(explain.ExplainError, match="'grid' or 'kmeans'"):
        explain.run(model, x, "lime", segments="slic")


def test_kmeans_segments_are_never_empty():
    # Two-colour noise with a small compactness: plain k-means leaves 2 of these 9
    # clusters empty in both images; each must end with a pixel.
    x = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(19)) > 0.5).float()
    labels = kmeans_segments(x, 3, compactness=0.1)
    counts = torch.stack([torch.bincount(lab.flatten(), minlength=9) for lab in labels])
    assert counts.shape == (2, 9) and counts.min() >= 1 and counts.sum(1).tolist() == [64, 64]
    with pytest.raises(explain.ExplainError, match="cells"):
        kmeans_segments(x[..., :2, :2], 3)
    # LIME caps cells at the image side: 8 cells on 4x4 images is one segment a pixel.
    grid = grid_segments(1, (4, 4), 4, x.device)
    assert torch.equal(grid[0], torch.arange(16).view(4, 4))


def test_smoothgrad_without_noise_is_its_base_method(tiny_explain_net):
    model = tiny_explain_net()
    x = _images(2, seed=111, size=16)
    for base, opts in (("saliency", {}), ("integrated_gradients", {"steps": 4}), ("gradcam", {})):
        plain = explain.run(model, x, base, **opts)
        smooth = explain.run(
            model, x, "smoothgrad", base_method=base, base_options=opts, noise=0.0, samples=3
        )
        torch.testing.assert_close(smooth, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    noisy = explain.run(model, x, "smoothgrad", samples=4, seed=1)
    assert torch.equal(noisy, explain.run(model, x, "smoothgrad", samples=4, seed=1))
    assert not torch.allclose(noisy, explain.run(model, x, "smoothgrad", samples=4, seed=2))
    with pytest.raises(explain.ExplainError, match="itself"):
        explain.run(model, x, "smoothgrad", base_method="smoothgrad")


def test_guided_backprop_rule_and_warning():
    # One ReLU: guided gradient = relu(upstream) * [x > 0]; without ReLUs it warns.
    torch.manual_seed(121)
    lin1, lin2 = nn.Linear(12, 6), nn.Linear(6, 3)
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2).eval()
    x = _images(2, seed=122, size=2)
    maps = explain.run(model, x, "guided_backprop", reduce="sum")
    pre = lin1(x.flatten(1))
    upstream = lin2.weight  # [3, 6]: d logit_c / d relu_out
    guided = upstream.clamp_min(0)[None] * (pre > 0).float()[:, None]  # [B, 3, 6]
    expected = torch.einsum("bcj,ji->bci", guided, lin1.weight).view(2, 3, 3, 2, 2).sum(2)
    torch.testing.assert_close(maps, expected.detach(), rtol=1e-5, atol=1e-6)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    with pytest.warns(RuntimeWarning, match="no nn.ReLU"):
        explain.run(plain, x, "guided_backprop")


def test_gauss_legendre_is_exact_and_keeps_the_previous_nodes():
    # 3 nodes in closed form: 1/2 -+ sqrt(3/20), weights 5/18, 8/18, 5/18.
    alphas, weights = quadrature(3)
    root = 0.15**0.5
    expected = torch.tensor([0.5 - root, 0.5, 0.5 + root], dtype=torch.float64)
    torch.testing.assert_close(alphas, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(weights, torch.tensor([5, 8, 5], dtype=torch.float64) / 18,
                               rtol=0, atol=1e-15)
    # 50 nodes (IG's default): the first three as the hand-written Golub-Welsch rule gave.
    alphas, weights = quadrature(50)
    torch.testing.assert_close(
        alphas[:3], torch.tensor([0.000566797789964546, 0.002984015283954755,
                                  0.007322957975996913], dtype=torch.float64),
        rtol=1e-10, atol=0)
    torch.testing.assert_close(
        weights[:3], torch.tensor([0.0014543112765775877, 0.003379899597872781,
                                   0.005295274191825481], dtype=torch.float64),
        rtol=1e-10, atol=0)
    torch.testing.assert_close(alphas, 1 - alphas.flip(0), rtol=0, atol=1e-15)  # symmetric
    # n nodes integrate x^k over [0, 1] exactly up to degree 2n - 1; degree 2n misses by
    # (n!)^4 / ((2n + 1) ((2n)!)^2): 1/12 for one node, 1/180 for two.
    for n in (1, 2, 5, 16, 64):
        alphas, weights = quadrature(n)
        assert (alphas[1:] > alphas[:-1]).all()
        for k in range(2 * n):
            assert (weights * alphas**k).sum().item() == pytest.approx(1 / (k + 1), abs=1e-13)
        if n <= 2:
            miss = 1 / (2 * n + 1) - (weights * alphas ** (2 * n)).sum().item()
            assert miss == pytest.approx({1: 1 / 12, 2: 1 / 180}[n], rel=1e-12)


# Error of each rule with 9 nodes on int_0^1 x^3 = 1/4, in closed form: left and right
# sums miss by -+ 1/(2n) - 1/(4n^2) ... (sum k^3 / n^4), the midpoint by -1/(8n^2), the
# trapezoid with step h = 1/8 by +h^2/4.
CUBIC_ERROR_9 = {
    "gausslegendre": 0.0,
    "riemann_left": sum(k**3 for k in range(9)) / 9**4 - 0.25,
    "riemann_right": sum(k**3 for k in range(1, 10)) / 9**4 - 0.25,
    "riemann_middle": -1 / (8 * 81),
    "riemann_trapezoid": (1 / 8) ** 2 / 4,
}


def test_quadrature_rules():
    for rule in (
        "gausslegendre",
        "riemann_left",
        "riemann_right",
        "riemann_middle",
        "riemann_trapezoid",
    ):
        alphas, weights = quadrature(9, rule)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12), rule
        assert alphas.min() >= 0 and alphas.max() <= 1
        # exact for a cubic under Gauss-Legendre; the Riemann rules' known errors
        approx = (weights * alphas**3).sum().item()
        assert approx == pytest.approx(0.25 + CUBIC_ERROR_9[rule], abs=1e-12), rule
    with pytest.raises(explain.ExplainError, match="quadrature rule"):
        quadrature(4, "simpson")


def test_cam_refuses_a_head_that_is_not_gap_linear(tiny_explain_net):
    with pytest.raises(explain.ExplainError, match="global-average-pooling"):
        explain.run(tiny_explain_net(), _images(2, 1, 16), "cam", layer="stem.0")


# -- speed options at their exact setting ---------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "logit", "channel_softmax"])
def test_scorecam_top_k_at_all_channels_is_the_exact_method(score, tiny_explain_net):
    model = tiny_explain_net()
    x = _images(2, seed=83, size=16)
    k = model.features(x).shape[1]
    exact = explain.run(model, x, "scorecam", score=score)
    for top_k in (None, k, k + 5):
        assert torch.equal(explain.run(model, x, "scorecam", score=score, top_k=top_k), exact)
    fewer = explain.run(model, x, "scorecam", score=score, top_k=k // 2)
    assert not torch.allclose(fewer, exact)


def test_scorecam_top_k_scores_the_most_energetic_channels_only(tiny_explain_net):
    # A plain loop over the kept channels (the top_k by sum A_k^2 per image) must agree.
    model = tiny_explain_net().eval()
    x = _images(2, seed=84, size=16)
    top_k = 3
    maps = explain.run(model, x, "scorecam", score="logit", top_k=top_k)
    expected = _scorecam_by_hand(model, x, top_k)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(explain.ExplainError, match="top_k"):
        explain.run(model, x, "scorecam", top_k=0)


@pytest.mark.parametrize(("method", "exact"), [
    ("integrated_gradients", {"steps": 50}),
    ("smoothgrad", {"samples": 16}),
    ("lime", {"samples": 256, "cells": 8}),
    ("scorecam", {"top_k": None}),
])
def test_the_audits_speed_options_at_their_exact_setting_are_the_engine_defaults(
    method, exact, tiny_explain_net
):
    # audit --exact runs the engine's defaults; these are the settings it names.
    model = tiny_explain_net()
    x = _images(2, seed=85, size=16)
    assert torch.equal(explain.run(model, x, method, **exact), explain.run(model, x, method))


def test_fill_chunks_equals_concatenating_the_chunks() -> None:
    """The chunked model calls' in-place filling is torch.cat of the chunks, uneven last
    chunk and non-leading dimension included."""
    from explain.chunks import fill_chunks

    source = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, int]] = []

    def part(lo: int, hi: int) -> torch.Tensor:
        seen.append((lo, hi))
        return source[:, lo:hi] * 2

    got = fill_chunks(7, 3, part, dim=1)
    assert seen == [(0, 3), (3, 6), (6, 7)]
    assert torch.equal(got, torch.cat([source[:, lo:hi] * 2 for lo, hi in seen], 1))
    assert torch.equal(fill_chunks(4, 10, lambda lo, hi: source[0, lo:hi]), source[0, :4])
    with pytest.raises(ValueError, match="count and per_chunk >= 1"):
        fill_chunks(0, 2, part)


def test_a_declared_class_count_spares_the_probe_forward_and_a_wrong_one_fails(
    tiny_explain_net,
) -> None:
    """Without a split the engine learns the output size from a one-image forward, unless
    the model declares ``num_classes`` and its last Linear layer agrees; a declaration the
    head contradicts (a head replaced after construction) is probed instead."""
    model = tiny_explain_net(seed=2, split=False).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 1, 2, 3])
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    try:
        probed = explain.run(model, x, "gradcam", layer="block", targets=targets)
        assert sizes == [1, 4]  # the probe, then the explained batch
        sizes.clear()
        model.num_classes = 5
        declared = explain.run(model, x, "gradcam", layer="block", targets=targets)
        assert sizes == [4]
        torch.testing.assert_close(declared, probed)
        sizes.clear()
        model.num_classes = 7  # stale: the head has 5 outputs
        stale = explain.run(model, x, "gradcam", layer="block", targets=targets)
        assert sizes == [1, 4]
        torch.testing.assert_close(stale, probed)
    finally:
        handle.remove()
