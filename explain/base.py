"""The explaining() guard and the ExplainContext every method receives.

Contract (see DESIGN.md): the model is left exactly as found: train/eval flag of every
submodule, no hooks left (also after an exception), parameter ``.grad`` untouched
(gradients come from ``torch.autograd.grad`` on activations or inputs, never
``.backward()``), BatchNorm statistics unchanged (eval mode while explaining), the global
RNG stream unchanged. It works inside ``torch.inference_mode()`` and ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .fold import fold_batchnorm
from .registry import CLASS_SELECTION


class ExplainError(ValueError):
    """Bad input to the explanation engine (layer name, targets, head type...)."""


def find_split(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Return ``(backbone, prefix)`` when ``model`` declares a features/head split.

    A model declares one by being such a backbone (``features``, ``head``,
    ``default_layer``) or by naming one in its ``explain_backbone`` attribute (the
    LightningModule does); ``prefix`` turns the backbone's layer names into model names.
    The split is only trusted when the model's forward is the backbone's forward, which is
    what declaring it promises.
    """
    if all(hasattr(model, a) for a in ("features", "head", "default_layer")):
        return model, ""
    name = getattr(model, "explain_backbone", None)
    if isinstance(name, str):
        sub = model.get_submodule(name)
        if all(hasattr(sub, a) for a in ("features", "head", "default_layer")):
            return sub, name + "."
    return None


def folded_model(model: nn.Module) -> nn.Module:
    """``model``'s forward with eval BatchNorm folded into the convs (:mod:`explain.fold`).

    A model that declares a features/head split is folded through its backbone (its
    forward is the backbone's); a model that can not be traced is returned as it is.
    """
    split = find_split(model)
    return fold_batchnorm(split[0] if split is not None else model)[0]


def split_for(model: nn.Module, layer: str | None) -> nn.Module | None:
    """The declared backbone whose ``features()`` ends exactly at ``layer``, else None."""
    found = find_split(model)
    if found is None or layer is None:
        return None
    backbone, prefix = found
    # A backbone whose forward can not be cut at its layer (ViT: the last block's residual
    # needs the block's input, not only the layer's output) declares has_head = False.
    if not getattr(backbone, "has_head", True) or not backbone.default_layer:
        return None
    return backbone if layer == prefix + backbone.default_layer else None


def default_layer(model: nn.Module) -> str:
    """The model's declared explanation layer, or a clear error when it declares none."""
    split = find_split(model)
    if split is None:
        raise ExplainError(
            "this model declares no default explanation layer: pass layer='<module name>' "
            "(a conv block whose output is [B, C, h, w])"
        )
    backbone, prefix = split
    if not backbone.default_layer:
        raise ExplainError(
            f"{type(backbone).__name__} declares no default explanation layer for this "
            "architecture: pass layer='<module name>' or the module itself"
        )
    return prefix + backbone.default_layer


def first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution registered in ``model`` (its input layer, in every usual net)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return name, module
    return None


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse a batch the model can not take, naming the expected and the actual shape.

    Checks what is knowable without running the model: 4-D, floating point (normalised
    inputs, not raw uint8), non-empty, and a channel count equal to the first conv's
    ``in_channels``. Sizes the network cannot take are diagnosed in :func:`explain.run`.
    """
    shape = tuple(images.shape)
    if images.dim() != 4:
        raise ExplainError(f"images must be [B, C, H, W], got shape {shape}")
    if not images.is_floating_point():
        raise ExplainError(
            f"images must be floating point, normalised as the model was trained, "
            f"got {images.dtype} {shape}"
        )
    if images.numel() == 0:
        raise ExplainError(f"images are empty: shape {shape}")
    found = first_conv(model)
    if found is not None and images.shape[1] != found[1].in_channels:
        name, conv = found
        raise ExplainError(
            f"{type(model).__name__} expects images [B, {conv.in_channels}, H, W] (its first "
            f"conv {name!r} has in_channels={conv.in_channels}), got {shape}"
        )


def input_size_problem(model: nn.Module, images: torch.Tensor) -> str | None:
    """After a failed run: why, if it is the images' size; None if that is not the cause.

    The model runs on one image of the given size; if that fails and a larger size
    (doubling, up to 512 pixels) works, the size is the problem. Only called on the failure
    path, so a successful run pays nothing for it.
    """
    b, c, h, w = images.shape
    with torch.no_grad():
        try:
            model(images[:1])
            return None  # the size is fine: the failure has another cause
        except Exception:
            pass
        factor = 2
        while max(h, w) * factor <= 512:
            try:
                model(images.new_zeros(1, c, h * factor, w * factor))
            except Exception:
                factor *= 2
                continue
            return (
                f"{type(model).__name__} cannot run on images of {h}x{w} (shape "
                f"{(b, c, h, w)}): they are smaller than the network can take; it runs on "
                f"{h * factor}x{w * factor}"
            )
    return None


# -- token layers: how a layer's output becomes a map [B, D, h, w] ----------------------------
LAYOUTS = ("nchw", "nhwc", "tokens")
_MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens; more reads as "not a grid"


@dataclass(frozen=True)
class MapLayout:
    """How a layer's output is laid out, so the CAM family can read it as ``[B, D, h, w]``.

    * ``nchw``: a conv map, used as it is.
    * ``nhwc``: channels last ``[B, h, w, D]`` (Swin's blocks, norms and merges).
    * ``tokens``: ``[B, prefix + h*w, D]``, ``prefix`` tokens (ViT's class token) before
      the patch grid in row-major order. ``grid`` is ``(h, w)``; None infers it from the
      token count and the images' aspect ratio. The prefix tokens are no part of the map:
      when a method feeds a changed map back (ablation, Recipro-CAM) they keep their
      original values, and gradients are taken with them held fixed.

    Users never write a reshape function: :func:`layer_layout` finds the layout.
    """

    kind: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ExplainError(f"layout kind must be one of {LAYOUTS}, got {self.kind!r}")

    def to_map(self, out: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """The layer output as ``[B, D, h, w]``; the input itself where it is already one."""
        if self.kind == "nchw" or out.dim() not in (3, 4):
            return out  # the caller's shape check names what is wrong
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2) if out.dim() == 4 else out
        if out.dim() != 3:
            return out
        b, n, d = out.shape
        grid = self.grid or token_grid(n - self.prefix, image_hw)
        if grid is None or grid[0] * grid[1] != n - self.prefix:
            raise ExplainError(
                f"a token layer's output {tuple(out.shape)} has {n - self.prefix} tokens after "
                f"{self.prefix} prefix token(s): not a grid of patches of the "
                f"{image_hw[0]}x{image_hw[1]} images"
            )
        return out[:, self.prefix :].transpose(1, 2).reshape(b, d, *grid)

    def from_map(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A (changed) map ``a`` put back in the layer's layout, in fresh memory.

        ``out`` is the layer's original output: the prefix tokens come from it, detached.
        Fresh memory because an in-place op after the layer (ReLU(inplace=True)) must not
        overwrite the map the engine keeps.
        """
        if self.kind == "nchw":
            return a.clone()
        if self.kind == "nhwc":
            return a.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
        tokens = a.flatten(2).transpose(1, 2)
        return torch.cat([out[:, : self.prefix].detach().to(tokens.dtype), tokens], 1)


def token_grid(count: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` with ``h * w == count`` and ``h / w`` the images' aspect ratio, or None."""
    if count < 1:
        return None
    # Square patches: h / w = H / W, so h = sqrt(count * H / W) must be a whole number.
    h = round((count * image_hw[0] / image_hw[1]) ** 0.5)
    if h < 1 or count % h:
        return None
    w = count // h
    return (h, w) if h * image_hw[1] == w * image_hw[0] else None


def infer_layout(out_shape: tuple[int, ...], image_hw: tuple[int, int]) -> MapLayout:
    """A layout from the output's shape alone: 4-D is a conv map; ``[B, N, D]`` is read as
    up to 8 prefix tokens then a patch grid with the images' aspect ratio (fewest prefix
    tokens first); anything else stays as it is (and is refused by the shape check)."""
    if len(out_shape) != 3:
        return MapLayout("nchw")
    n = out_shape[1]
    for prefix in range(min(_MAX_PREFIX_TOKENS, n - 1) + 1):
        grid = token_grid(n - prefix, image_hw)
        if grid is not None:
            return MapLayout("tokens", prefix, grid)
    return MapLayout("nchw")


def _torchvision_layout(net: nn.Module, name: str, module: nn.Module) -> MapLayout | None:
    """The layout of layer ``name`` (relative to ``net``) in torchvision's ViT and Swin."""
    try:
        from torchvision.models import SwinTransformer, VisionTransformer
    except ImportError:  # torchvision is optional for the engine
        return None
    if isinstance(net, VisionTransformer):
        if name == "encoder" or name.startswith("encoder."):
            p = net.patch_size
            # torchvision's ViT takes exactly image_size x image_size images.
            grid = (net.image_size // p, net.image_size // p)
            return MapLayout("tokens", prefix=1, grid=grid)
        return MapLayout("nchw")  # conv_proj
    if isinstance(net, SwinTransformer):
        # Everything in Swin is channels-last except the patch-embedding conv and what
        # follows the final permute (avgpool sees [B, D, h, w]).
        if isinstance(module, nn.modules.conv._ConvNd) or name in ("permute", "avgpool"):
            return MapLayout("nchw")
        return MapLayout("nhwc")
    return None


def layer_layout(model: nn.Module, layer: str) -> MapLayout | None:
    """How ``layer``'s output becomes a map, declared by the model; None: infer it.

    A module on the layer's path (the nearest first) declares it with
    ``explain_layout(name) -> MapLayout | None``, ``name`` relative to that module;
    torchvision's ``VisionTransformer`` (tokens after the class token) and
    ``SwinTransformer`` (channels last) are known without declaring. None means
    :func:`infer_layout` reads it from the output's shape.
    """
    module = model.get_submodule(layer)
    parts = layer.split(".") if layer else []
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        rel = ".".join(parts[depth:])
        declare = getattr(owner, "explain_layout", None)
        found = declare(rel) if callable(declare) else None
        if found is None:
            found = _torchvision_layout(owner, rel, module)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; on exit (also after an exception) give every submodule
    back its own train/eval flag.

    ``model.train()`` on exit would be wrong: it sets every submodule alike, so a backbone
    the user froze in eval mode (or a BatchNorm kept in eval while fine-tuning) would come
    back training. The flags are set directly for the same reason.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled (even under inference mode), RNG forked; all undone on exit."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rng_devices = [device] if device.type == "cuda" else []
    with (
        eval_mode(model),
        torch.random.fork_rng(devices=rng_devices),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


@dataclass
class ExplainContext:
    """Everything a method needs: the model, fresh inputs, the layer and the targets.

    ``selectors`` is ``[T, B, K]``: one one-hot row per image for each of the ``T`` maps
    asked for (``T = K`` classes when ``targets`` is None, else ``T = 1``). Methods return
    maps ``[T, B, h, w]``; :func:`explain.run` upsamples and arranges them. ``run`` may
    call a method several times on copies of the context that differ only in a chunk of
    ``selectors``: the forward passes that do not depend on the classes are memoised in
    ``_memo`` (shared by the copies), so each chunk pays only its own backward passes.
    """

    model: nn.Module
    images: torch.Tensor
    layer: str | None
    selectors: torch.Tensor
    num_classes: int
    split: nn.Module | None = None  # backbone whose features() ends at ``layer``
    layout: MapLayout | None = None  # how the layer's output is a map; None: from its shape
    _folded: nn.Module | None = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    # -- forward passes -----------------------------------------------------------------
    def folded(self) -> nn.Module:
        """The model with eval BatchNorm folded into its convs, built once per context.

        The same function up to float rounding, for input gradients that do not read a
        layer (integrated_gradients).
        """
        if self._folded is None:
            self._folded = folded_model(self.model)
        return self._folded

    def memo(self, key: str, make: Callable[[], object]) -> object:
        """``make()`` once per images tensor and ``key``, shared by class-chunk copies.

        An entry keeps its images tensor and is used only for that very object (``is``), so
        a copy with other images (smoothgrad's noisy ones) never reads a stale entry.
        """
        entry = self._memo.get(key)
        if entry is None or entry[0] is not self.images:
            entry = (self.images, make())
            self._memo[key] = entry
        return entry[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward without graph (float32 logits).

        The model as given: folding BatchNorm or channels_last inputs did not make a
        graph-free forward measurably faster on a CPU (bench/engine_paths.py).
        """
        with torch.no_grad():
            return self.model(x).float()

    def activation(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's activation map ``[B, D, h, w]`` for ``x`` (default: the images), no graph."""
        if x is None:
            return self.memo("activation", lambda: self.activation(self.images))
        with torch.no_grad():
            if self.split is not None:
                return self._check_map(self.split.features(x))
            _, act = self._forward_capture(x, grad=False)
            return act

    def _layout_of(self, output: torch.Tensor) -> MapLayout:
        if self.layout is None:
            self.layout = infer_layout(tuple(output.shape), tuple(self.images.shape[-2:]))
        return self.layout

    def _to_map(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output as a checked map ``[B, D, h, w]`` (see :class:`MapLayout`)."""
        if isinstance(output, torch.Tensor):
            output = self._layout_of(output).to_map(output, tuple(self.images.shape[-2:]))
        return self._check_map(output)

    def _check_map(self, act: torch.Tensor) -> torch.Tensor:
        """Refuse a layer output that is not a spatial map (4-D, more than one cell)."""
        if not isinstance(act, torch.Tensor) or act.dim() != 4:
            shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise ExplainError(
                f"layer {self.layer!r} outputs {shape}: not a spatial map. Layer methods need "
                "a 4-D conv map [B, C, h, w], channels-last [B, h, w, C] (Swin) or patch "
                "tokens [B, prefix + h*w, D] (ViT); pick such a layer"
            )
        if act.shape[-2:] == (1, 1):
            h, w = self.images.shape[-2:]
            raise ExplainError(
                f"layer {self.layer!r} gives a 1x1 map for {h}x{w} images: one cell cannot "
                "show where the evidence is. Use larger images (the CIFAR backbones are "
                "built for 32x32, where their map is 4x4) or an earlier layer."
            )
        return act

    def activation_with_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act, logits)`` with ``act`` a leaf that requires grad and ``logits`` its function.

        The graph starts at the layer, so backward never walks the trunk. Memoised: class
        chunks share one forward (the graph is kept, see :meth:`grads_of_selected`).
        """
        return self.memo("activation_with_logits", self._activation_with_logits)

    def _activation_with_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split is not None:
            with torch.no_grad():
                act = self._check_map(self.split.features(self.images))
            act = act.detach().requires_grad_(True)
            return act, self.split.head(act)
        logits, act = self._forward_capture(self.images, grad=True)
        return act, logits

    def input_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, logits)``: the images as a leaf that requires grad and the model's logits.

        Memoised like :meth:`activation_with_logits`, for the pixel gradient methods.
        """

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            x = self.images.detach().requires_grad_(True)
            return x, self.model(x)

        return self.memo("input_graph", make)

    def head(self, act: torch.Tensor) -> torch.Tensor:
        """Logits from a (possibly modified) layer activation, re-running only what follows.

        With a declared split that is the head alone; otherwise the whole model runs with a
        forward hook that substitutes the layer's output (the images are repeated to match;
        a token layer's prefix tokens keep their values, see :class:`MapLayout`).
        """
        with torch.no_grad():
            if self.split is not None:
                return self.split.head(act).float()
            n = act.shape[0] // self.images.shape[0]
            x = self.images.repeat_interleave(n, 0) if n > 1 else self.images
            module = self.model.get_submodule(self.layer)
            handle = module.register_forward_hook(
                lambda m, i, o: self._layout_of(o).from_map(act.to(o.dtype), o)
            )
            try:
                return self.model(x).float()
            finally:
                handle.remove()

    def _forward_capture(self, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            leaf = self._to_map(output).detach().requires_grad_(grad)
            store["act"] = leaf
            # Fresh memory (from_map) keeps the stored map intact if the next op is an
            # in-place ReLU; for a token layer it re-attaches the class token.
            return self._layout_of(output).from_map(leaf, output)

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, store["act"]

    # -- gradients ----------------------------------------------------------------------
    def grads_of_selected(
        self,
        outputs: torch.Tensor,
        wrt: torch.Tensor,
        selectors: torch.Tensor | None = None,
        batched: bool = True,
    ) -> torch.Tensor:
        """Gradients of each selected class score w.r.t. ``wrt``: ``[T, *wrt.shape]``.

        ``batched``: all T classes from one batched backward (``is_grads_batched``), the
        right choice for a short graph (the head, for the CAM family); if an op in the
        graph has no batching rule the classes are looped over instead. ``batched=False``
        loops over the classes on the one graph: for a backward through a whole conv
        network that measured 25-30% faster than the batched one on a CPU (BENCHMARKS.md)
        and holds one class's gradients at a time. ``selectors`` (``[T, N, K]``, default
        the context's own) serves outputs whose batch is not the images' (e.g.
        interpolated or noisy copies, ``N`` rows per forward).
        """
        sel = (self.selectors if selectors is None else selectors).to(outputs.dtype)
        # retain_graph everywhere: a memoised graph serves the next chunk of classes; an
        # unmemoised one is freed as soon as the caller drops its outputs.
        if sel.shape[0] == 1:
            (g,) = torch.autograd.grad(outputs, wrt, grad_outputs=sel[0], retain_graph=True)
            return g.unsqueeze(0)
        if batched:
            try:
                (g,) = torch.autograd.grad(
                    outputs, wrt, grad_outputs=sel, is_grads_batched=True, retain_graph=True
                )
                return g
            except RuntimeError:  # no vmap rule for some op: one backward a class
                pass
        return torch.stack(
            [torch.autograd.grad(outputs, wrt, grad_outputs=s, retain_graph=True)[0] for s in sel]
        )


#: Kept for callers that read the number: the rule itself is
#: :data:`explain.registry.CLASS_SELECTION`.
ALL_CLASSES_MAX = CLASS_SELECTION.max_all


def auto_targets(
    labels: torch.Tensor, preds: torch.Tensor, num_classes: int
) -> torch.Tensor | None:
    """The ``targets`` of the ``auto`` rule (:meth:`ClassSelection.targets`)."""
    return CLASS_SELECTION.targets(labels, preds, num_classes)


def make_selectors(
    targets: torch.Tensor | None, batch: int, num_classes: int, device: torch.device
) -> torch.Tensor:
    """``[T, B, K]`` one-hot selectors: every class (``targets=None``), one per image
    (``targets`` ``[B]``, ``T = 1``) or ``T`` per image (``targets`` ``[B, T]``)."""
    if targets is None:
        eye = torch.eye(num_classes, device=device)
        return eye[:, None, :].expand(num_classes, batch, num_classes).contiguous()
    targets = torch.as_tensor(targets, device=device)
    if targets.dim() == 2 and targets.shape[0] == batch and targets.shape[1] >= 1:
        # Several classes an image (true and predicted): one call shares the class-free
        # forwards (occlusion, LIME, Score-CAM) between them.
        columns = [make_selectors(t, batch, num_classes, device) for t in targets.unbind(1)]
        return torch.cat(columns)
    # A float or bool tensor is a mistake (scores, one-hot rows): .long() would truncate it.
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ExplainError(
            f"targets must be integer class indices [B] or [B, T], got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    targets = targets.long().reshape(-1)
    if targets.numel() != batch:
        raise ExplainError(f"targets has {targets.numel()} entries for a batch of {batch}")
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise ExplainError(
            f"targets out of range for {num_classes} classes: {targets[bad].tolist()}"
        )
    return nn.functional.one_hot(targets, num_classes).float()[None]


def check_batch_size(batch_size: int) -> None:
    """Refuse a chunk size below one (every batched method takes ``batch_size``)."""
    if int(batch_size) < 1:
        raise ExplainError(f"batch_size must be >= 1, got {batch_size}")


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> str:
    """The qualified name of ``layer`` (a name, a submodule of ``model``, or None for the
    declared default); a wrong name lists valid names."""
    if layer is None:
        return default_layer(model)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules(remove_duplicate=False):
            if module is layer and name:
                return name
        raise ExplainError(
            f"the layer given ({type(layer).__name__}) is not a submodule of "
            f"{type(model).__name__}: pass a module of this model or its name"
        )
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        near = [n for n in names if layer.split(".")[-1] in n][:10]
        hint = f" (close: {near})" if near else ""
        raise ExplainError(
            f"no layer named {layer!r} in {type(model).__name__}{hint}; valid names: "
            f"{', '.join(names[:60])}{' ...' if len(names) > 60 else ''}"
        )
    return layer

