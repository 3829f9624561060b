"""The classic path's training loader: a ``DataLoader`` whose every draw is a function of
``(seed, epoch)``, and which can resume in the middle of an epoch.

A plain ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` draws
each epoch's order from a generator whose state after ``k`` epochs is not in any
checkpoint: a run resumed at epoch ``k`` starts that generator afresh and replays epoch 0's
order. Items were augmented from the global RNG of whichever process loaded them, and a
run resumed mid-epoch started the epoch over. Here:

* the order is :class:`~lit_modules.data.fast.EpochSampler`'s (the fast path's), a
  function of ``(seed, epoch)``; Lightning calls ``set_epoch`` every epoch;
* the sampler yields :class:`~lit_modules.data.split.ItemKey` ``(index, epoch, seed)``
  instead of indices, so a dataset in a worker process (a copy made once, workers persist)
  knows which epoch's crop and flip to apply (``split.augment_draws``);
* the workers' base seed comes from a generator seeded with ``(seed, epoch)``, not from the
  global RNG, which the loader leaves untouched;
* ``state_dict`` records how far into its epoch the loader got (Lightning stores it in a
  checkpoint's loop state and hands it back on resume), and the next iteration of that
  epoch skips the batches already served, as the fast path's ``DeviceLoader`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .cue import derive_seed
from .fast import EpochSampler
from .split import ItemKey


class EpochKeySampler(DistributedSampler):
    """:class:`EpochSampler`'s order for a ``DataLoader``, as item keys.

    A ``DistributedSampler`` only so that Lightning leaves it in place under DDP (it
    replaces or wraps any other sampler); the sharding over processes is
    :class:`EpochSampler`'s, the fast path's.

    Args:
        dataset: the dataset (its length is used).
        shuffle: a fresh permutation every epoch; otherwise dataset order.
        seed: seed of the order and of the items' augmentation.
        num_replicas: number of processes sharing the data.
        rank: this process's rank.
        keys: yield :class:`ItemKey` (for datasets with ``item_keys = True``); otherwise
            plain indices.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        keys: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed)
        self.order = EpochSampler(len(dataset), shuffle, seed, num_replicas, rank)
        self.keys = keys
        self.start = 0  # positions the next iteration skips (once), for a mid-epoch resume

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[ItemKey | int]:
        epoch, start = self.order.epoch, self.start
        self.start = 0
        indices = self.order.indices(epoch)[start:].tolist()
        if not self.keys:
            return iter(indices)
        return (ItemKey(i, epoch, self.seed) for i in indices)


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochKeySampler`, resumable mid-epoch.

    Takes ``DataLoader``'s arguments (Lightning may rebuild it from them). Iterating is
    lazy: nothing is drawn until the first batch is asked for, which comes after
    Lightning's ``set_epoch`` even though Lightning calls ``iter()`` before it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = (0, 0)  # (epoch, batches) of the iteration in progress or last done
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Outside Lightning: choose the epoch the next iteration serves."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        sampler = self.sampler
        keyed = isinstance(sampler, EpochKeySampler)  # Lightning may have swapped it out
        epoch = sampler.order.epoch if keyed else 0
        skip = 0
        if keyed and self._resume is not None and self._resume[0] == epoch:
            skip = min(self._resume[1], len(self))
            sampler.start = skip * self.batch_size
        self._resume = None
        if self.generator is not None and keyed:
            # The workers' base seed is drawn from this generator, once per iterator.
            self.generator.manual_seed(derive_seed("loader", sampler.seed, epoch))
        self._served = (epoch, skip)
        served = skip
        for batch in super().__iter__():
            served += 1
            # Counted when handed out: a checkpoint taken while the step runs includes it.
            self._served = (epoch, served)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (checkpoints load with ``weights_only=True``)."""
        return {"epoch": self._served[0], "batches": self._served[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration of the recorded epoch skip the batches already served."""
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))


def epoch_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    **kwargs: Any,
) -> EpochDataLoader:
    """The classic path's shuffled training loader over ``dataset`` (``kwargs``: the other
    ``DataLoader`` arguments: workers, pinning)."""
    sampler = EpochKeySampler(dataset, True, seed, num_replicas, rank,
                              keys=bool(getattr(dataset, "item_keys", False)))
    return EpochDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                           generator=torch.Generator(), **kwargs)
