"""Backbone shapes, the features/head split, and the pretrained-weights path (no network)."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
from torchvision import models

from lit_modules import ImageClassifier, build_backbone


@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_gap"])
def test_logits_and_last_map_shapes(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.features(x)
        logits = net(x)
        named = dict(net.named_modules())[net.default_layer]
    assert logits.shape == (2, 10)
    assert feats.shape[0] == 2 and feats.shape[1] == 512
    assert feats.shape[-1] >= 4 and feats.shape[-2] >= 4
    # The declared layer is a real module whose output is what features() returns.
    captured = {}
    handle = named.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    torch.testing.assert_close(captured["a"], feats)
    # Everything after the layer is GAP + Linear: the head is exactly that.
    torch.testing.assert_close(net.head(feats), net.classifier(feats.mean((-2, -1))))


def test_resnet18_is_cifar_adapted() -> None:
    net = build_backbone("resnet18_cifar")
    conv1 = net.trunk.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18_cifar"):
        build_backbone("resnet50")


def test_pretrained_loads_from_hub_cache(tmp_path, monkeypatch) -> None:
    """A weights file placed in the torch hub cache is used; nothing is downloaded."""
    torch.hub.set_dir(str(tmp_path))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )
    torch.manual_seed(1)
    reference = models.resnet18(weights=None).state_dict()
    url = models.ResNet18_Weights.IMAGENET1K_V1.url
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save(reference, ckpt_dir / os.path.basename(url))
    try:
        net = build_backbone("resnet18_cifar", pretrained=True)
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))
    torch.testing.assert_close(net.trunk.layer3[1].conv2.weight, reference["layer3.1.conv2.weight"])
    # conv1 is the area-resampled 7x7 ImageNet kernel, not a fresh random one.
    w3 = net.trunk.conv1.weight
    assert w3.shape == (64, 3, 3, 3)
    expected = torch.nn.functional.adaptive_avg_pool2d(reference["conv1.weight"], 3) * (49 / 9) ** 0.5
    torch.testing.assert_close(w3, expected)
    # The 10-class head is new.
    assert net.classifier.weight.shape == (10, 512)


@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_gap"])
def test_pretrained_without_network_names_file_and_cache(tmp_path, monkeypatch, name) -> None:
    torch.hub.set_dir(str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    try:
        with pytest.raises(RuntimeError) as err:
            build_backbone(name, pretrained=True)
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))
    msg = str(err.value)
    cached = os.path.join(tmp_path, "checkpoints", msg.split("'")[1])  # the file it names
    assert cached.endswith(".pth") and f"at {cached!r}" in msg
    assert msg.endswith("or train from random weights: set model.pretrained to false.")


def test_classifier_declares_explanation_split() -> None:
    module = ImageClassifier(backbone="vgg16_gap")
    assert module.default_layer.startswith("backbone.trunk.")
    assert module.get_submodule(module.default_layer) is not None


@pytest.mark.parametrize(
    "backbone,shape,expected",
    [
        ("resnet18_cifar", (2, 1, 32, 32), r"resnet18_cifar expects images \[B, 3, H, W\] with H, W >= 1"),
        ("resnet18_cifar", (3, 32, 32), r"got \(3, 32, 32\)"),
        ("vgg16_gap", (2, 3, 4, 4), r"vgg16_gap expects images \[B, 3, H, W\] with H, W >= 8, got \(2, 3, 4, 4\)$"),
    ],
    ids=["channels", "not_4d", "too_small"],
)
def test_classifier_refuses_wrong_input_shapes(backbone, shape, expected) -> None:
    model = ImageClassifier(backbone).eval()
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(*shape))
    # The smallest accepted size really runs (the check is not stricter than the network).
    side = model.backbone.min_input_size
    with torch.no_grad():
        assert model(torch.randn(2, 3, side, side)).shape == (2, 10)
    if side > 1:
        with pytest.raises(RuntimeError, match="too small"):
            model.backbone(torch.randn(2, 3, side - 1, side - 1))
