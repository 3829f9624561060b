"""Any torchvision classifier as a backbone (``tv:<name>[@<weights>]``): the declared layer
and head of each listed family, an unlisted model, pretrained weights from the hub cache
(nothing is downloaded), and a run through the real CLI."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
from helpers import run_train, tiny_config
from torchvision import models

import explain
from lit_modules import ImageClassifier, build_backbone
from lit_modules.backbones import TORCHVISION_FAMILIES, TorchvisionBackbone

# (name, input side, declared layer, CAM applies). Small inputs keep the CNNs cheap; the
# ViT takes exactly its image_size.
FAMILIES = [
    ("resnet18", 64, "net.layer4", True),
    ("vgg11", 64, "net.features.19", False),
    ("convnext_tiny", 64, "net.features.7", False),
    ("efficientnet_b0", 64, "net.features.8", True),
    ("mobilenet_v3_small", 64, "net.features.12", False),
    ("swin_t", 64, "net.norm", True),
    ("vit_b_16", 224, "net.encoder.layers.encoder_layer_11.ln_1", False),
]


def _hub(tmp_path, monkeypatch) -> None:
    """Point the torch hub cache at ``tmp_path``; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download")
    )


def test_every_family_is_listed_in_the_table() -> None:
    assert set(TORCHVISION_FAMILIES) == {
        "resnet", "vgg", "convnext", "efficientnet", "mobilenet_v3", "vit", "swin"
    }


@pytest.mark.parametrize(("name", "side", "layer", "cam"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_layer_and_head(name: str, side: int, layer: str, cam: bool) -> None:
    net = build_backbone(f"tv:{name}", num_classes=7).eval()
    assert isinstance(net, TorchvisionBackbone) and net.default_layer == layer
    assert net.num_classes == 7 and net.min_input_size == (224 if "vit" in name else 32)
    assert (net.classifier is not None) == cam
    x = torch.randn(1, 3, side, side)
    captured = {}
    handle = net.get_submodule(layer).register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o.detach().clone())
    )
    with torch.no_grad():
        logits = net(x)
    handle.remove()
    assert logits.shape == (1, 7)
    if not net.has_head:  # ViT: the engine hooks the layer; the map is the patch tokens
        assert captured["out"].shape == (1, 1 + 14 * 14, 768)
        return
    with torch.no_grad():
        feats = net.features(x)
        again = net.head(feats)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)  # the same computation
    expected = captured["out"].permute(0, 3, 1, 2) if name == "swin_t" else captured["out"]
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    # 64 px / 32, or / 16 for VGG, whose last ReLU comes before its last max-pool.
    assert feats.dim() == 4 and feats.shape[-2:] == ((4, 4) if name == "vgg11" else (2, 2))
    if cam:  # GAP + Linear after the layer: CAM is Grad-CAM times h*w
        model = ImageClassifierLike(net)
        maps_cam = explain.run(model, x, "cam", targets=torch.tensor([3]))
        maps_grad = explain.run(model, x, "hirescam", targets=torch.tensor([3]))
        assert maps_cam.abs().max() > 0
        torch.testing.assert_close(
            maps_cam, maps_grad * 4, rtol=1e-4, atol=1e-5 * float(maps_cam.abs().max())
        )


class ImageClassifierLike(torch.nn.Module):
    """A wrapper that declares its backbone as the LightningModule does."""

    explain_backbone = "backbone"

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_cam_refused_where_the_head_is_more_than_gap_linear() -> None:
    net = build_backbone("tv:mobilenet_v3_small", num_classes=5)
    with pytest.raises(explain.ExplainError, match="global-average-pooling"):
        explain.run(net, torch.randn(1, 3, 64, 64), "cam", targets=torch.tensor([0]))


def test_unlisted_model_needs_a_layer_and_works_with_one() -> None:
    net = build_backbone("tv:regnet_x_400mf", num_classes=4)
    assert net.default_layer == "" and net.family is None and net.num_classes == 4
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(explain.ExplainError, match="no default explanation layer"):
        explain.run(net, x, "gradcam")
    by_name = explain.run(net, x, "gradcam", layer="net.trunk_output")
    by_module = explain.run(net, x, "gradcam", layer=net.net.trunk_output)
    assert by_name.shape == (2, 4, 64, 64) and by_name.abs().sum() > 0
    torch.testing.assert_close(by_name, by_module, rtol=0, atol=0)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"close: \['resnet50'"):
        build_backbone("tv:resnet5O")
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        build_backbone("tv:resnet50@IMAGENET1K_V9")
    with pytest.raises(ValueError, match="tv:resnet50"):
        build_backbone("resnet50")


@pytest.mark.parametrize(
    ("backbone", "pretrained"),
    [("tv:resnet18@IMAGENET1K_V1", False), ("tv:resnet18", True), ("tv:resnet18@DEFAULT", False)],
    ids=["named", "pretrained_is_default", "default"],
)
def test_pretrained_from_the_hub_cache(tmp_path, monkeypatch, backbone, pretrained) -> None:
    _hub(tmp_path, monkeypatch)
    torch.manual_seed(3)
    reference = models.resnet18(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    url = models.ResNet18_Weights.IMAGENET1K_V1.url  # resnet18's DEFAULT is V1
    torch.save(reference, tmp_path / "checkpoints" / os.path.basename(url))
    net = build_backbone(backbone, num_classes=10, pretrained=pretrained)
    torch.testing.assert_close(net.net.layer3[1].conv2.weight, reference["layer3.1.conv2.weight"])
    assert net.net.fc.weight.shape == (10, 512)  # a new head for 10 classes
    kept = build_backbone(backbone, num_classes=1000, pretrained=pretrained)
    torch.testing.assert_close(kept.net.fc.weight, reference["fc.weight"])  # ImageNet head kept


def test_pretrained_without_network_names_file_and_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        build_backbone("tv:mobilenet_v3_small", pretrained=True)
    msg = str(err.value)
    path = tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert repr(str(path)) in msg  # the full path torch hub looks at
    assert msg.endswith("or train from random weights: set model.pretrained to false.")


@pytest.mark.parametrize("pretrained", [False, True])
def test_pinned_weights_without_network_name_the_fix_that_works(tmp_path, monkeypatch,
                                                                   pretrained) -> None:
    # pretrained=False alone changes nothing for a pinned string: the suffix must go.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        build_backbone("tv:resnet18@IMAGENET1K_V1", pretrained=pretrained)
    msg = str(err.value)
    expected = tmp_path / "checkpoints" / os.path.basename(models.ResNet18_Weights.IMAGENET1K_V1.url)
    assert f"at {str(expected)!r}" in msg
    fix = "drop '@IMAGENET1K_V1' from the backbone string (model.backbone: tv:resnet18)"
    assert msg.endswith(fix + (" and set model.pretrained to false." if pretrained else "."))
    assert "pretrained=False" not in msg
    # The fix works: without the suffix (and pretrained) the same offline machine builds it.
    assert build_backbone("tv:resnet18", pretrained=False).net.fc.out_features == 10


def test_classifier_with_a_torchvision_backbone() -> None:
    module = ImageClassifier(backbone="tv:resnet18", num_classes=3).eval()
    assert module.default_layer == "backbone.net.layer4"
    x = torch.randn(2, 3, 64, 64)
    maps = explain.run(module, x, "gradcam")
    assert maps.shape == (2, 3, 64, 64)
    # The declared split (head only) and the hooked full forward give the same maps.
    hooked = explain.run(module, x, "gradcam", layer=module.backbone.net.layer4[-1])
    torch.testing.assert_close(maps, hooked, rtol=1e-5, atol=1e-6 * float(maps.abs().max()))


def test_fit_through_the_cli(tmp_path) -> None:
    """`python train.py fit --model.backbone tv:...` trains, and the monitor explains it."""
    cfg = tiny_config(
        tmp_path, epochs=1, backbone="tv:mobilenet_v3_small",
        data={"image_size": 64, "cue": None}, trainer_args={"limit_val_batches": 1},
    )
    cli = run_train(["fit", "--config", str(cfg)])
    assert isinstance(cli.model.backbone, TorchvisionBackbone)
    assert cli.model.hparams.backbone == "tv:mobilenet_v3_small"
    assert cli.trainer.current_epoch == 1
    saved = list((tmp_path / "runs").rglob("*.ckpt"))
    assert saved, "no checkpoint written"
    state = torch.load(saved[0], weights_only=True, map_location="cpu")["state_dict"]
    assert "backbone.net.classifier.3.weight" in state and state[
        "backbone.net.classifier.3.weight"
    ].shape == (10, 1024)
