"""BatchNorm folding for input gradients (explain.fold) and the per-class backward loop.

The folded copy must compute the same function as the model, leave the model untouched,
refuse what it can not fold (training mode, untraceable forwards, a conv whose output is
used twice), and give integrated_gradients the same maps within rounding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import pearson, randomise_batchnorm
from torch import nn

import explain
from explain.base import ExplainContext, folded_model, make_selectors
from explain.fold import fold_batchnorm
from lit_modules.backbones import resnet18_cifar, vgg16_gap
from lit_modules.classifier import ImageClassifier


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("build", "pairs"), [(resnet18_cifar, 20), (vgg16_gap, 13)], ids=["resnet18", "vgg16_gap"]
)
def test_folded_copy_is_the_same_function_and_leaves_the_model_alone(build, pairs):
    model = randomise_batchnorm(build(), seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    folded, count = fold_batchnorm(model)

    # ResNet-18: conv1, 16 block convs, 3 downsample convs; VGG16-BN: 13 convs.
    assert count == pairs
    assert _count(folded, nn.BatchNorm2d) == 0
    assert _count(model, nn.BatchNorm2d) == pairs
    assert all(not p.requires_grad for p in folded.parameters() if p.dim() == 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)


def test_training_mode_is_not_folded(tiny_explain_net):
    model = tiny_explain_net().train()
    folded, count = fold_batchnorm(model)
    assert folded is model and count == 0


def test_untraceable_forward_is_returned_unchanged():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx can not trace it
                x = -x
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    model = Branchy().eval()
    folded, count = fold_batchnorm(model)
    assert folded is model and count == 0
    # Integrated Gradients then runs on the model itself: fold_bn changes nothing.
    x = torch.randn(2, 3, 8, 8)
    maps = explain.run(model, x, "integrated_gradients", steps=4)
    assert torch.equal(maps, explain.run(model, x, "integrated_gradients", steps=4, fold_bn=False))
    assert maps.abs().sum() > 0


def test_conv_output_used_twice_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            b = self.bn(a) + a  # the raw conv output is needed too: no fold here
            return self.fc(self.bn2(self.conv2(b)).mean((2, 3)))

    model = randomise_batchnorm(Shared(), seed=3)
    folded, count = fold_batchnorm(model)
    assert count == 1  # conv2 -> bn2 only
    assert [type(m) for m in folded.modules()].count(nn.BatchNorm2d) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_lightning_module_folds_its_declared_backbone():
    model = randomise_batchnorm(ImageClassifier(backbone="resnet18_cifar"), seed=4)
    # Its forward checks shapes in Python (untraceable); its declared backbone is not.
    assert fold_batchnorm(model) == (model, 0)
    folded = folded_model(model)
    assert _count(folded, nn.BatchNorm2d) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [resnet18_cifar, vgg16_gap], ids=["resnet18", "vgg16_gap"])
def test_integrated_gradients_folded_equals_unfolded_within_rounding(build):
    torch.manual_seed(5)
    model = randomise_batchnorm(build(), seed=6)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    folded = explain.run(model, x, "integrated_gradients", steps=8)
    plain = explain.run(model, x, "integrated_gradients", steps=8, fold_bn=False)
    r = pearson(folded.flatten(0, 1), plain.flatten(0, 1))
    assert r.min() > 0.999, r.min()
    # Summed over pixels (completeness) the two agree to float rounding.
    torch.testing.assert_close(folded.sum((-2, -1)), plain.sum((-2, -1)), rtol=1e-3, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_per_class_loop_equals_the_batched_backward(tiny_explain_net):
    model = tiny_explain_net().eval()
    x = torch.randn(3, 3, 16, 16).requires_grad_(True)
    ctx = ExplainContext(model, x, None, make_selectors(None, 3, 5, x.device), 5)
    batched = ctx.grads_of_selected(model(x), x, batched=True)
    logits = model(x)
    # The graph is kept (a memoised forward serves the next chunk of classes); it goes
    # with the context at the end of explain.run.
    looped = ctx.grads_of_selected(logits, x, batched=False)
    (again,) = torch.autograd.grad(logits[:, 0].sum(), x)  # would raise if it were freed
    torch.testing.assert_close(again, looped[0], rtol=1e-6, atol=1e-8)
    logits = model(x)
    assert looped.shape == (5, 3, 3, 16, 16)
    torch.testing.assert_close(looped, batched, rtol=1e-5, atol=1e-7)
    for c in range(5):
        (g,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)
        torch.testing.assert_close(looped[c], g, rtol=1e-6, atol=1e-8)
