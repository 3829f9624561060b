"""Calling a classifier for measures: eval mode, no autograd, batched probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from explain.base import eval_mode
from explain.chunks import fill_chunks


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; every module's train flag is restored on exit."""
    with eval_mode(model), torch.no_grad():
        yield


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def predict_proba(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax probabilities ``[N, K]`` (float32, on ``images``' device), in chunks."""
    if len(images) == 0:
        return torch.empty(0)
    device = model_device(model)
    with eval_no_grad(model):
        return fill_chunks(len(images), batch_size, lambda lo, hi: model(
            images[lo:hi].to(device)).float().softmax(-1).to(images.device))


def target_probability(probs: Tensor, targets: Tensor) -> Tensor:
    return probs.gather(-1, targets.to(probs.device).long().view(-1, 1)).squeeze(-1)
