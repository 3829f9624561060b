"""Scaling with pixels and classes (issue #14 part 4): perturbation defaults that follow
the image size; several target classes an image in one engine call; the monitor and the
audit explaining only true and predicted classes beyond explain.ALL_CLASSES_MAX; the
sanity cascade walking a torchvision model's blocks; the classifier's input check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explain
from explain import records
from explain.perturbation import lime_default_cells, occlusion_defaults


def _linear(size: tuple[int, int], classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size[0] * size[1], classes)).eval()


def _images(batch: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("size", "window", "stride"), [
    ((16, 16), (8, 8), (4, 4)),  # below 64 px the 8-px floor holds: today's defaults
    ((32, 32), (8, 8), (4, 4)),
    ((64, 64), (8, 8), (4, 4)),
    ((224, 224), (28, 28), (14, 14)),
    ((32, 96), (8, 12), (4, 6)),  # each side its own
    ((4, 4), (4, 4), (2, 2)),  # never wider than the image
])
def test_occlusion_defaults_follow_the_image_side(size, window, stride):
    assert occlusion_defaults(size) == (window, stride)


@pytest.mark.parametrize("size", [(32, 32), (224, 224), (32, 96)])
def test_occlusion_default_maps_equal_the_rule_given_explicitly(size):
    model, x = _linear(size), _images(1, size)
    window, stride = occlusion_defaults(size)
    auto = explain.run(model, x, "occlusion", batch_size=256)
    torch.testing.assert_close(
        auto, explain.run(model, x, "occlusion", window=window, stride=stride, batch_size=256))
    if size == (32, 32):  # exactly the old defaults at the size they were tuned for
        assert torch.equal(auto, explain.run(model, x, "occlusion", window=8, stride=4))


def test_occlusion_explicit_values_still_win():
    size = (32, 32)
    model, x = _linear(size), _images(2, size)
    # A linear model: a 1x1 window's drop at a pixel is that pixel's contribution.
    ones = explain.run(model, x, "occlusion", window=1, stride=1)
    w = model[1].weight.detach().view(3, 3, *size)
    torch.testing.assert_close(ones, torch.einsum("cdhw,bdhw->bchw", w, x), rtol=1e-4, atol=1e-5)
    # A window alone gets half of it as stride, the documented rule.
    torch.testing.assert_close(explain.run(model, x, "occlusion", window=16),
                               explain.run(model, x, "occlusion", window=16, stride=8))
    with pytest.raises(explain.ExplainError, match="window"):
        explain.run(model, x, "occlusion", window=0)


@pytest.mark.parametrize(("size", "cells"), [
    ((8, 8), 8), ((32, 32), 8), ((40, 40), 10), ((48, 48), 12), ((224, 224), 12),
    ((32, 96), 12),
])
def test_lime_default_cells_follow_the_area_and_stay_bounded(size, cells):
    assert lime_default_cells(size) == cells


@pytest.mark.parametrize("size", [(32, 32), (224, 224)])
def test_lime_default_grid_equals_the_rule_given_explicitly(size):
    model, x = _linear(size), _images(1, size)
    auto = explain.run(model, x, "lime", samples=24, batch_size=64)
    cells = lime_default_cells(size)
    assert torch.equal(auto, explain.run(model, x, "lime", samples=24, cells=cells, batch_size=64))
    # Piecewise constant on the grid: one value per segment, cells**2 of them.
    assert auto[0, 0].unique().numel() == cells * cells
    with pytest.raises(explain.ExplainError, match="cells >= 1"):
        explain.run(model, x, "lime", cells=0)


@pytest.mark.parametrize("method", ["gradcam", "occlusion", "saliency"])
def test_several_targets_an_image_equal_one_call_each(method, tiny_explain_net):
    model = tiny_explain_net()
    x = _images(3, (16, 16), seed=5)
    targets = torch.tensor([[0, 2], [1, 1], [4, 0]])
    both = explain.run(model, x, method, targets=targets)
    assert both.shape == (3, 2, 16, 16)
    for t in range(2):
        one = explain.run(model, x, method, targets=targets[:, t])
        torch.testing.assert_close(both[:, t], one, rtol=1e-5, atol=1e-6)
    with pytest.raises(explain.ExplainError, match="targets"):
        explain.run(model, x, method, targets=torch.zeros(2, 2, dtype=torch.long))


def test_auto_targets_switch_at_the_named_threshold():
    labels, preds = torch.tensor([3, 1]), torch.tensor([3, 0])
    assert explain.auto_targets(labels, preds, explain.ALL_CLASSES_MAX) is None
    many = explain.auto_targets(labels, preds, explain.ALL_CLASSES_MAX + 1)
    assert many.tolist() == [[3, 3], [1, 0]]


# -- many classes: the monitor explains true + predicted above ALL_CLASSES_MAX ------------
@pytest.mark.parametrize(("classes", "calls", "explained"), [(10, [None], "all"),
                                                            (40, [(4, 2)], "predicted")])
def test_monitor_auto_explains_true_and_predicted_beyond_the_threshold(
    classes, calls, explained, tiny_explain_net, monkeypatch
):
    from callbacks import ExplanationMonitor

    model = tiny_explain_net(num_classes=classes).eval()
    x = _images(4, (16, 16), seed=7)
    with torch.no_grad():
        preds = model(x).argmax(1)
    labels = torch.tensor([0, 1, 2, classes - 1])
    seen: list = []
    run = explain.run

    def counting(*args, targets=None, **kw):
        seen.append(None if targets is None else tuple(targets.shape))
        return run(*args, targets=targets, **kw)

    monkeypatch.setattr(explain, "run", counting)
    monitor = ExplanationMonitor(methods=["saliency"])
    assert monitor.explain_classes == "auto"
    maps, map_classes = monitor._explain(model, x, "saliency", True, labels, preds, classes)
    assert seen == calls  # one engine call: all classes, or [N, 2] targets
    mode, rule = monitor.explained(classes)
    assert mode == explained and str(explain.ALL_CLASSES_MAX) in rule
    full = run(model, x, "saliency")
    rows = torch.arange(4)
    for pick in (labels, preds):
        torch.testing.assert_close(records.class_maps(maps, map_classes, pick), full[rows, pick])
    if classes > explain.ALL_CLASSES_MAX:
        # Only the explained maps are kept, with their classes (no zero-filled classes).
        assert maps.shape == (4, 2, 16, 16) and torch.equal(
            map_classes, torch.stack([labels, preds], 1))
        unexplained = torch.tensor([c for c in range(classes)
                                    if c not in labels.tolist() + preds.tolist()][:4])
        assert (records.class_maps(maps, map_classes, unexplained) == 0).all()
    else:
        assert map_classes is None and maps.shape == (4, classes, 16, 16)
        torch.testing.assert_close(maps, full)
    # An explicit choice is kept whatever the class count.
    assert ExplanationMonitor(explain_classes="all").explained(40)[0] == "all"
    assert ExplanationMonitor(explain_classes="shown").explained(10)[0] == "true"
    with pytest.raises(ValueError, match="'auto'"):
        ExplanationMonitor(explain_classes="most")


# -- many classes: the audit's maps -------------------------------------------------------
class _Bar:
    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def update(self, *args) -> None:
        pass


def _audit_run(model: nn.Module, classes: int, methods: list[str]):
    """A minimal AuditRun around ``model`` (no checkpoint, no data module)."""
    from types import SimpleNamespace

    from audit_report.sample import Sample
    from audit_report.settings import AuditSettings
    from audit_report.state import AuditRun, ModelAudit

    x = _images(12, (16, 16), seed=9)
    labels = torch.arange(12) % classes  # one image of each class first, in class order
    sample = Sample("test", list(range(12)), x, x.clamp(0, 1), labels, None, None, None,
                    [f"c{i}" for i in range(classes)], min(12, classes, 10))
    with torch.no_grad():
        probs = model(x).softmax(1)
    run = SimpleNamespace(model=model, sha256="0" * 64, name="tiny", config={"data": {}})
    settings = AuditSettings(ckpt=["tiny.ckpt"], methods=methods, progress=False, cache=False)
    audit = AuditRun(settings, sample, run, [ModelAudit("A", run, probs)], _Bar())
    return audit, audit.models[0]


@pytest.mark.parametrize("classes", [10, 40])
def test_audit_maps_cover_true_and_predicted_beyond_the_threshold(
    classes, tiny_explain_net, monkeypatch
):
    from audit_report.run import explain_methods
    from audit_report.sample import explained_classes
    from audit_report.sections.overview import ImagesClassesSection

    model = tiny_explain_net(num_classes=classes).eval()
    audit, entry = _audit_run(model, classes, ["gradcam", "occlusion"])
    seen: list = []
    run = explain.run

    def counting(net, images, method, targets=None, **kw):
        seen.append((method, len(images), None if targets is None else tuple(targets.shape)))
        return run(net, images, method, targets=targets, **kw)

    monkeypatch.setattr(explain, "run", counting)
    explain_methods(audit, entry)
    many = classes > explain.ALL_CLASSES_MAX
    want = (12, 2) if many else None
    assert seen == [("gradcam", 12, want), ("occlusion", 12, want)]  # one call a method
    rows, labels, preds = torch.arange(12), audit.sample.labels, entry.preds
    for method in ("gradcam", "occlusion"):
        maps = entry.methods[method]
        full = run(model, audit.sample.images, method)
        torch.testing.assert_close(maps.true_maps, full[rows, labels])
        torch.testing.assert_close(maps.pred_maps, full[rows, preds])
        assert (maps.shown_all is None) == many
    # Images x classes: every class up to the limit; beyond, the rows' own 10 classes.
    seen.clear()
    result = ImagesClassesSection().compute(audit, entry)
    columns = 10 if many else classes
    assert result.maps.shape == (10, columns, 16, 16)
    assert len(result.probabilities[0]) == columns
    assert seen == ([("gradcam", 10, (10, 10))] if many else [])
    assert (result.columns_note is not None) == many
    if many:
        assert "40 classes, more than 32" in result.columns_note
        full = run(model, audit.sample.images[:10], "gradcam")
        torch.testing.assert_close(result.maps, full[:, :10])
    assert ("true and the predicted" in explained_classes(classes)) == many


# -- the sanity cascade walks a torchvision model's blocks --------------------------------
def test_cascade_of_a_torchvision_resnet_walks_its_stages_one_at_a_time():
    from explain.measures.sanity import cascade_steps, cascading_randomization, reinitialize
    from lit_modules import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(backbone="tv:resnet18", num_classes=10).eval()
    steps = cascade_steps(model)
    assert [label for label, _ in steps] == [
        "fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert steps[1] == ("layer4", ["backbone.net.layer4"])
    # Shift every parameter off its initial value ("trained"), so that a reset shows even
    # where the init is a constant (BatchNorm's 1 and 0).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    net = model.backbone.net
    covered: set[str] = set()
    for i, (label, names) in enumerate(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        reinitialize(model, names, seed=i)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        block = {f"backbone.net.{label}.{n}" for n, _ in net.get_submodule(label).named_parameters()}
        assert changed == block, label  # that block's parameters, all of them, only them
        covered |= block
    assert covered == {n for n, _ in model.named_parameters()}  # every block in the end
    # The test itself: one row of correlations per block.
    model = ImageClassifier(backbone="tv:resnet18", num_classes=10).eval()
    x = _images(2, (64, 64), seed=3)  # layer4 is 2x2 there
    out = cascading_randomization(
        model, {"gradcam": lambda net: explain.run(net, x, "gradcam", targets=torch.tensor([0, 1]))})
    assert out["steps"] == [label for label, _ in steps]
    assert out["spearman"]["gradcam"].shape == (7, 2)


# -- the input check states what the backbone takes ----------------------------------------
@pytest.mark.parametrize(("backbone", "shape", "expected"), [
    ("tv:resnet18", (1, 3, 16, 16), r"tv:resnet18 expects images \[B, 3, H, W\] with H, W >= 32, "
                                    r"got \(1, 3, 16, 16\)$"),
    ("tv:vit_b_16", (1, 3, 256, 256), r"tv:vit_b_16 expects images \[B, 3, H, W\] with "
                                      r"H = W = 224, got \(1, 3, 256, 256\)$"),
])
def test_classifier_input_check_names_the_backbones_size(backbone, shape, expected):
    from lit_modules import ImageClassifier

    model = ImageClassifier(backbone=backbone, num_classes=3).eval()
    with pytest.raises(ValueError, match=expected):
        model(torch.zeros(shape))
