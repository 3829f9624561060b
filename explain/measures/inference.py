"""Calling a classifier for measures: eval mode, no autograd, batched probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from explain.base import eval_mode


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; every module's train flag is restored on exit."""
    with eval_mode(model), torch.no_grad():
        yield


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def predict_proba(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax probabilities ``[N, K]`` (float32, on ``images``' device), in chunks."""
    device = model_device(model)
    out = []
    with eval_no_grad(model):
        for chunk in images.split(batch_size):
            out.append(model(chunk.to(device)).float().softmax(-1).to(images.device))
    return torch.cat(out) if out else torch.empty(0)


def target_probability(probs: Tensor, targets: Tensor) -> Tensor:
    return probs.gather(-1, targets.to(probs.device).long().view(-1, 1)).squeeze(-1)
