"""Re-fit a classifier's last layer to convergence on features it has already computed.

The ``refit`` counter-measure of :mod:`lit_modules.shortcut_removal` (last-layer
re-training, Kirichenko et al. 2022): the backbone is frozen, its head inputs are collected
on training batches whose shortcut boxes were decorrelated from the label, and the last
``nn.Linear`` is fitted to them by full-batch L-BFGS (a convex problem: softmax regression
with an L2 term), starting from its current weights. A cue the backbone still encodes
then carries no label information in the data the head is fitted to, so the head stops
reading it; every other feature the backbone learned (for the shortcut's class too) is
weighed afresh.

The rows are collected during the epoch's training steps (the model in eval mode, no
gradient), so the data path, its augmentations and the decorrelation are the run's own; a
run resumed in the middle of an epoch fits the head to the rows of the batches after the
resume.

Why full-batch and not a few more SGD steps: measured on the benchmark's small model
(BENCHMARKS.md), one or four epochs of AdamW on the head alone left most of a strong
shortcut in place (margin +0.17 to +0.38) where L-BFGS on the same features removed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: Most feature rows kept for a re-fit (the first ones of the epoch): 65,536 x 2,048
#: float32 features are 512 MiB; a CIFAR-10 epoch (45,000 images) fits whole.
MAX_ROWS = 65_536
#: L-BFGS iterations of one re-fit (each one forward and backward of a linear layer over
#: the rows; the benchmark's fits converge in fewer).
MAX_ITER = 300


@dataclass
class FeatureBank:
    """Head inputs and labels collected over an epoch, up to ``max_rows``."""

    max_rows: int = MAX_ROWS
    features: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    rows: int = 0

    def add(self, features: Tensor, labels: Tensor) -> None:
        room = self.max_rows - self.rows
        if room <= 0:
            return
        f, y = features.detach()[:room], labels.detach().long()[:room]
        self.features.append(f.flatten(1).float())
        self.labels.append(y)
        self.rows += f.shape[0]

    def take(self) -> tuple[Tensor, Tensor]:
        """The collected rows ``[N, D]`` and labels ``[N]``; the bank is empty afterwards."""
        if not self.features:
            raise ValueError("no features were collected for the head re-fit (an epoch "
                             "without training batches?)")
        out = torch.cat(self.features), torch.cat(self.labels)
        self.features, self.labels, self.rows = [], [], 0
        return out


def fit_head(head: nn.Linear, features: Tensor, labels: Tensor, l2: float = 1e-4,
             class_weights: Tensor | None = None, max_iter: int = MAX_ITER) -> float:
    """Fit ``head`` in place to ``features`` ``[N, D]`` and ``labels`` ``[N]``: minimise the
    (weighted) mean cross-entropy plus ``l2`` times the squared norm of the weights (not
    the bias), from the head's current weights. Returns the final loss."""
    if features.ndim != 2 or features.shape[1] != head.in_features:
        raise ValueError(f"the head takes {head.in_features} features, got rows of shape "
                         f"{tuple(features.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    x = features.float()
    y = labels.long().to(x.device)
    w = head.weight.detach().float().clone().to(x.device).requires_grad_(True)
    has_bias = head.bias is not None
    b = (head.bias.detach().float().clone() if has_bias
         else torch.zeros(head.out_features)).to(x.device).requires_grad_(has_bias)
    cw = None if class_weights is None else class_weights.float().to(x.device)
    opt = torch.optim.LBFGS([w, b] if has_bias else [w], lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y, weight=cw) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(x @ w.T + b, y, weight=cw)
                      + l2 * w.pow(2).sum())
        head.weight.copy_(w.to(head.weight))
        if has_bias:
            head.bias.copy_(b.to(head.bias))
    return final
