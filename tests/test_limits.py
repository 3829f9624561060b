"""``limit_<split>``: one seeded subset rule (lit_modules.data.sampling) for every datamodule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_imagefolder import make_folder

from lit_modules.data import ImageFolderDataModule
from lit_modules.data.cifar import CIFAR10DataModule
from lit_modules.data.sampling import check_limits, limit_indices


def test_a_limit_is_a_sorted_seeded_subset_a_function_of_seed_and_split() -> None:
    indices = torch.arange(10, 30)
    a = limit_indices(indices, 5, seed=3, split="val")
    assert a.numel() == 5 and torch.equal(a, a.sort().values)
    assert set(a.tolist()) <= set(indices.tolist())
    assert torch.equal(a, limit_indices(indices, 5, seed=3, split="val"))
    others = [limit_indices(indices, 5, seed=4, split="val"),
              limit_indices(indices, 5, seed=3, split="test")]
    assert all(not torch.equal(a, b) for b in others)


@pytest.mark.parametrize("limit", [None, 20, 50])
def test_no_limit_or_one_not_below_the_split_keeps_it_whole(limit) -> None:
    indices = torch.arange(20)
    assert limit_indices(indices, limit, seed=0, split="train") is indices


@pytest.mark.parametrize("make", [CIFAR10DataModule, ImageFolderDataModule])
def test_every_datamodule_refuses_a_limit_below_one_naming_it(make, tmp_path) -> None:
    with pytest.raises(ValueError, match="limit_val must be positive"):
        make(root=str(tmp_path), limit_val=0)
    assert check_limits(1, None, 2) == {"train": 1, "val": None, "test": 2}


def test_imagefolder_limits_use_the_shared_rule(tmp_path: Path) -> None:
    root = make_folder(tmp_path, classes=2, per_class=6, test_per_class=3)
    whole = ImageFolderDataModule(root=str(root), image_size=32, val_size=2, num_workers=0)
    limited = ImageFolderDataModule(root=str(root), image_size=32, val_size=2, num_workers=0,
                                    limit_train=4, limit_test=2, split_seed=0)
    for split, limit in (("train", 4), ("test", 2)):
        files = whole.dataset(split).files
        kept = limit_indices(torch.arange(len(files)), limit, seed=0, split=split)
        assert limited.dataset(split).files == [files[i] for i in kept.tolist()]
