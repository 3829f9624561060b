"""Chunked model calls whose outputs are gathered into one tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fill_chunks(count: int, per_chunk: int, run: Callable[[int, int], torch.Tensor],
                dim: int = 0) -> torch.Tensor:
    """``run(lo, hi)`` (``hi - lo`` long along ``dim``) for consecutive chunks of
    ``range(count)``, concatenated along ``dim``.

    The result is allocated at the first chunk and filled in place. A list of small
    outputs kept alive between large short-lived inputs (masked batches, copies of a
    layer) fragments the C heap, which then keeps the freed blocks: Ablation-CAM's 512
    chunks on 64 images raised the process's peak by 360-780 MB that way, by 0 MB filled
    in place (BENCHMARKS.md, "An audit in a minute").
    """
    if count < 1 or per_chunk < 1:
        raise ValueError(f"fill_chunks needs count and per_chunk >= 1, got {count}, {per_chunk}")
    out = None
    for lo in range(0, count, per_chunk):
        hi = min(count, lo + per_chunk)
        part = run(lo, hi)
        if out is None:
            shape = list(part.shape)
            shape[dim] = count
            out = part.new_empty(shape)
        out.narrow(dim, lo, hi - lo).copy_(part)
        del part
    return out
