"""Agreement with code no one here wrote: pytorch-grad-cam and captum (the dev extra).

Both backbones, random weights and random inputs under fresh seeds, at the declared
layer and one earlier layer. Each map of ours and the peer's is min-max normalised at the
same (input) resolution and compared by Pearson correlation. Where a definition differs,
the engine exposes the peer's as an option and the test uses it:

* gradcam_pp: ``eps=1e-6`` (pytorch-grad-cam's denominator guard; the engine's default is
  1e-7, and at the last layer the gradients are small enough for it to matter).
* scorecam: ``score="channel_softmax"`` (pytorch-grad-cam softmaxes the masked logits of
  the class across channels; the paper uses the class probability) and
  ``align_corners=True`` (its UpsamplingBilinear2d).
* eigencam: the first principal axis has no sign; LAPACK (numpy, pytorch-grad-cam) and
  torch may return opposite ones, and pytorch-grad-cam then keeps ``relu(-p)`` where we
  keep ``relu(p)``. The engine fixes the sign by a documented rule, so the honest
  comparison is against the better of ``relu(+p)`` and ``relu(-p)`` built from our own
  projection ``p``; the magnitude and layout must still match exactly.
* guided_gradcam: ``interpolate="nearest"`` (captum's default upsampling).
* captum's attributions are per colour channel; the engine's reduction is applied to them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import pearson, randomise_batchnorm

import explain
from explain.cam import principal_projection
from explain.gradient import reduce_channels
from lit_modules.backbones import resnet18_cifar, vgg16_gap

pytestmark = pytest.mark.oracle

# (backbone, declared layer, earlier layer). VGG16-GAP's trunk.22 is block 3's last ReLU (8x8).
CONFIGS = [
    ("resnet18_cifar", "trunk.layer4", "trunk.layer3"),
    ("vgg16_gap", "trunk.41", "trunk.22"),
]
LAYER_CASES = [(b, layer) for b, default, early in CONFIGS for layer in (default, early)]
BUILD = {"resnet18_cifar": resnet18_cifar, "vgg16_gap": vgg16_gap}


_MODELS: dict[str, torch.nn.Module] = {}


def _case(backbone: str, layer: str | None, seed: int, batch: int):
    """A freshly randomised model, images and one random target class per image.

    Each backbone is built once (torchvision builds VGG16's large unused classifier too)
    and re-initialised in place from ``seed`` by its layers' own ``reset_parameters``, with
    random BatchNorm statistics so no layer is the identity.
    """
    if backbone not in _MODELS:
        _MODELS[backbone] = BUILD[backbone]().eval()
    model = _MODELS[backbone]
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    randomise_batchnorm(model, seed)  # statistics as after some training
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    targets = torch.randint(0, 10, (batch,), generator=gen)
    assert layer is None or layer in dict(model.named_modules())
    return model, x, targets


def _seed(*parts) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate("/".join(map(str, parts)))) % 10_000


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    a = a - a.min(1, keepdims=True)
    return a / np.maximum(a.max(1, keepdims=True), 1e-30)


def _correlations(ours, theirs) -> np.ndarray:
    """Per-map Pearson correlation after min-max normalisation; two flat maps count as 1."""
    return pearson(_minmax(np.asarray(ours)), _minmax(np.asarray(theirs))).numpy()


def _report(name: str, where: str, r: np.ndarray, threshold: float) -> None:
    print(f"ORACLE {name:22s} {where:32s} min r = {r.min():.12f}")
    assert r.min() >= threshold, f"{name} at {where}: correlations {r}"


# -- pytorch-grad-cam -----------------------------------------------------------------------
def _gradcam_peer(cls_name: str, model, layer: str, x, targets, **kwargs) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pgc, cls_name)
    with cls(model=model, target_layers=[model.get_submodule(layer)], **kwargs) as cam:
        if hasattr(cam, "batch_size") and cls_name == "ScoreCAM":
            cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


GRAD_METHODS = [
    # (ours, peer class, our options, threshold)
    ("gradcam", "GradCAM", {}, 0.999),
    ("gradcam_pp", "GradCAMPlusPlus", {"eps": 1e-6}, 0.999),
    ("xgradcam", "XGradCAM", {}, 0.999),
    ("hirescam", "HiResCAM", {}, 0.999),
    ("layercam", "LayerCAM", {}, 0.999),
]


@pytest.mark.parametrize(("backbone", "layer"), LAYER_CASES)
@pytest.mark.parametrize(
    ("method", "peer", "options", "threshold"), GRAD_METHODS, ids=[m[0] for m in GRAD_METHODS]
)
def test_gradient_cams_match_pytorch_grad_cam(method, peer, options, threshold, backbone, layer):
    pytest.importorskip("pytorch_grad_cam")
    model, x, targets = _case(backbone, layer, _seed(method, backbone, layer), batch=3)
    ours = explain.run(model, x, method, layer=layer, targets=targets, **options)
    theirs = _gradcam_peer(peer, model, layer, x, targets)
    _report(method, f"{backbone}:{layer}", _correlations(ours, theirs), threshold)


@pytest.mark.parametrize(("backbone", "layer"), LAYER_CASES)
def test_eigencam_matches_pytorch_grad_cam_up_to_the_svd_sign(backbone, layer):
    pytest.importorskip("pytorch_grad_cam")
    model, x, targets = _case(backbone, layer, _seed("eigencam", backbone, layer), batch=3)
    theirs = _gradcam_peer("EigenCAM", model, layer, x, targets)
    ours = explain.run(model, x, "eigencam", layer=layer, targets=targets)
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: store.setdefault("act", o.detach().clone())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    proj = principal_projection(store["act"])
    plus = explain.upsample(proj.clamp_min(0), (32, 32))
    minus = explain.upsample((-proj).clamp_min(0), (32, 32))
    torch.testing.assert_close(ours, plus)  # the engine's map is relu(+p), our sign rule
    r = np.maximum(_correlations(plus, theirs), _correlations(minus, theirs))
    _report("eigencam", f"{backbone}:{layer}", r, 0.999)


# The peers of the perturbation CAMs cost seconds a case: the quick set keeps one case a
# backbone and both code paths (head-only at the declared layer, hooked at an earlier
# one); the other two are marked slow.
def _cases(quick: set) -> list:
    return [
        (b, layer) if (b, layer) in quick else pytest.param(b, layer, marks=pytest.mark.slow)
        for b, layer in LAYER_CASES
    ]


@pytest.mark.parametrize(
    ("backbone", "layer"),
    _cases({("resnet18_cifar", "trunk.layer3"), ("vgg16_gap", "trunk.22")}),
)
def test_scorecam_matches_pytorch_grad_cam(backbone, layer):
    # One image: both sides run one full forward per channel (256 or 512 of them).
    pytest.importorskip("pytorch_grad_cam")
    model, x, targets = _case(backbone, layer, _seed("scorecam", backbone, layer), batch=1)
    ours = explain.run(
        model,
        x,
        "scorecam",
        layer=layer,
        targets=targets,
        score="channel_softmax",
        align_corners=True,
    )
    theirs = _gradcam_peer("ScoreCAM", model, layer, x, targets)
    _report("scorecam", f"{backbone}:{layer}", _correlations(ours, theirs), 0.999)


@pytest.mark.parametrize(
    ("backbone", "layer"),
    _cases({("resnet18_cifar", "trunk.layer4"), ("vgg16_gap", "trunk.22")}),
)
def test_ablationcam_matches_pytorch_grad_cam(backbone, layer):
    # pytorch-grad-cam ablates with 0 after a ReLU (all these layers) and divides the drop
    # by the original score: the engine's defaults (fill=0.0, relative=True).
    pytest.importorskip("pytorch_grad_cam")
    model, x, targets = _case(backbone, layer, _seed("ablationcam", backbone, layer), batch=1)
    ours = explain.run(model, x, "ablationcam", layer=layer, targets=targets)
    theirs = _gradcam_peer("AblationCAM", model, layer, x, targets, batch_size=64)
    _report("ablationcam", f"{backbone}:{layer}", _correlations(ours, theirs), 0.999)


# -- captum ---------------------------------------------------------------------------------
BACKBONE_NAMES = [b for b, _, _ in CONFIGS]


def _captum():
    return pytest.importorskip("captum.attr")


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_saliency_matches_captum(backbone):
    attr = _captum()
    model, x, targets = _case(backbone, None, _seed("saliency", backbone), batch=3)
    ours = explain.run(model, x, "saliency", targets=targets)
    theirs = attr.Saliency(model).attribute(x.clone(), target=targets, abs=True)
    _report("saliency", backbone, _correlations(ours, reduce_channels(theirs, "max_abs")), 0.999)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize(
    ("backbone", "rule", "baseline"),
    [("resnet18_cifar", "gausslegendre", None), ("vgg16_gap", "riemann_middle", 0.3)],
)
def test_integrated_gradients_matches_captum(backbone, rule, baseline, fold_bn):
    attr = _captum()
    model, x, targets = _case(backbone, None, _seed("ig", backbone), batch=2)
    ours = explain.run(
        model,
        x,
        "integrated_gradients",
        targets=targets,
        steps=8,
        rule=rule,
        baseline=baseline,
        fold_bn=fold_bn,
    )
    theirs = attr.IntegratedGradients(model).attribute(
        x.clone(),
        target=targets,
        n_steps=8,
        method=rule,
        baselines=0.0 if baseline is None else baseline,
    )
    theirs = reduce_channels(theirs.detach(), "sum")
    if not fold_bn:  # the same float computation as captum's: equal, not only correlated
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
    # Folded BatchNorm is the same function but rounds differently, and a ReLU whose input
    # is within rounding of zero may then switch: a few gradients differ, the maps agree.
    _report("integrated_gradients", f"{backbone}:{rule}:fold={fold_bn}",
            _correlations(ours, theirs), 0.999)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_guided_backprop_matches_captum(backbone):
    attr = _captum()
    model, x, targets = _case(backbone, None, _seed("gbp", backbone), batch=3)
    ours = explain.run(model, x, "guided_backprop", targets=targets)
    signed = explain.run(model, x, "guided_backprop", targets=targets, reduce="sum")
    with _no_check():
        theirs = attr.GuidedBackprop(model).attribute(x.clone(), target=targets).detach()
    _report(
        "guided_backprop", backbone, _correlations(ours, reduce_channels(theirs, "max_abs")), 0.999
    )
    _report(
        "guided_backprop",
        backbone + ":sum",
        _correlations(signed, reduce_channels(theirs, "sum")),
        0.999,
    )


@pytest.mark.parametrize(("backbone", "layer"), LAYER_CASES)
def test_guided_gradcam_matches_captum(backbone, layer):
    attr = _captum()
    model, x, targets = _case(backbone, layer, _seed("ggc", backbone, layer), batch=3)
    ours = explain.run(
        model, x, "guided_gradcam", layer=layer, targets=targets, interpolate="nearest"
    )
    with _no_check():
        theirs = (
            attr.GuidedGradCam(model, model.get_submodule(layer))
            .attribute(x.clone(), target=targets)
            .detach()
        )
    _report(
        "guided_gradcam",
        f"{backbone}:{layer}",
        _correlations(ours, reduce_channels(theirs, "max_abs")),
        0.999,
    )


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_occlusion_matches_captum(backbone):
    attr = _captum()
    model, x, targets = _case(backbone, None, _seed("occlusion", backbone), batch=2)
    ours = explain.run(model, x, "occlusion", targets=targets, window=8, stride=6, fill=0.1)
    theirs = (
        attr.Occlusion(model)
        .attribute(
            x.clone(),
            target=targets,
            sliding_window_shapes=(3, 8, 8),
            strides=(3, 6, 6),
            baselines=0.1,
            perturbations_per_eval=16,
        )
        .detach()
    )
    assert torch.allclose(theirs[:, 0], theirs[:, 2])  # windows span all colour channels
    torch.testing.assert_close(ours, theirs[:, 0], rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
    _report("occlusion", backbone, _correlations(ours, theirs[:, 0]), 0.999)


class _no_check:
    """captum warns about hooks on in-place ReLUs and inputs without grad; not our concern."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
