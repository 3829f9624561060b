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


def split_for(model: nn.Module, layer: str | None) -> nn.Module | None:
    """The declared backbone whose ``features()`` ends exactly at ``layer``, else None."""
    found = find_split(model)
    if found is None or layer is None:
        return None
    backbone, prefix = found
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
    return prefix + backbone.default_layer


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled (even under inference mode), RNG forked; all undone on exit."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=rng_devices),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            model.eval()
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training


@dataclass
class ExplainContext:
    """Everything a method needs: the model, fresh inputs, the layer and the targets.

    ``selectors`` is ``[T, B, K]``: one one-hot row per image for each of the ``T`` maps
    asked for (``T = K`` classes when ``targets`` is None, else ``T = 1``). Methods return
    maps ``[T, B, h, w]``; :func:`explain.run` upsamples and arranges them.
    """

    model: nn.Module
    images: torch.Tensor
    layer: str | None
    selectors: torch.Tensor
    num_classes: int
    split: nn.Module | None = None  # backbone whose features() ends at ``layer``
    _hooks: list = field(default_factory=list)

    # -- forward passes -----------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward without graph (float32 logits)."""
        with torch.no_grad():
            return self.model(x).float()

    def activation(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's activation map for ``x`` (default: the images), no graph."""
        x = self.images if x is None else x
        with torch.no_grad():
            if self.split is not None:
                return self.split.features(x)
            _, act = self._forward_capture(x, grad=False)
            return act

    def activation_with_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act, logits)`` with ``act`` a leaf that requires grad and ``logits`` its function.

        The graph starts at the layer, so backward never walks the trunk.
        """
        if self.split is not None:
            with torch.no_grad():
                act = self.split.features(self.images)
            act = act.detach().requires_grad_(True)
            return act, self.split.head(act)
        logits, act = self._forward_capture(self.images, grad=True)
        return act, logits

    def head(self, act: torch.Tensor) -> torch.Tensor:
        """Logits from a (possibly modified) layer activation, re-running only what follows.

        With a declared split that is the head alone; otherwise the whole model runs with a
        forward hook that substitutes the layer's output (the images are repeated to match).
        """
        with torch.no_grad():
            if self.split is not None:
                return self.split.head(act).float()
            n = act.shape[0] // self.images.shape[0]
            x = self.images.repeat_interleave(n, 0) if n > 1 else self.images
            module = self.model.get_submodule(self.layer)
            handle = module.register_forward_hook(lambda m, i, o: act)
            try:
                return self.model(x).float()
            finally:
                handle.remove()

    def _forward_capture(self, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = getattr(output, "shape", type(output).__name__)
                raise ExplainError(
                    f"layer {self.layer!r} outputs {shape}; CAM methods need a 4-D conv map"
                )
            leaf = output.detach().requires_grad_(grad)
            store["act"] = leaf
            # A clone keeps the stored map intact if the next op is an in-place ReLU.
            return leaf.clone() if grad else leaf

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
    ) -> torch.Tensor:
        """Gradients of each selected class score w.r.t. ``wrt``: ``[T, *wrt.shape]``.

        All T classes come from one batched backward (``is_grads_batched``); if an op in
        the graph has no batching rule the classes are looped over instead. ``selectors``
        (``[T, N, K]``, default the context's own) serves outputs whose batch is not the
        images' (e.g. interpolated or noisy copies, ``N`` rows per forward).
        """
        sel = (self.selectors if selectors is None else selectors).to(outputs.dtype)
        if sel.shape[0] == 1:
            (g,) = torch.autograd.grad(outputs, wrt, grad_outputs=sel[0])
            return g.unsqueeze(0)
        try:
            (g,) = torch.autograd.grad(
                outputs, wrt, grad_outputs=sel, is_grads_batched=True, retain_graph=True
            )
            return g
        except RuntimeError:  # no vmap rule for some op: fall back to one backward a class
            return torch.stack(
                [
                    torch.autograd.grad(outputs, wrt, grad_outputs=s, retain_graph=True)[0]
                    for s in sel
                ]
            )

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Pick the selected classes from per-image scores ``[B, K]`` (or ``[..., B, K]``).

        Returns ``[T, B]`` (or ``[..., T, B]``): the score of each selected class.
        """
        return torch.einsum("...bk,tbk->...tb", scores, self.selectors.to(scores.dtype))


def make_selectors(
    targets: torch.Tensor | None, batch: int, num_classes: int, device: torch.device
) -> torch.Tensor:
    """``[T, B, K]`` one-hot selectors: every class (``targets=None``) or one per image."""
    if targets is None:
        eye = torch.eye(num_classes, device=device)
        return eye[:, None, :].expand(num_classes, batch, num_classes).contiguous()
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.numel() != batch:
        raise ExplainError(f"targets has {targets.numel()} entries for a batch of {batch}")
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise ExplainError(
            f"targets out of range for {num_classes} classes: {targets[bad].tolist()}"
        )
    return nn.functional.one_hot(targets, num_classes).float()[None]


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """Check a layer name, listing valid names on a miss."""
    if layer is None:
        return default_layer(model)
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        near = [n for n in names if layer.split(".")[-1] in n][:10]
        hint = f" (close: {near})" if near else ""
        raise ExplainError(
            f"no layer named {layer!r} in {type(model).__name__}{hint}; valid names: "
            f"{', '.join(names[:60])}{' ...' if len(names) > 60 else ''}"
        )
    return layer


Method = Callable[..., torch.Tensor]
