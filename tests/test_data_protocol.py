"""The project's datamodules and the Python API's UserData provide AuditableData."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from audit_report.api import UserData
from lit_modules.data.cifar import CIFAR10DataModule
from lit_modules.data.imagefolder import ImageFolderDataModule
from lit_modules.data.protocol import MEMBERS, AuditableData, is_auditable
from lit_modules.data.synthetic import SyntheticShapesDataModule


def _user_data() -> UserData:
    pairs = [(torch.rand(3, 8, 8), i % 2) for i in range(4)]
    return UserData(pairs, ["a", "b"], mean=None, std=None)


def test_the_protocol_declares_what_the_audit_and_monitor_read() -> None:
    assert set(MEMBERS) == {"class_names", "has_object_masks", "cue", "mean", "std",
                            "dataset", "normalize", "denormalize"}


@pytest.mark.parametrize("make", [
    lambda tmp: SyntheticShapesDataModule(num_train=4, num_val=4, num_test=4),
    lambda tmp: CIFAR10DataModule(root=str(tmp)),
    lambda tmp: ImageFolderDataModule(root=str(tmp / "absent")),  # nothing is read
    lambda tmp: _user_data(),
], ids=["synthetic", "cifar10", "imagefolder", "user_data"])
def test_the_project_datamodules_and_user_data_are_auditable(make, tmp_path) -> None:
    assert is_auditable(make(tmp_path))


@pytest.mark.parametrize("make", [
    lambda: SyntheticShapesDataModule(num_train=4, num_val=4, num_test=4),
    _user_data,
], ids=["synthetic", "user_data"])
def test_isinstance_agrees_where_reading_the_members_is_cheap(make) -> None:
    data = make()
    assert isinstance(data, AuditableData)
    assert list(data.class_names) and data.has_object_masks in (True, False)


def test_a_foreign_datamodule_is_not_auditable() -> None:
    assert not is_auditable(L.LightningDataModule())
    assert not is_auditable(None)
    assert not isinstance(L.LightningDataModule(), AuditableData)
