"""The engine's contract, checked for every registered method (parametrized over
``explain.available()``, so a new method can not skip it).

Each method runs with its default options on a tiny network that has the real backbones'
pitfalls (BatchNorm, Dropout, in-place ReLU called twice, an in-place residual add), both
with a declared features/head split and without one (the layer hooked by name).
"""

from __future__ import annotations

import pytest
import torch
from helpers import hook_counts, pearson

import explain

METHODS = explain.available()
LAYER_METHODS = [m for m in METHODS if explain.get(m).needs_layer]
NUM_CLASSES = 5
# Methods that read a declared GAP + Linear head and refuse a model without one (checked).
NEEDS_DECLARED_HEAD = {"cam"}


def _kwargs(method: str, split: bool) -> dict:
    # Without a declared split there is no default layer: name it.
    return {} if split or not explain.get(method).needs_layer else {"layer": "block"}


def _refused(method: str, split: bool) -> bool:
    if split or method not in NEEDS_DECLARED_HEAD:
        return False
    return True


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=gen)


def _mixed_modes(model: torch.nn.Module) -> dict[str, bool]:
    model.train()
    model.stem.eval()  # a frozen stem inside a training model
    model.block.bn2.eval()
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("split", [True, False], ids=["split", "hooked"])
@pytest.mark.parametrize("method", METHODS)
def test_shapes_finite_and_classes_share_work(method, split, tiny_explain_net):
    model = tiny_explain_net(split=split)
    x = _images()
    if _refused(method, split):
        with pytest.raises(explain.ExplainError, match="head"):
            explain.run(model, x, method, **_kwargs(method, split))
        return
    maps = explain.run(model, x, method, **_kwargs(method, split))
    assert maps.shape == (2, NUM_CLASSES, 16, 16)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    targets = torch.tensor([3, 0])
    one = explain.run(model, x, method, targets=targets, **_kwargs(method, split))
    assert one.shape == (2, 16, 16)
    # A per-image target gives the same map as that class's slice of the all-class run.
    scale = maps.abs().amax().clamp_min(1e-12)
    assert torch.allclose(one, maps[torch.arange(2), targets], atol=1e-4 * float(scale), rtol=1e-3)


@pytest.mark.parametrize("split", [True, False], ids=["split", "hooked"])
@pytest.mark.parametrize("method", METHODS)
def test_model_left_as_found(method, split, tiny_explain_net):
    model = tiny_explain_net(split=split)
    modes = _mixed_modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = marker.clone()  # a .grad the user had: must survive
    rng = torch.get_rng_state()
    try:
        explain.run(model, _images(), method, **_kwargs(method, split))
    except explain.ExplainError:
        assert _refused(method, split)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG stream moved"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert hook_counts(model) == {}
    for name, p in model.named_parameters():
        if p is model.classifier.weight:
            assert torch.equal(p.grad, marker)
        else:
            assert p.grad is None, f"{name}.grad was written"
    after = model.state_dict()
    for k, v in state.items():  # BatchNorm running stats, num_batches_tracked, weights
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.mark.parametrize("guard", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("method", METHODS)
def test_works_under_inference_mode(method, guard, tiny_explain_net):
    model = tiny_explain_net()
    x = _images()
    expected = explain.run(model, x, method)
    ctx = torch.inference_mode() if guard == "inference_mode" else torch.no_grad()
    with ctx:
        x_inf = x.clone()  # an inference tensor under inference_mode, as in Lightning's test
        maps = explain.run(model, x_inf, method)
    assert torch.allclose(maps, expected, atol=1e-5 * expected.abs().max().clamp_min(1e-12))


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("at_call", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_no_hooks_and_modes_restored_after_an_exception(method, at_call, tiny_explain_net):
    model = tiny_explain_net(split=False)
    modes = _mixed_modes(model)
    calls = []

    def explode(module, inputs, output):
        calls.append(1)
        if len(calls) >= at_call:
            raise _Boom("the classifier failed")

    handle = model.classifier.register_forward_hook(explode)
    try:
        expected = (explain.ExplainError, _Boom) if _refused(method, False) else _Boom
        with pytest.raises(expected):
            explain.run(model, _images(), method, **_kwargs(method, False))
    finally:
        handle.remove()
    assert hook_counts(model) == {}
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_bf16_model_gives_float32_maps(method, tiny_explain_net):
    model = tiny_explain_net().to(torch.bfloat16)
    maps = explain.run(model, _images(), method)
    assert maps.dtype == torch.float32
    assert maps.shape == (2, NUM_CLASSES, 16, 16)
    # The same picture as the float32 model's: only the weights' rounding differs. Pixel
    # gradients (saliency, r = 0.92 here) feel it most; CAMs agree to r > 0.999.
    reference = explain.run(tiny_explain_net(), _images(), method)
    assert pearson(maps.flatten(0, 1), reference.flatten(0, 1)).min() > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_targets_raise(method, tiny_explain_net):
    model = tiny_explain_net()
    with pytest.raises(explain.ExplainError, match="out of range"):
        explain.run(model, _images(), method, targets=torch.tensor([0, NUM_CLASSES]))
    with pytest.raises(explain.ExplainError, match="out of range"):
        explain.run(model, _images(), method, targets=torch.tensor([-1, 0]))
    with pytest.raises(explain.ExplainError, match="entries for a batch"):
        explain.run(model, _images(), method, targets=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_bad_layer_name_lists_valid_names(method, tiny_explain_net):
    model = tiny_explain_net()
    with pytest.raises(explain.ExplainError) as info:
        explain.run(model, _images(), method, layer="block.conv9")
    message = str(info.value)
    assert "block.conv9" in message and "valid names" in message
    assert "block.conv1" in message and "stem.0" in message


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_layer_with_non_4d_output_is_refused(method, tiny_explain_net):
    model = tiny_explain_net(split=False)
    with pytest.raises(explain.ExplainError, match="4-D|GAP|Linear|head"):
        explain.run(model, _images(), method, layer="classifier")


def test_every_method_is_documented():
    for name in METHODS:
        doc = explain.get(name).fn.__doc__ or ""
        assert "Cost" in doc and "Layer" in doc, f"{name}: docstring lacks cost or layer"


# -- input checks: a wrong batch is refused with the expected and actual shapes ------------


@pytest.mark.parametrize("method", METHODS)
def test_wrong_channel_count_names_both_shapes(method, tiny_explain_net):
    model = tiny_explain_net()
    with pytest.raises(explain.ExplainError) as info:
        explain.run(model, torch.randn(2, 1, 16, 16), method)
    message = str(info.value)
    assert "expects images [B, 3, H, W]" in message and "got (2, 1, 16, 16)" in message
    assert "first conv 'stem.0' has in_channels=3" in message


@pytest.mark.parametrize(
    "images,expected",
    [
        (torch.randn(3, 16, 16), r"must be \[B, C, H, W\], got shape \(3, 16, 16\)"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "floating point.*torch.uint8"),
        (torch.randn(0, 3, 16, 16), r"empty: shape \(0, 3, 16, 16\)"),
    ],
    ids=["3d", "uint8", "empty"],
)
def test_malformed_images_are_refused(images, expected, tiny_explain_net):
    with pytest.raises(explain.ExplainError, match=expected):
        explain.run(tiny_explain_net(), images, "gradcam")


@pytest.mark.parametrize("split", [True, False], ids=["split", "hooked"])
@pytest.mark.parametrize("method", METHODS)
def test_images_smaller_than_the_network_takes(method, split, tiny_explain_net):
    model = tiny_explain_net(split=split)
    modes = _mixed_modes(model)
    # 1x1: the stem's 2x2 max-pool cannot run at all; the probe finds a size that does.
    with pytest.raises(explain.ExplainError) as info:
        explain.run(model, _images()[..., :1, :1], method, **_kwargs(method, split))
    message = str(info.value)
    if "window" not in message:  # occlusion refuses its window first
        assert "cannot run on images of 1x1 (shape (2, 3, 1, 1))" in message, message
        assert "smaller than the network can take; it runs on 2x2" in message
        assert "Output size is too small" in message  # the original error, kept
    # 2x2: the network runs, but the block's map is 1x1: nothing for a layer method to show.
    x = _images()[..., :2, :2]
    if explain.get(method).needs_layer:
        expected = "head" if _refused(method, split) else "gives a 1x1 map for 2x2 images"
        with pytest.raises(explain.ExplainError, match=expected):
            explain.run(model, x, method, **_kwargs(method, split))
    elif method != "occlusion":
        assert explain.run(model, x, method).shape == (2, NUM_CLASSES, 2, 2)
    assert hook_counts(model) == {}
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_other_errors_are_not_blamed_on_the_size(tiny_explain_net):
    model = tiny_explain_net(split=False)

    def explode(module, inputs, output):
        raise _Boom("not a size problem")

    handle = model.classifier.register_forward_hook(explode)
    try:
        with pytest.raises(_Boom):
            explain.run(model, _images(), "gradcam", layer="block")
    finally:
        handle.remove()


def test_real_backbones_too_small_or_wrong_channels():
    from lit_modules import ImageClassifier, build_backbone

    resnet = build_backbone("resnet18_cifar")
    with pytest.raises(explain.ExplainError, match="'trunk.layer4' gives a 1x1 map for 2x2"):
        explain.run(resnet, torch.randn(2, 3, 2, 2), "gradcam")
    vgg = ImageClassifier("vgg16_gap")
    with pytest.raises(explain.ExplainError) as info:
        explain.run(vgg, torch.randn(2, 3, 4, 4), "gradcam")
    message = str(info.value)
    assert "ImageClassifier cannot run on images of 4x4" in message and "runs on 8x8" in message
    assert "Output size is too small" in message
    with pytest.raises(explain.ExplainError, match="'backbone.trunk.0' has in_channels=3"):
        explain.run(vgg, torch.randn(2, 4, 32, 32), "gradcam")


@pytest.mark.parametrize("method", METHODS)
def test_float_or_bool_targets_are_refused(method, tiny_explain_net):
    model = tiny_explain_net()
    for targets in (torch.tensor([1.7, 0.2]), torch.tensor([1.0, 0.0]), [1.0, 0.0],
                    torch.tensor([True, False])):
        with pytest.raises(explain.ExplainError, match="targets must be integer class indices"):
            explain.run(model, _images(), method, targets=targets)
    # Integer lists and int32 tensors are fine.
    a = explain.run(model, _images(), method, targets=[1, 0])
    b = explain.run(model, _images(), method, targets=torch.tensor([1, 0], dtype=torch.int32))
    assert a.shape == (2, 16, 16) and torch.allclose(a, b)


def test_eval_mode_restores_each_submodules_own_flag_also_after_an_error(tiny_explain_net):
    model = tiny_explain_net()
    model.train()
    model.stem.eval()  # a frozen part stays frozen; model.train() on exit would undo it
    before = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), explain.eval_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert {n: m.training for n, m in model.named_modules()} == before
    assert (before["stem"], before["block"]) == (False, True)
