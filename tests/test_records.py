"""The explanations folder format: names, round trip, order, damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from explain import ALL_CLASSES_MAX, records


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "global_step": 10 * epoch, "indices": torch.arange(3),
            "labels": torch.tensor([0, 1, 2]), "probs": torch.full((3, 3), 1 / 3),
            "maps": {"gradcam": torch.full((3, 3, 4, 4), float(epoch)).half()},
            "scalars": {"gradcam": {"concentration": 0.25 * epoch}},
            "nan_maps": {"gradcam": 0}, "explained": "all"}


def test_the_folder_format_is_the_documented_one(tmp_path: Path) -> None:
    # README and audit users rely on these exact names.
    assert records.fixed_images_path(tmp_path) == tmp_path / "explanations" / "fixed_images.pt"
    assert records.epoch_path(tmp_path, 7) == tmp_path / "explanations" / "epoch_0007.pt"
    assert records.epoch_path(tmp_path, 12345).name == "epoch_12345.pt"
    with pytest.raises(ValueError, match="epoch"):
        records.epoch_path(tmp_path, -1)


def test_round_trip_in_epoch_order_and_first_fixed_images_win(tmp_path: Path) -> None:
    assert records.load_monitor_records(tmp_path) is None  # nothing saved yet
    fixed = {"indices": torch.arange(3), "images": torch.zeros(3, 3, 4, 4, dtype=torch.uint8),
             "labels": torch.tensor([0, 1, 2]), "object_mask": torch.zeros(0),
             "cue_mask": torch.zeros(0), "class_names": ["a", "b", "c"], "methods": ["gradcam"]}
    records.save_fixed_images(tmp_path, fixed)
    records.save_fixed_images(tmp_path, {**fixed, "class_names": ["x", "y", "z"]})
    for epoch in (10000, 2, 9999):  # numeric order, not the names' lexicographic one
        records.save_epoch(tmp_path, _epoch(epoch))
    loaded_fixed, epochs = records.load_monitor_records(tmp_path)
    assert loaded_fixed["class_names"] == ["a", "b", "c"]
    assert [e["epoch"] for e in epochs] == [2, 9999, 10000]
    assert [p.name for p in records.epoch_paths(tmp_path)] == [
        "epoch_0002.pt", "epoch_9999.pt", "epoch_10000.pt"]
    assert epochs[1]["scalars"]["gradcam"]["concentration"] == 0.25 * 9999
    assert torch.equal(epochs[0]["maps"]["gradcam"], torch.full((3, 3, 4, 4), 2.0).half())


def test_an_unreadable_epoch_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    records.save_fixed_images(tmp_path, {"indices": torch.arange(1)})
    records.save_epoch(tmp_path, _epoch(0))
    records.epoch_path(tmp_path, 1).write_bytes(b"not a torch file")
    (records.explanations_dir(tmp_path) / ".epoch_0002.pt.tmp").write_bytes(b"debris")
    with pytest.warns(UserWarning, match="epoch_0001.pt"):
        _, epochs = records.load_monitor_records(tmp_path)
    assert [e["epoch"] for e in epochs] == [0]


def test_sparse_and_dense_maps_read_alike_and_the_audit_reads_both(tmp_path: Path) -> None:
    """Beyond ALL_CLASSES_MAX classes a record keeps only the explained maps with their
    classes; reading a class's maps gives what the zero-filled layout gave, and the audit's
    evolution section takes either."""
    from audit_report.sections.evolution import evolution_data

    k = ALL_CLASSES_MAX + 8
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 5, 39])
    preds = torch.tensor([0, 7, 2])
    some = torch.rand(3, 2, 4, 4, generator=g)  # [N, T]: the true, then the predicted class
    classes = torch.stack([labels, preds], 1)
    dense = torch.zeros(3, k, 4, 4)
    dense[torch.arange(3), preds] = some[:, 1]
    dense[torch.arange(3), labels] = some[:, 0]
    for targets in (labels, preds, torch.tensor([1, 1, 1])):
        assert torch.equal(records.class_maps(some, classes, targets),
                           records.class_maps(dense, None, targets))
    assert (records.class_maps(some, classes, torch.tensor([1, 1, 1])) == 0).all()

    fixed = {"indices": torch.arange(3), "images": torch.zeros(3, 3, 4, 4, dtype=torch.uint8),
             "labels": labels, "object_mask": torch.empty(0), "cue_mask": torch.empty(0),
             "class_names": [f"c{i}" for i in range(k)], "methods": ["gradcam"]}
    base = {"global_step": 0, "indices": torch.arange(3), "labels": labels,
            "probs": torch.full((3, k), 1 / k), "scalars": {}, "nan_maps": {"gradcam": 0},
            "explained": "predicted"}
    records.save_fixed_images(tmp_path, fixed)
    records.save_epoch(tmp_path, {**base, "epoch": 0, "maps": {"gradcam": dense.half()}})
    records.save_epoch(tmp_path, {**base, "epoch": 1, "maps": {"gradcam": some.half()},
                                  "map_classes": {"gradcam": classes}})
    _, strip = evolution_data(*records.load_monitor_records(tmp_path))
    assert torch.equal(strip["maps"][0], strip["maps"][1])
    assert torch.equal(strip["maps"][1], some[:, 0].half().float())
