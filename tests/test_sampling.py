"""Picking and stacking dataset items (lit_modules/data/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices


class _Pairs(torch.utils.data.Dataset):
    """(image, label) pairs with no labels attribute: labels are read item by item."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), float(i)), i % 3


def test_labels_and_batches_from_pairs_and_dicts() -> None:
    assert dataset_labels(_Pairs()).tolist() == [0, 1, 2, 0, 1, 2]
    batch = sample_batch(_Pairs(), [4, 0])
    assert batch["label"].tolist() == [1, 0]
    assert batch["image"][:, 0, 0, 0].tolist() == [4.0, 0.0]
    dicts = [{"image": torch.full((1, 2, 2), float(i)), "label": i, "name": f"x{i}"}
             for i in range(3)]
    stacked = sample_batch(dicts, [2, 1])
    assert sorted(stacked) == ["image", "label"]  # strings are dropped
    assert stacked["label"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="at least one"):
        sample_batch(dicts, [])


def test_first_picks_are_one_per_class_in_class_order() -> None:
    labels = torch.tensor([2, 2, 0, 1, 1, 1, 0])
    picked = stratified_indices(labels, 5, seed=4)
    assert labels[picked[:3]].tolist() == [0, 1, 2]
    assert len(set(picked)) == 5
    assert stratified_indices(labels, 100, seed=4)[:5] == picked  # a prefix; 7 at most
    assert len(stratified_indices(labels, 100, seed=4)) == 7
