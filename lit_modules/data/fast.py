"""The fast data path: a whole split as uint8 on the training device, augmented in batches.

Per-item loading (``SplitDataset`` through a ``DataLoader``) spends its time in Python,
collation and host-to-device copies, and on a GPU that, not the model, is what limits
small-image training (see DESIGN.md, "Where the speed is"). Here a split is copied to
the device once; each batch is one gather plus a few element-wise ops there.

The values are those of the per-item path (``SplitDataset.__getitem__``): uint8 ->
``[0, 1]`` -> (train only) reflect-padded random crop and horizontal flip, image and
object mask jointly -> spurious cue -> normalisation, with the same float operations in the
same order, so for the same crop and flip the batches are bitwise equal, and validation
and test batches (no randomness) are equal outright.

Randomness comes only from ``(seed, epoch)``: the epoch's order and its crop offsets and
flips are drawn on the CPU from private generators and moved to the device once per
epoch. A resumed run, a run on another device or one with another number of processes
therefore sees the same crops and flips for every image, and the global RNG is untouched.
The classic path draws its order and augmentation from the same functions
(``EpochSampler.indices``, ``split.augment_draws``), so with one process both paths serve
bitwise equal training batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from .cue import derive_seed
from .split import SplitDataset, augment_draws


def reflect_index(size: int, pad: int, device: torch.device | str = "cpu") -> Tensor:
    """Source position of each of the ``size + 2 * pad`` positions of a reflect-padded axis.

    The same mapping as ``F.pad(..., mode="reflect")`` (the edge pixel is not repeated), so
    gathering with it pads any dtype, uint8 and bool included, without a float copy.
    """
    if not 0 <= pad < size:
        raise ValueError(f"reflect padding needs 0 <= pad < size, got pad={pad} for size {size}")
    q = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(q >= size, 2 * (size - 1) - q, q)


class EpochSampler(Sampler[int]):
    """The order of one epoch, a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` at the start of every epoch
    (``_set_sampler_epoch`` in its fit loop), which is how the epoch reaches this object.
    With several processes, each takes every ``num_replicas``-th position of the same
    permutation, padded with its first items to a multiple of ``num_replicas`` (as
    ``DistributedSampler`` does) so that every rank runs the same number of steps.

    Args:
        size: number of items.
        shuffle: a fresh permutation every epoch; otherwise ``0..size-1``.
        seed: seed of the permutations.
        num_replicas: number of processes sharing the data.
        rank: this process's rank.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if size < 1:
            raise ValueError(f"an epoch needs at least one item, got size={size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def indices(self, epoch: int | None = None) -> Tensor:
        """This rank's items of ``epoch`` (default: the current one) in serving order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("fast-order", self.seed, epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        total = len(self) * self.num_replicas
        if total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


@dataclass
class DeviceSplit:
    """A ``SplitDataset``'s tensors and per-item settings, moved to one device.

    The spurious cue's per-item decisions (presence, corner) depend only on the item, so
    they are worked out once here with the cue's own methods, not once per epoch.
    """

    images: Tensor  # uint8 [N, 3, H, W]
    labels: Tensor  # int64 [N]
    object_masks: Tensor | None  # bool [N, H, W]
    split: str
    augment: bool
    crop_padding: int
    flip: bool
    mean: Tensor  # float32 [1, 3, 1, 1]
    std: Tensor
    cue_on: Tensor | None  # bool [N]
    cue_top: Tensor | None  # int64 [N]
    cue_left: Tensor | None
    cue_size: int
    cue_color: Tensor | None  # float32 [1, 3, 1, 1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_dataset(cls, dataset: SplitDataset, device: torch.device | str) -> DeviceSplit:
        """Copy ``dataset`` to ``device`` (no copy at all when it is already there)."""
        device = torch.device(device)
        n, _, h, w = dataset.images.shape
        # The per-item path augments train items only, whatever flip/crop_padding say.
        augment = dataset.split == "train" and (dataset.flip or dataset.crop_padding > 0)
        if augment and dataset.crop_padding > 0:
            reflect_index(min(h, w), dataset.crop_padding)  # refuse a pad F.pad would refuse
        cue = dataset.cue
        cue_on = cue_top = cue_left = cue_color = None
        if cue is not None:
            cue_on = torch.zeros(n, dtype=torch.bool)
            cue_top = torch.zeros(n, dtype=torch.long)
            cue_left = torch.zeros(n, dtype=torch.long)
            candidates = torch.isin(dataset.labels, torch.tensor(cue.classes)).nonzero().flatten()
            for i in candidates.tolist():
                if cue.has_cue(dataset.labels[i], i, dataset.split):
                    cue_on[i] = True
                    cue_top[i], cue_left[i] = cue.corner(h, w, i, dataset.split)
            cue_color = torch.tensor(cue.color, dtype=torch.float32).view(1, 3, 1, 1)
        moved = [
            None if t is None else t.to(device)
            for t in (dataset.object_masks, cue_on, cue_top, cue_left, cue_color)
        ]
        return cls(
            images=dataset.images.to(device),
            labels=dataset.labels.to(device),
            object_masks=moved[0],
            split=dataset.split,
            augment=augment,
            crop_padding=dataset.crop_padding if augment else 0,
            flip=dataset.flip and augment,
            mean=dataset.mean.view(1, 3, 1, 1).to(device),
            std=dataset.std.view(1, 3, 1, 1).to(device),
            cue_on=moved[1],
            cue_top=moved[2],
            cue_left=moved[3],
            cue_size=0 if cue is None else cue.size,
            cue_color=moved[4],
        )


@dataclass
class EpochDraws:
    """One epoch's randomness: the serving order and, per dataset index, crop and flip."""

    order: Tensor  # int64 [n], dataset indices of this rank in serving order
    tops: Tensor | None  # int64 [N], crop offset in 0..2p (None without cropping)
    lefts: Tensor | None
    flips: Tensor | None  # bool [N] (None without flipping)


def augment_batch(
    images: Tensor,
    masks: Tensor | None,
    tops: Tensor,
    lefts: Tensor,
    flips: Tensor,
    pad: int,
) -> tuple[Tensor, Tensor | None]:
    """Reflect-padded crop at ``(tops, lefts)`` then a flip where ``flips``, for a batch.

    ``images`` ``[B, C, H, W]`` and ``masks`` ``[B, H, W]`` of any dtype. The crop and the
    flip are one gather per axis: row ``i`` of item ``b`` comes from padded row
    ``tops[b] + i``, column ``j`` from padded column ``lefts[b] + j``, or
    ``lefts[b] + W - 1 - j`` when flipped (flipping the crop), and the padded positions map
    to source positions through ``reflect_index``.
    """
    b, c, h, w = images.shape
    device = images.device
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = reflect_index(h, pad, device)[tops[:, None] + ar_h]  # [B, H]
    cols = torch.where(flips[:, None], (w - 1) - ar_w, ar_w)
    cols = reflect_index(w, pad, device)[lefts[:, None] + cols]  # [B, W]
    images = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    images = images.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if masks is not None:
        masks = masks.gather(1, rows[:, :, None].expand(b, h, w))
        masks = masks.gather(2, cols[:, None, :].expand(b, h, w))
    return images, masks


class DeviceLoader:
    """Batches of a ``DeviceSplit`` in the project's batch format, made on its device.

    Every item is served exactly once per epoch (the last, partial batch is kept unless
    ``drop_last``); there are no worker processes. Lightning reaches ``sampler.set_epoch``
    each epoch; outside Lightning call ``set_epoch`` yourself. ``state_dict`` records how
    far into an epoch the loader got, so a run resumed from a mid-epoch checkpoint goes on
    with the rest of that epoch instead of starting it again.

    Args:
        data: the split on its device.
        batch_size: items per batch.
        shuffle: a new order every epoch (train); otherwise dataset order.
        seed: seed of the order and of the augmentation draws.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        num_replicas: number of processes sharing the data (see ``EpochSampler``).
        rank: this process's rank.
    """

    def __init__(
        self,
        data: DeviceSplit,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.sampler = EpochSampler(len(data), shuffle, seed, num_replicas, rank)
        # Lightning reads ``batch_sampler`` wherever it finds a ``sampler`` (DataLoader-like).
        self.batch_sampler = None
        self._served = (0, 0)  # (epoch, batches) of the iteration in progress or last done
        self._resume: tuple[int, int] | None = None
        n = len(self.sampler)
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last with {n} items and batch_size {batch_size} gives no batch")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def draws(self, epoch: int) -> EpochDraws:
        """The order, crops and flips of ``epoch`` (on the CPU), from ``(seed, epoch)`` only."""
        d = self.data
        tops = lefts = flips = None
        if d.augment:
            # The classic path's draws (per dataset index): the same crop and flip per image.
            tops, lefts, flips = augment_draws(self.seed, epoch, len(d), d.crop_padding, d.flip)
        return EpochDraws(self.sampler.indices(epoch), tops, lefts, flips)

    def batch(self, indices: Tensor, draws: EpochDraws) -> dict[str, Tensor]:
        """The batch of dataset ``indices`` (on the data's device) under ``draws``."""
        d = self.data
        images = d.images[indices]
        masks = None if d.object_masks is None else d.object_masks[indices]
        if draws.tops is not None:
            images, masks = augment_batch(
                images,
                masks,
                draws.tops[indices],
                draws.lefts[indices],
                draws.flips[indices],
                d.crop_padding,
            )
        b, _, h, w = images.shape
        images = images.float().div_(255.0)
        if masks is None:
            masks = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        if d.cue_on is not None:
            # Stamped after augmentation, as per item: the patch stays where the cue puts it.
            rows = torch.arange(h, device=images.device).view(1, h, 1)
            cols = torch.arange(w, device=images.device).view(1, 1, w)
            top = d.cue_top[indices].view(b, 1, 1)
            left = d.cue_left[indices].view(b, 1, 1)
            s = d.cue_size
            cue_mask = (
                d.cue_on[indices].view(b, 1, 1)
                & (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
            )
            images = torch.where(cue_mask[:, None], d.cue_color, images)
        else:
            cue_mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        return {
            "image": (images - d.mean) / d.std,
            "label": d.labels[indices],
            "object_mask": masks,
            "cue_mask": cue_mask,
            "index": indices,
        }

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # A generator: nothing is read until the first batch is asked for, which is after
        # Lightning's set_epoch even though it calls iter() before it.
        epoch = self.sampler.epoch
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        draws = self.draws(epoch)
        device = self.data.device
        order = draws.order.to(device, non_blocking=True)
        if draws.tops is not None:
            draws = EpochDraws(
                order,
                draws.tops.to(device, non_blocking=True),
                draws.lefts.to(device, non_blocking=True),
                draws.flips.to(device, non_blocking=True),
            )
        self._served = (epoch, skip)
        for k in range(skip, len(self)):
            batch = self.batch(order[k * self.batch_size : (k + 1) * self.batch_size], draws)
            # Counted when handed out: a checkpoint taken while the step runs includes it.
            self._served = (epoch, k + 1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (checkpoints load with ``weights_only=True``)."""
        return {"epoch": self._served[0], "batches": self._served[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration of the recorded epoch skip the batches already served."""
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
