"""Backbones: two adapted to 32x32 inputs, and any torchvision classifier (``tv:<name>``).

Every backbone exposes the same small interface that the explanation engine uses:

* ``features(x)``: input -> the activation map of the default explanation layer,
* ``head(a)``: that activation -> logits (global average pooling and one Linear layer),
* ``default_layer``: the qualified name of the module whose output ``features`` returns,
* ``classifier``: the Linear layer after global average pooling (what CAM reads).

For the two CIFAR backbones everything after the default layer is "GAP + Linear", so CAM
applies and the engine can re-run only the head when it perturbs the last conv map. A
torchvision backbone declares its default layer from :data:`TORCHVISION_FAMILIES` and a
head where the architecture can be cut there (see :class:`TorchvisionBackbone`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

BACKBONES: dict[str, Callable[..., SplitBackbone]] = {}


def register_backbone(name: str) -> Callable:
    """Register a backbone factory under ``name`` (refuses duplicates)."""

    def wrap(fn: Callable) -> Callable:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return wrap


TORCHVISION_PREFIX = "tv:"


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone, or a torchvision classifier named ``tv:<name>[@<weights>]``.

    An unknown name lists the valid ones.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_backbone(name, **kwargs)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or "
            f"'{TORCHVISION_PREFIX}<torchvision model name>' (e.g. tv:resnet50)"
        )
    return BACKBONES[name](**kwargs)


class SplitBackbone(nn.Module):
    """A classifier made of a conv trunk, global average pooling and one Linear layer."""

    default_layer: str = ""
    in_channels: int = 3
    # Smallest input side the forward accepts (ResNet-18-CIFAR takes any: its strided convs
    # are padded; each VGG max-pool halves the side and fails below 1x1).
    min_input_size: int = 1

    def __init__(self, trunk: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Input images -> the last conv activation map ``[B, C, h, w]``."""
        return self.trunk(x)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """Last conv activation map -> logits ``[B, num_classes]``."""
        return self.classifier(torch.flatten(self.pool(a), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _weights_error(
    weights: models.WeightsEnum, exc: Exception, fix: str = "set model.pretrained to false"
) -> RuntimeError:
    """The error for weights that could not be loaded: the full path torch hub expects the
    file at, and ``fix``, how to do without them (what undoes the option that asked for
    them: ``pretrained``, or a pinned ``@<weights>`` backbone string)."""
    filename = os.path.basename(weights.url)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    return RuntimeError(
        f"could not load pretrained weights {weights}: {exc.__class__.__name__}: {exc}.\n"
        f"Without network, put the file {filename!r} (from {weights.url}) at "
        f"{os.path.join(cache_dir, filename)!r} (the torch hub cache; set TORCH_HOME to "
        f"move it), or train from random weights: {fix}."
    )


def _load_imagenet_state_dict(weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    """Fetch torchvision ImageNet weights: hub cache if present, else download.

    Without network and without the cached file, the error names the file and the cache
    directory so the user can copy the file there by hand.
    """
    try:
        # weights_only=True inside torchvision: a weights file can not run code.
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors all land here
        raise _weights_error(weights, exc) from exc


class ResNet18Cifar(SplitBackbone):
    """torchvision ResNet-18 with a 3x3 stride-1 conv1 and no max-pool (layer4 is 4x4 at 32x32)."""

    default_layer = "trunk.layer4"

    def __init__(self, num_classes: int = 10, pretrained: bool = False) -> None:
        net = models.resnet18(weights=None)
        if pretrained:
            net.load_state_dict(_load_imagenet_state_dict(models.ResNet18_Weights.IMAGENET1K_V1))
            # The ImageNet 7x7 stride-2 kernels are resampled to 3x3 (area average), which
            # keeps their colour/edge selectivity; a random 3x3 kernel would throw it away.
            w7 = net.conv1.weight.detach()
            w3 = nn.functional.adaptive_avg_pool2d(w7, 3) * (49 / 9) ** 0.5
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if pretrained:
            with torch.no_grad():
                net.conv1.weight.copy_(w3)
        trunk = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4"):
            trunk.add_module(name, getattr(net, name))
        super().__init__(trunk, 512, num_classes)
        # The new classifier keeps PyTorch's default (Kaiming-uniform) initialisation.


class VGG16GAP(SplitBackbone):
    """VGG16 conv stack with the last two max-pools removed, then GAP and one Linear layer.

    At 32x32 input the three remaining pools leave a 4x4 map (VGG16 keeps all five and ends
    at 1x1, where a heatmap has one pixel). Nothing sits between GAP and the classifier, so
    CAM (Zhou et al. 2016) applies.
    """

    default_layer = ""  # set per instance: the final ReLU of the trunk

    def __init__(
        self, num_classes: int = 10, pretrained: bool = False, batch_norm: bool = True
    ) -> None:
        if batch_norm:
            net = models.vgg16_bn(weights=None)
            weights = models.VGG16_BN_Weights.IMAGENET1K_V1
        else:
            net = models.vgg16(weights=None)
            weights = models.VGG16_Weights.IMAGENET1K_V1
        if pretrained:
            net.load_state_dict(_load_imagenet_state_dict(weights))
        layers = list(net.features.children())
        pool_idx = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        drop = set(pool_idx[-2:])  # pool4 and pool5: 32 -> 16 -> 8 -> 4 with the first three
        trunk = nn.Sequential(*[m for i, m in enumerate(layers) if i not in drop])
        super().__init__(trunk, 512, num_classes)
        self.min_input_size = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in trunk)
        self.default_layer = f"trunk.{len(trunk) - 1}"  # the final ReLU


@register_backbone("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, pretrained: bool = False) -> ResNet18Cifar:
    """CIFAR-adapted ResNet-18; default explanation layer ``trunk.layer4``."""
    return ResNet18Cifar(num_classes=num_classes, pretrained=pretrained)


@register_backbone("vgg16_gap")
def vgg16_gap(
    num_classes: int = 10, pretrained: bool = False, batch_norm: bool = True
) -> VGG16GAP:
    """VGG16 conv stack + GAP + Linear; default explanation layer: the last ReLU."""
    return VGG16GAP(num_classes=num_classes, pretrained=pretrained, batch_norm=batch_norm)


# -- any torchvision classifier -------------------------------------------------------------
def _gap_linear(net: nn.Module, a: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
    return classifier(torch.flatten(net.avgpool(a), 1))


def _last_relu(net: nn.Module) -> int:
    return max(i for i, m in enumerate(net.features) if isinstance(m, nn.ReLU))


def _vgg_head(net: nn.Module, a: torch.Tensor) -> torch.Tensor:
    for m in list(net.features)[_last_relu(net) + 1 :]:  # the last max-pool
        a = m(a)
    return _gap_linear(net, a, net.classifier)


def _last_child(seq: nn.Module) -> str:
    return list(seq.named_children())[-1][0]


@dataclass(frozen=True)
class TorchvisionFamily:
    """What camlight knows about one torchvision architecture family.

    Attributes:
        cls_name: the ``torchvision.models`` class the family's models are instances of.
        layer: the default explanation layer, a module name inside the model.
        head: the model's forward after that layer, from the layer's map ``[B, D, h, w]``;
            None where the forward can not be cut there (ViT: the last block's residual
            needs the block's input), and the engine then hooks the layer in a full forward.
        classifier: the Linear layer right after global average pooling, where nothing else
            (but eval-mode dropout) sits between: what CAM reads. None: CAM is refused.
        channels_last: the layer's output is ``[B, h, w, D]`` (Swin).
    """

    cls_name: str
    layer: Callable[[nn.Module], str]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None
    classifier: Callable[[nn.Module], nn.Linear] | None = None
    channels_last: bool = False


# The layers are the usual Grad-CAM choices: the last conv stage's output (its finest map
# that every class score depends on through pooling); for ViT the first LayerNorm of the
# last block, because the block's own output reaches the logits only through the class
# token, so every patch token's gradient there is zero; for Swin the final LayerNorm,
# after which the head is GAP + Linear, so Swin at its default layer is CAM-able.
TORCHVISION_FAMILIES: dict[str, TorchvisionFamily] = {
    "resnet": TorchvisionFamily(
        "ResNet", lambda n: "layer4", lambda n, a: _gap_linear(n, a, n.fc), lambda n: n.fc
    ),
    "vgg": TorchvisionFamily("VGG", lambda n: f"features.{_last_relu(n)}", _vgg_head),
    "convnext": TorchvisionFamily(
        # classifier = LayerNorm2d, Flatten, Linear: the LayerNorm rules CAM out.
        "ConvNeXt", lambda n: f"features.{_last_child(n.features)}",
        lambda n, a: n.classifier(n.avgpool(a)),
    ),
    "efficientnet": TorchvisionFamily(
        "EfficientNet", lambda n: f"features.{_last_child(n.features)}",
        lambda n, a: _gap_linear(n, a, n.classifier), lambda n: n.classifier[-1],
    ),
    "mobilenet_v3": TorchvisionFamily(
        # classifier = Linear, Hardswish, Dropout, Linear: an MLP, so no CAM.
        "MobileNetV3", lambda n: f"features.{_last_child(n.features)}",
        lambda n, a: _gap_linear(n, a, n.classifier),
    ),
    "vit": TorchvisionFamily(
        "VisionTransformer",
        lambda n: f"encoder.layers.{_last_child(n.encoder.layers)}.ln_1",
        None,
    ),
    "swin": TorchvisionFamily(
        "SwinTransformer", lambda n: "norm",
        lambda n, a: _gap_linear(n, a, n.head), lambda n: n.head, channels_last=True,
    ),
}


def torchvision_family(net: nn.Module) -> str | None:
    """The :data:`TORCHVISION_FAMILIES` key of ``net``'s architecture, or None if unlisted."""
    for key, family in TORCHVISION_FAMILIES.items():
        if isinstance(net, getattr(models, family.cls_name)):
            return key
    return None


class _Reached(Exception):
    """Raised by a forward hook to stop the forward at the explanation layer."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__("reached the explanation layer")
        self.output = output


def replace_classifier(net: nn.Module, num_classes: int) -> None:
    """Give ``net`` a new ``num_classes``-way final Linear layer (the last one registered).

    In every torchvision classifier with a Linear head that is the head (``fc``,
    ``classifier.N``, ``heads.head``, ``head``). It keeps PyTorch's default initialisation,
    as the CIFAR backbones' new classifiers do (torchvision zero-initialises ViT's head,
    which would make every gradient below it zero).
    """
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(net).__name__} has no Linear layer to replace for {num_classes} classes; "
            "use num_classes equal to its own output size"
        )
    name, old = linears[-1]
    if old.out_features == num_classes:
        return
    parent, _, child = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(net.get_submodule(parent), child, new)
    if isinstance(getattr(net, "num_classes", None), int):  # torchvision's ViT keeps one
        net.num_classes = num_classes


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier (``self.net``) behind the backbone interface.

    Layer names are the model's own under ``net.`` (``net.layer4``); the default one and
    the head after it come from :data:`TORCHVISION_FAMILIES`. An unlisted architecture
    works too: it declares no default layer (``default_layer == ""``), so the engine asks
    for ``layer=`` (a name or the module). ``features`` stops the forward at the layer (a
    hook that raises), so it costs only the trunk; ``head`` re-runs only what follows.

    Args:
        net: the torchvision model.
        num_classes: size of the output; a different one replaces the last Linear layer
            (:func:`replace_classifier`); None keeps the model's.
        name: the backbone's name, for messages.
    """

    in_channels = 3

    def __init__(self, net: nn.Module, num_classes: int | None = None, name: str = "") -> None:
        super().__init__()
        if num_classes is not None:
            replace_classifier(net, num_classes)
        self.net = net
        self.name = name or type(net).__name__
        self.family = torchvision_family(net)
        spec = self._spec
        self._layer = spec.layer(net) if spec else ""
        self.default_layer = f"net.{self._layer}" if spec else ""
        self.has_head = spec is not None and spec.head is not None
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self.num_classes = linears[-1].out_features if linears else None
        # torchvision's ViT takes exactly its image_size; the ImageNet CNNs halve the side
        # five times, so below 32 pixels their last map is empty or a pooling fails.
        self.min_input_size = int(getattr(net, "image_size", 32))
        self.exact_input_size = hasattr(net, "image_size")  # ViT: that size and no other

    @property
    def _spec(self) -> TorchvisionFamily | None:
        # Looked up, not stored: the table's lambdas do not pickle (DDP spawn, deepcopy).
        return TORCHVISION_FAMILIES[self.family] if self.family else None

    @property
    def classifier(self) -> nn.Linear | None:
        """The Linear right after GAP when that is the whole head (CAM applies), else None.

        A property, not an attribute: a second reference would put the weights twice in
        the state dict.
        """
        if self._spec is None or self._spec.classifier is None:
            return None
        return self._spec.classifier(self.net)

    def cascade_blocks(self) -> list[tuple[str, list[str]]]:
        """The model-randomisation order, head first: ``(label, module names)`` a step.

        ``net``'s top-level children from the last to the first, the stage containers
        (:data:`STAGE_CONTAINERS`: ``features``, ViT's ``encoder.layers``) one stage at a
        time: ResNet ``fc, layer4, layer3, layer2, layer1, bn1, conv1``; VGG ``classifier``,
        then ``features`` in blocks that end at a pooling layer; ConvNeXt, EfficientNet,
        MobileNetV3 and Swin their ``features`` stages last first. Names are relative to
        this backbone (``net.layer4``); children without parameters are skipped.
        """
        steps: list[tuple[str, list[str]]] = []
        for name, child in reversed(list(self.net.named_children())):
            steps += _cascade(child, name)
        return [(label, [f"net.{n}" for n in names]) for label, names in steps]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Input images -> the default layer's map ``[B, D, h, w]``."""
        if not self._layer:
            raise ValueError(f"{self.name} declares no default explanation layer")
        handle = self.net.get_submodule(self._layer).register_forward_hook(_stop_forward)
        try:
            self.net(x)
        except _Reached as reached:
            out = reached.output
        else:
            raise RuntimeError(f"{self.name}: the forward never reached {self._layer!r}")
        finally:
            handle.remove()
        return out.permute(0, 3, 1, 2) if self._spec.channels_last else out

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """The default layer's map ``[B, D, h, w]`` -> logits (families with ``has_head``)."""
        if not self.has_head:
            raise ValueError(f"{self.name}'s forward can not be cut at {self._layer!r}")
        return self._spec.head(self.net, a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Children of a torchvision model that hold its stages in order: the sanity cascade
# re-initialises them one stage at a time (a whole trunk at once would make the test's
# middle steps meaningless).
STAGE_CONTAINERS = ("features", "encoder.layers")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _cascade(module: nn.Module, name: str) -> list[tuple[str, list[str]]]:
    """``module`` (named ``name`` in the model) as cascade steps, last first."""
    if not _has_params(module):
        return []
    if name in STAGE_CONTAINERS:
        return _stages(module, name)
    if any(c.startswith(name + ".") for c in STAGE_CONTAINERS):  # ViT's encoder: go in
        steps = []
        for child_name, child in reversed(list(module.named_children())):
            steps += _cascade(child, f"{name}.{child_name}")
        return steps
    return [(name, [name])]


def _stages(seq: nn.Module, name: str) -> list[tuple[str, list[str]]]:
    """The stages of a stage container, last first. A flat one (VGG's ``features``: convs,
    norms, ReLUs, pools) is cut after each pooling layer, so a stage is a VGG block."""
    children = list(seq.named_children())
    if all(not any(True for _ in c.children()) for _, c in children):
        blocks, block = [], []
        for child_name, child in children:
            block.append(child_name)
            if isinstance(child, _POOLS):
                blocks.append(block)
                block = []
        if block:
            blocks.append(block)
    else:
        blocks = [[child_name] for child_name, _ in children]
    steps = []
    for block in reversed(blocks):
        names = [f"{name}.{b}" for b in block]
        if not any(_has_params(seq.get_submodule(b)) for b in block):
            continue
        label = names[0] if len(names) == 1 else f"{name}.{block[0]}-{block[-1]}"
        steps.append((label, names))
    return steps


def _stop_forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    raise _Reached(output)


def classification_models() -> list[str]:
    """torchvision's image classification models (not detection, segmentation, video...)."""
    return models.list_models(module=models)


def torchvision_backbone(
    name: str, num_classes: int = 10, pretrained: bool = False, weights: str | None = None
) -> TorchvisionBackbone:
    """A torchvision classifier by registry name: ``tv:resnet50``, ``tv:vit_b_16@DEFAULT``.

    Weights: the ``@<weights>`` suffix or ``weights`` names them (``IMAGENET1K_V1``,
    ``IMAGENET1K_V2``, ``DEFAULT``...; the model's weights enum lists them); else
    ``pretrained=True`` means ``DEFAULT`` (torchvision's best ImageNet weights) and False
    random weights. Weights come from the torch hub cache or a download; without either the
    error names the file and the folder, as for the CIFAR backbones. The head is replaced
    for ``num_classes`` unless the weights' own head already has that size (1000: the
    ImageNet classifier is kept).
    """
    arch = name.removeprefix(TORCHVISION_PREFIX)
    arch, _, suffix = arch.partition("@")
    spec = suffix or weights or ("DEFAULT" if pretrained else None)
    known = classification_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        raise ValueError(
            f"unknown torchvision classifier {arch!r}"
            + (f" (close: {close})" if close else "")
            + f"; choose one of {known}"
        )
    if spec is None:
        net = models.get_model(arch, weights=None)
    else:
        enum = models.get_model_weights(arch)
        if spec not in enum.__members__:
            raise ValueError(
                f"{arch} has no weights {spec!r}; choose one of {list(enum.__members__)}"
            )
        chosen = enum[spec]
        try:
            # torchvision sets the builder arguments the weights need (e.g. image_size)
            # and loads them with weights_only=True: a weights file can not run code.
            net = models.get_model(arch, weights=chosen)
        except Exception as exc:  # URLError, socket and HTTP errors, a bad cached file
            raise _weights_error(chosen, exc, _random_weights_fix(arch, suffix, weights,
                                                                  pretrained)) from exc
    return TorchvisionBackbone(net, num_classes=num_classes, name=f"{TORCHVISION_PREFIX}{arch}")


def _random_weights_fix(arch: str, suffix: str, weights: str | None, pretrained: bool) -> str:
    """How to ask for random weights, given what asked for pretrained ones: a pinned
    ``@<weights>`` suffix wins over ``weights`` and ``pretrained``, so it must go first
    (``pretrained=False`` alone changes nothing for ``tv:resnet18@IMAGENET1K_V1``)."""
    plain = f"{TORCHVISION_PREFIX}{arch}"
    if suffix:
        fix = f"drop '@{suffix}' from the backbone string (model.backbone: {plain})"
        also = [w for w, on in (("weights=None", weights), ("model.pretrained to false",
                                                               pretrained)) if on]
        return fix + (f" and set {' and '.join(also)}" if also else "")
    if weights:
        return f"pass weights=None for {plain}" + (
            " and set model.pretrained to false" if pretrained else "")
    return "set model.pretrained to false"
