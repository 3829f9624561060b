"""Tests of the data layer: synthetic shapes, the spurious cue and the datamodules."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

import lit_modules.data.cifar as cifar_module
from lit_modules.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    POSITIONS,
    SHAPE_CLASSES,
    CIFAR10DataModule,
    CueConfig,
    SpuriousCue,
    SyntheticShapes,
    SyntheticShapesDataModule,
    find_cifar10,
)

BATCH_KEYS = {"image", "label", "object_mask", "cue_mask", "index"}
SHARED_DATA = Path(
    os.environ.get("CAMLIGHT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def check_batch(batch: dict, batch_size: int, size: int = 32) -> None:
    """Assert the documented batch format."""
    assert set(batch) == BATCH_KEYS
    assert batch["image"].dtype == torch.float32
    assert batch["image"].shape == (batch_size, 3, size, size)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (batch_size,)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (batch_size,)
    for key in ("object_mask", "cue_mask"):
        assert batch[key].dtype == torch.bool and batch[key].shape == (batch_size, size, size)


# -- synthetic shapes ---------------------------------------------------------------------


def test_shapes_deterministic_per_seed_and_split():
    a, b = SyntheticShapes(100, seed=3), SyntheticShapes(100, seed=3)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    other_seed = SyntheticShapes(100, seed=4)
    val = SyntheticShapes(100, seed=3, split="val")
    assert not torch.equal(a.images, other_seed.images)
    assert not torch.equal(a.images, val.images)
    assert not torch.equal(a.masks, val.masks)


def test_shapes_balanced_and_all_classes():
    ds = SyntheticShapes(205, seed=0)
    counts = torch.bincount(ds.labels, minlength=10)
    assert len(SHAPE_CLASSES) == 10 and ds.class_names == SHAPE_CLASSES
    assert counts.min() == 20 and counts.max() == 21
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (205, 3, 32, 32)


def test_shapes_masks_cover_the_object():
    ds = SyntheticShapes(300, seed=1)
    images = ds.images.float() / 255
    for i in range(len(ds)):
        mask = ds.masks[i]
        area = mask.float().mean().item()
        assert 0.015 < area < 0.3, (SHAPE_CLASSES[ds.labels[i]], area)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()).item() + 1
        assert 0.2 * 32 <= extent <= 0.55 * 32
        inside, outside = images[i][:, mask], images[i][:, ~mask]
        # The object is one flat colour, and every channel contrasts with the background.
        assert torch.equal(inside.amin(1), inside.amax(1))
        gap = (inside.mean(1) - outside.mean(1)).abs()
        assert gap.min() > 0.15, gap
        # The background is textured, not flat.
        assert outside.std(1).max() > 0.01


def test_shapes_item_format():
    ds = SyntheticShapes(2000, seed=5, split="test")
    item = ds[7]
    assert set(item) == BATCH_KEYS
    assert torch.equal(item["image"], ds.images[7].float() / 255)
    assert torch.equal(item["object_mask"], ds.masks[7])
    assert not item["cue_mask"].any() and item["index"].item() == 7


# -- spurious cue -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position,top,left",
    [
        ("top_left", 0, 0),
        ("top_right", 0, 27),
        ("bottom_left", 27, 0),
        ("bottom_right", 27, 27),
        ("center", 13, 13),
    ],
)
def test_cue_fixed_positions(position, top, left):
    cue = SpuriousCue([2], size=5, color=(0.0, 1.0, 0.0), position=position, p_train=1.0)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[top : top + 5, left : left + 5] = True
    assert torch.equal(cue.mask(32, 32), expected)
    image = torch.rand(3, 32, 32)
    stamped, mask = cue.apply(image, 2, index=11, split="train")
    assert torch.equal(mask, expected)
    assert torch.equal(stamped[:, expected], torch.tensor([[0.0], [1.0], [0.0]]).expand(3, 25))
    assert torch.equal(stamped[:, ~expected], image[:, ~expected])
    # The input itself is left unstamped.
    assert not torch.equal(image[:, expected], stamped[:, expected])


def test_cue_random_position_is_seeded_per_item():
    cue = SpuriousCue([0], size=3, position="random", p_train=1.0, seed=7)
    masks = [cue.mask(32, 32, index=i, split="train") for i in range(50)]
    for m in masks:
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        assert m.sum() == 9 and rows.numel() == 3 and cols.numel() == 3
    assert torch.equal(masks[4], SpuriousCue([0], 3, position="random", seed=7).mask(32, 32, 4))
    assert len({tuple(m.nonzero()[0].tolist()) for m in masks}) > 20
    _, cue_mask = cue.apply(torch.rand(3, 32, 32), 0, index=4, split="train")
    assert torch.equal(cue_mask, masks[4])
    with pytest.raises(ValueError, match="index"):
        cue.mask(32, 32)


def test_cue_only_on_configured_classes():
    cue = SpuriousCue([1, 3], p_train=1.0, p_eval=1.0)
    image = torch.rand(3, 32, 32)
    for label in range(10):
        stamped, mask = cue.apply(image, torch.tensor(label), index=0, split="val")
        assert mask.any() == (label in (1, 3))
        if label not in (1, 3):
            assert stamped is image or torch.equal(stamped, image)


@pytest.mark.parametrize("p_train,p_eval", [(0.9, 0.3), (0.0, 1.0), (1.0, 0.0)])
def test_cue_rates(p_train, p_eval):
    cue = SpuriousCue([0], p_train=p_train, p_eval=p_eval, seed=1)
    n = 2000
    for split, p in (("train", p_train), ("val", p_eval), ("test", p_eval)):
        rate = sum(cue.has_cue(0, i, split) for i in range(n)) / n
        assert abs(rate - p) < 0.03, (split, rate, p)
        if p in (0.0, 1.0):
            assert rate == p


def test_cue_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = [SpuriousCue([0], p_train=0.5, seed=2).has_cue(0, i, "train") for i in range(300)]
    b = [SpuriousCue([0], p_train=0.5, seed=2).has_cue(0, i, "train") for i in range(300)]
    other_seed = [SpuriousCue([0], p_train=0.5, seed=3).has_cue(0, i, "train") for i in range(300)]
    cue = SpuriousCue([0], p_train=0.5, p_eval=0.5, seed=2)
    val = [cue.has_cue(0, i, "val") for i in range(300)]
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != other_seed and a != val
    # A lower p stamps a subset of the items a higher p stamps.
    low = [SpuriousCue([0], p_train=0.2, seed=2).has_cue(0, i, "train") for i in range(300)]
    assert all(h for lo, h in zip(low, a, strict=True) if lo)


def test_cue_stamp_batch_regardless_of_class():
    cue = SpuriousCue([9], size=4, position="bottom_right", p_train=0.0, p_eval=0.0)
    images = torch.rand(6, 3, 16, 16)
    stamped, masks = cue.stamp(images)
    assert masks.shape == (6, 16, 16) and masks[:, 12:, 12:].all() and masks.sum() == 6 * 16
    assert torch.equal(
        stamped[:, :, 12:, 12:], torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(6, 3, 4, 4)
    )
    assert torch.equal(stamped[:, :, :12], images[:, :, :12])
    rand_cue = SpuriousCue([0], size=2, position="random")
    _, rand_masks = rand_cue.stamp(images, indices=[5, 6, 7, 8, 9, 10], split="test")
    assert torch.equal(rand_masks[0], rand_cue.mask(16, 16, index=5, split="test"))


def test_cue_validation_and_describe():
    cue = SpuriousCue([0, 1])
    assert (
        cue.describe()
        == "4x4 magenta patch at top_left on classes [0, 1] (p=0.95 train, 0.95 eval)"
    )
    with pytest.raises(ValueError, match="size"):
        SpuriousCue([0], size=0)
    with pytest.raises(ValueError, match="p_train"):
        SpuriousCue([0], p_train=1.5)
    with pytest.raises(ValueError, match="p_eval"):
        SpuriousCue([0], p_eval=-0.1)
    with pytest.raises(ValueError, match="color"):
        SpuriousCue([0], color=(2.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="position"):
        SpuriousCue([0], position="middle")
    with pytest.raises(ValueError, match="does not fit"):
        SpuriousCue([0], size=40).mask(32, 32)
    with pytest.raises(ValueError, match="split"):
        cue.has_cue(0, 0, "training")
    assert set(POSITIONS) == {
        "top_left",
        "top_right",
        "bottom_left",
        "bottom_right",
        "center",
        "random",
    }


def test_cue_config_normalises_and_builds_the_cue():
    config = CueConfig((3, 1, 3), size=6, color=[0, 1, 0], position="random", p_train=1,
                       p_eval=0.5, seed=7)
    assert config.as_dict() == {"classes": [1, 3], "size": 6, "color": (0.0, 1.0, 0.0),
                                "position": "random", "p_train": 1.0, "p_eval": 0.5, "seed": 7}
    cue = SpuriousCue.from_config(config)
    assert cue.as_dict() == config.as_dict()
    assert cue == SpuriousCue([1, 3], 6, (0.0, 1.0, 0.0), "random", 1.0, 0.5, 7)
    assert cue.describe() == "6x6 green patch at random on classes [1, 3] (p=1 train, 0.5 eval)"
    # The config alone decides every draw: two cues built from it stamp the same pixels.
    twin = SpuriousCue.from_config(CueConfig(**config.as_dict()))
    assert torch.equal(twin.mask(32, 32, 9, "val"), cue.mask(32, 32, 9, "val"))
    assert int(cue.mask(32, 32, 9, "val").sum()) == 36


def test_cue_config_validates_when_built():
    with pytest.raises(ValueError, match="at least one class"):
        CueConfig([])
    with pytest.raises(ValueError, match="non-negative ints"):
        CueConfig([0, True])
    with pytest.raises(ValueError, match="size must be a positive int"):
        CueConfig([0], size=2.5)
    with pytest.raises(ValueError, match=r"choose one of \['top_left'"):
        CueConfig([0], position="left")


def test_cue_config_from_a_plain_mapping():
    # audit.py rebuilds a datamodule from a YAML-loaded config, where cue is a dict.
    assert CueConfig.coerce(None) is None
    config = CueConfig([2])
    assert CueConfig.coerce(config) is config
    assert CueConfig.coerce({"classes": [2], "size": 5}) == CueConfig([2], size=5)
    with pytest.raises(ValueError, match=r"unknown cue option\(s\) \['colour'\]; the fields"):
        CueConfig.coerce({"classes": [2], "colour": [1, 0, 0]})
    with pytest.raises(TypeError, match="mapping"):
        CueConfig.coerce([2])
    dm = small_shapes_dm(cue={"classes": [2], "size": 5, "p_eval": 1.0})
    assert dm.cue == SpuriousCue([2], size=5, p_eval=1.0)
    assert small_shapes_dm().cue is None


def test_flat_keys_hint_spells_the_new_form():
    from lit_modules.data.cue import flat_keys_hint

    assert flat_keys_hint({"cue_classes": [0, 1]}) == (
        "cue_classes is now cue.classes (the cue options are one `cue:` object): write "
        "`cue: {classes: [0, 1]}` under data.init_args in a YAML config, or "
        "--data.init_args.cue.classes [0,1] on the command line"
    )
    two = flat_keys_hint({"cue_position": "center", "cue_size": ...})
    assert two.startswith("cue_size, cue_position are now cue.size, cue.position")
    assert "`cue: {size: ..., position: center}`" in two


def test_old_saved_configs_can_be_read_back():
    from lit_modules.data.cue import nest_flat_keys

    old = {"seed": 0, "cue_classes": [0, 1], "cue_size": 8, "cue_p_eval": 1.0}
    assert nest_flat_keys(old) == {"seed": 0, "cue": {"classes": [0, 1], "size": 8, "p_eval": 1.0}}
    assert nest_flat_keys({"seed": 0, "cue_classes": None, "cue_size": 4}) == {"seed": 0, "cue": None}
    assert nest_flat_keys({"seed": 0}) == {"seed": 0}
    dm = small_shapes_dm(**nest_flat_keys({"num_train": 8, "cue_classes": [3], "cue_size": 8}))
    assert dm.cue == SpuriousCue([3], size=8)
    with pytest.raises(ValueError, match="both cue and the old flat options"):
        nest_flat_keys({"cue": None, "cue_size": 8})


# -- synthetic datamodule -------------------------------------------------------------------


def small_shapes_dm(**kwargs) -> SyntheticShapesDataModule:
    args = {"num_train": 96, "num_val": 40, "num_test": 40, "batch_size": 16}
    return SyntheticShapesDataModule(**(args | kwargs))


def test_shapes_datamodule_batches():
    dm = small_shapes_dm(cue=CueConfig([0, 1], p_train=1.0, p_eval=1.0))
    assert dm.num_classes == 10 and dm.has_object_masks
    assert dm.cue == SpuriousCue([0, 1], p_train=1.0, p_eval=1.0)
    assert dm.dataset("val") is dm.val_set  # set up on demand
    dm.setup("fit")
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        check_batch(batch, 16)
        assert batch["object_mask"].flatten(1).any(1).all()
        has_cue = batch["cue_mask"].flatten(1).any(1)
        assert torch.equal(has_cue, (batch["label"] <= 1))
        images01 = dm.denormalize(batch["image"])
        magenta = torch.tensor([1.0, 0.0, 1.0]).view(3, 1)
        for img, m in zip(images01[has_cue], batch["cue_mask"][has_cue], strict=True):
            assert torch.allclose(img[:, m], magenta.expand(3, 16), atol=1e-6)
            assert torch.equal(m[:4, :4], torch.ones(4, 4, dtype=torch.bool))
    # Eval loaders keep order; the train loader shuffles, reproducibly.
    assert torch.equal(next(iter(dm.val_dataloader()))["index"], torch.arange(16))
    order = torch.cat([b["index"] for b in dm.train_dataloader()])
    again = torch.cat([b["index"] for b in small_shapes_dm().train_dataloader()])
    assert not torch.equal(order, torch.arange(96)) and torch.equal(order, again)
    with pytest.raises(ValueError, match="split"):
        dm.dataset("validation")


@pytest.mark.parametrize("size", [64, 224])
def test_shapes_datamodule_at_larger_sizes(size):
    """Images, object masks and cue masks at the requested size; objects scale with it."""
    cue = CueConfig([0], size=size // 8, position="bottom_right", p_train=1.0, p_eval=1.0)
    dm = SyntheticShapesDataModule(num_train=20, num_val=10, num_test=10, image_size=size,
                                   batch_size=10, cue=cue)
    for split in ("train", "val"):
        batch = next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))
        assert batch["image"].shape == (10, 3, size, size)
        assert batch["object_mask"].shape == batch["cue_mask"].shape == (10, size, size)
        # Every image shows its object, which covers a share of the image like at 32 px.
        share = batch["object_mask"].flatten(1).float().mean(1)
        assert bool((share > 0.01).all()) and bool((share < 0.9).all())
        on = batch["label"] == 0
        assert torch.equal(batch["cue_mask"].flatten(1).any(1), on)
        k = size // 8
        assert batch["cue_mask"][on][:, -k:, -k:].all() and int(batch["cue_mask"][on][0].sum()) == k * k


def test_shapes_datamodule_flips_image_and_mask_together():
    dm = small_shapes_dm(cue=CueConfig(list(range(10)), p_train=1.0))
    train = dm.dataset("train")
    raw = train.images.float() / 255
    torch.manual_seed(0)
    seen = set()
    for i in range(40):
        item = train[i]
        image01 = dm.denormalize(item["image"])
        unflipped = torch.allclose(image01[:, :, 4:], raw[i][:, :, 4:], atol=1e-5)
        flipped = torch.allclose(image01[:, :, 4:], raw[i].flip(-1)[:, :, 4:], atol=1e-5)
        assert unflipped != flipped  # asymmetric object or texture: exactly one holds
        mask = train.object_masks[i].flip(-1) if flipped else train.object_masks[i]
        assert torch.equal(item["object_mask"], mask)
        # The cue is stamped after the flip, so it stays at the top-left corner.
        assert item["cue_mask"][:4, :4].all() and item["cue_mask"].sum() == 16
        seen.add(flipped)
    assert seen == {True, False}
    assert dm.dataset("val")[0]["object_mask"].equal(dm.val_set.object_masks[0])


def test_denormalize_inverts_normalize():
    dm = small_shapes_dm()
    images = torch.rand(4, 3, 32, 32)
    assert torch.allclose(dm.denormalize(dm.normalize(images)), images, atol=1e-6)
    item = dm.dataset("test")[3]
    assert torch.allclose(dm.denormalize(item["image"]), dm.test_set.images[3] / 255, atol=1e-6)
    with pytest.raises(ValueError, match=r"cue.classes \[12\] out of range for 10 classes"):
        small_shapes_dm(cue=CueConfig([12])).setup("fit")


# -- CIFAR-10 datamodule --------------------------------------------------------------------


def write_imagefolder(root: Path, classes: list[str], per_class: dict[str, int]) -> dict:
    """Constant-colour images whose colour encodes (part, class, number); returns colour->label."""
    colours = {}
    for part, count in per_class.items():
        for c, name in enumerate(classes):
            (root / part / name).mkdir(parents=True)
            for j in range(count):
                key = (part == "test", c, j)
                colour = (10 * j + 5, 40 * c + 20, 200 if part == "test" else 100)
                size = 40 if (c, j) == (0, 0) else 32  # one odd size to exercise resizing
                Image.new("RGB", (size, size), colour).save(root / part / name / f"{j:04d}.png")
                colours[colour] = (c, key)
    # A JPEG too (lossy, so it is not in the colour table).
    Image.new("RGB", (32, 32), (128, 128, 128)).save(root / "test" / classes[1] / "x.jpg")
    return colours


def test_cifar_imagefolder_layout(tmp_path):
    classes = ["cat", "ant", "bee"]
    colours = write_imagefolder(tmp_path, classes, {"train": 6, "test": 3})
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=4, batch_size=5, num_workers=0)
    assert find_cifar10(tmp_path) == ("imagefolder", tmp_path)
    assert dm.class_names == sorted(classes) and dm.num_classes == 3
    dm.setup("fit")
    dm.setup("test")
    assert dm.layout == "imagefolder" and not dm.has_object_masks
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (14, 4, 10)
    # Val items are un-augmented copies of training files with the right label.
    sources = set()
    for i in range(len(dm.val_set)):
        item = dm.val_set[i]
        pixels = (dm.denormalize(item["image"]) * 255).round().to(torch.uint8)
        colour = tuple(pixels[:, 0, 0].tolist())
        assert (pixels == pixels[:, :1, :1]).all()
        label, key = colours[colour]
        assert not key[0] and item["label"].item() == dm.class_names.index(classes[label])
        sources.add(key)
    train_keys = {colours[tuple(im[:, 0, 0].tolist())][1] for im in dm.train_set.images}
    assert len(sources) == 4 and len(train_keys) == 14 and not sources & train_keys
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 5)
    assert not batch["object_mask"].any()
    assert dm.train_dataloader().persistent_workers is False
    # The split is seeded: another instance picks the same val images.
    other = CIFAR10DataModule(root=str(tmp_path), val_size=4, num_workers=0)
    assert torch.equal(other.dataset("val").images, dm.val_set.images)


def write_fake_batches(folder: Path, per_batch: int) -> tuple[np.ndarray, list[int]]:
    """Write torchvision-format pickles of random images; return the train images (HWC), labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train, train_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        if name != "test_batch":
            train.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            train_labels += labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return np.concatenate(train), train_labels


def trust_batches(monkeypatch, folder: Path) -> None:
    """Use the MD5 sums of the files now in ``folder`` instead of the real CIFAR-10's.

    Fake batches can not match torchvision's sums; with this, everything else (the MD5
    check included) is the real path.
    """
    table = {
        part: [(name, hashlib.md5((folder / name).read_bytes()).hexdigest()) for name, _ in files]
        for part, files in cifar_module.BATCH_FILES.items()
    }
    monkeypatch.setattr(cifar_module, "BATCH_FILES", table)


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar_torchvision_layout(tmp_path, monkeypatch, point_at_batches):
    train_hwc, train_labels = write_fake_batches(tmp_path / "cifar-10-batches-py", per_batch=6)
    trust_batches(monkeypatch, tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py" if point_at_batches else tmp_path
    dm = CIFAR10DataModule(
        root=str(root), download=False, val_size=5, limit_train=12, batch_size=4, num_workers=0
    )
    dm.setup("fit")
    assert dm.layout == "torchvision" and dm.class_names == CIFAR10_CLASSES
    assert (len(dm.train_set), len(dm.val_set)) == (12, 5)
    source = torch.from_numpy(train_hwc).permute(0, 3, 1, 2)
    for image, label in zip(dm.val_set.images, dm.val_set.labels, strict=True):
        match = (source == image).flatten(1).all(1).nonzero().flatten()
        assert match.numel() == 1 and train_labels[match.item()] == label.item()
    item = dm.val_set[2]
    assert torch.allclose(dm.denormalize(item["image"]), dm.val_set.images[2] / 255, atol=1e-6)
    assert torch.allclose(torch.tensor(dm.mean), torch.tensor(CIFAR10_MEAN))
    check_batch(next(iter(dm.train_dataloader())), 4)
    test_set = dm.dataset("test")
    assert len(test_set) == 6 and test_set.split == "test"


def test_cifar_missing_without_network_explains_fix(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("no network in this test")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "nothing here"
    dm = CIFAR10DataModule(root=str(root), download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    for part in (str(root.resolve()), "cifar-10-batches-py", "train/ + test/", "--data.root"):
        assert part in message
    assert "no network in this test" in message and isinstance(info.value.__cause__, URLError)
    with pytest.raises(RuntimeError, match="disabled") as info:
        CIFAR10DataModule(root=str(root), download=False).setup("fit")
    assert "--data.root" in str(info.value)


# -- CIFAR-10 datamodule: bad data fails at setup, naming the path and the fix ------------


def _no_download(monkeypatch) -> list:
    """Make any download attempt fail offline; return the list of attempted roots."""
    calls = []

    def no_network(url, download_root, *args, **kwargs):
        calls.append(download_root)
        raise URLError("no network in this test")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    return calls


def _setup_error(root: Path, **kwargs) -> str:
    dm = CIFAR10DataModule(root=str(root), num_workers=0, val_size=1, **kwargs)
    with pytest.raises(RuntimeError) as info:
        dm.setup("fit")
        dm.setup("test")
    return str(info.value)


@pytest.mark.parametrize("download", [False, True])
def test_cifar_empty_root_says_so(tmp_path, monkeypatch, download):
    calls = _no_download(monkeypatch)
    message = _setup_error(tmp_path, download=download)
    assert str(tmp_path.resolve()) in message and "the folder is empty" in message
    assert "download=True" in message and "--data.root" in message
    assert "cifar-10-batches-py" in message and "train/ + test/" in message
    assert len(calls) == download
    (tmp_path / "notes.txt").write_text("x")
    assert "it holds: notes.txt" in _setup_error(tmp_path, download=False)


def test_cifar_root_that_is_a_file(tmp_path, monkeypatch):
    calls = _no_download(monkeypatch)
    root = tmp_path / "cifar.tar.gz"
    root.write_bytes(b"not a folder")
    message = _setup_error(root)
    assert f"data root {root.resolve()} is a file, not a folder" in message
    assert "--data.root" in message and calls == []


@pytest.mark.parametrize("present,absent", [("train", "test"), ("test", "train")])
def test_cifar_imagefolder_missing_split_never_downloads(tmp_path, monkeypatch, present, absent):
    calls = _no_download(monkeypatch)
    write_imagefolder(tmp_path, ["a", "b"], {"train": 1, "test": 1})
    for f in (tmp_path / absent).rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((tmp_path / absent).rglob("*"), reverse=True):
        d.rmdir()
    (tmp_path / absent).rmdir()
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, val_size=1, download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert f"ImageFolder root {tmp_path.resolve()} has {present}/ but no {absent}/" in message
    assert str(tmp_path.resolve() / absent) in message and "<class>/<image>" in message
    assert calls == []  # a download into the user's images would hide the mistake
    assert str(info.value) in _setup_error(tmp_path, download=True)


def test_cifar_imagefolder_without_classes_or_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    message = _setup_error(tmp_path)
    assert f"no class folders in {(tmp_path / 'train').resolve()}" in message
    assert "train/<class>/<image>" in message and "--data.root" in message
    write_imagefolder(tmp_path / "b", ["a", "b"], {"train": 2, "test": 1})
    for f in (tmp_path / "b" / "test").rglob("*.*"):
        f.unlink()  # test/ keeps its class folders, without images
    message = _setup_error(tmp_path / "b")
    test_dir = (tmp_path / "b" / "test").resolve()
    assert f"no images (.jpg, .jpeg, .png, .bmp, .webp) under {test_dir}" in message


def _corrupt_bytes(kind: str) -> bytes:
    """The bytes of a bad image file: random bytes, or a valid PNG/JPEG cut in half."""
    if kind == "garbage":
        return b"this is not an image" * 10
    rng = np.random.default_rng(0)
    path = io.BytesIO()
    fmt = "PNG" if kind == "truncated_png" else "JPEG"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, fmt)
    data = path.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["garbage", "truncated_png", "truncated_jpeg"])
def test_cifar_imagefolder_corrupt_image_raises_naming_it(tmp_path, kind):
    write_imagefolder(tmp_path, ["a", "b"], {"train": 3, "test": 2})
    bad = tmp_path / "train" / "b" / ("0001.jpg" if kind == "truncated_jpeg" else "0001.png")
    (tmp_path / "train" / "b" / "0001.png").unlink()
    bad.write_bytes(_corrupt_bytes(kind))
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, val_size=2)
    assert dm.class_names == ["a", "b"]  # listing the files does not decode them
    with pytest.raises(RuntimeError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"could not decode image {bad}" in message and "delete or replace" in message
    # The test split does not hold the bad file and still loads.
    assert len(dm.dataset("test")) == 5


def _crafted_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded by ``pickle.load`` (the payload)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"data": Payload(), "labels": [0]})


def test_cifar_batch_files_refuse_crafted_pickles(tmp_path, monkeypatch):
    # The payload is real: plain pickle.load would run it.
    control = tmp_path / "control"
    pickle.loads(_crafted_pickle(control)).get("data").close()
    assert control.exists()
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_batches(folder, per_batch=2)
    marker = tmp_path / "payload_ran"
    batch = folder / "data_batch_1"
    batch.write_bytes(_crafted_pickle(marker))
    # The MD5 check refuses it first (against the real CIFAR-10 sums) ...
    message = _setup_error(tmp_path, download=False)
    assert f"CIFAR-10 file {batch} is corrupt or truncated (its MD5" in message
    # ... and were the sums to match, the restricted unpickler still refuses it.
    trust_batches(monkeypatch, folder)
    message = _setup_error(tmp_path, download=False)
    assert f"CIFAR-10 file {batch} could not be read (UnpicklingError: refusing io.open" in message
    assert "download=True" in message and "--data.root" in message
    assert not marker.exists()


@pytest.mark.parametrize("problem", ["missing", "truncated", "truncated_same_md5", "not_a_batch"])
def test_cifar_batch_file_problems_name_the_file(tmp_path, monkeypatch, problem):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_batches(folder, per_batch=2)
    trust_batches(monkeypatch, folder)
    batch = folder / "data_batch_3"
    if problem == "missing":
        batch.unlink()
        expected = "is missing (a complete copy has data_batch_1..5 and test_batch)"
    elif problem == "not_a_batch":
        batch.write_bytes(pickle.dumps({"data": np.zeros((2, 5), dtype=np.float32)}))
        trust_batches(monkeypatch, folder)
        expected = "has 'data' (2, 5), expected uint8 [N, 3072]"
    else:
        batch.write_bytes(batch.read_bytes()[:1000])
        if problem == "truncated":
            expected = "is corrupt or truncated (its MD5 is not CIFAR-10's"
        else:  # past the MD5 check, the unpickler meets the truncation
            trust_batches(monkeypatch, folder)
            expected = "could not be read"
    message = _setup_error(tmp_path, download=True)
    assert f"CIFAR-10 file {batch} {expected}" in message
    assert f"Delete {batch.parent}" in message and "--data.root" in message


class _Py2Pickler(pickle._Pickler):
    """Pickle as Python 2's cPickle wrote the real batches: bytes as ``str`` opcodes,
    numpy's globals under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[type] = save_global


def test_read_batch_accepts_the_original_python2_format(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    entry = {b"batch_label": b"batch 1", b"labels": [7, 0, 9], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png"]}
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(entry)
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    images, labels = cifar_module.read_batch(path)
    assert torch.equal(images, torch.from_numpy(data).view(3, 3, 32, 32))
    assert labels.tolist() == [7, 0, 9]


def test_cifar_limits_are_seeded(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], {"train": 10, "test": 5})
    kwargs = {
        "root": str(tmp_path),
        "val_size": 4,
        "limit_train": 6,
        "limit_val": 2,
        "limit_test": 3,
    }
    a, b = CIFAR10DataModule(**kwargs), CIFAR10DataModule(**kwargs)
    a.setup()
    b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (6, 2, 3)
    for split in ("train", "val", "test"):
        assert torch.equal(a.dataset(split).images, b.dataset(split).images)
    with pytest.raises(ValueError, match="limit_val"):
        CIFAR10DataModule(root=str(tmp_path), limit_val=0)


@pytest.mark.real_data
def test_cifar_real_imagefolder(tmp_path):
    test_zip = SHARED_DATA / "cifar10-jpeg-test.zip"
    if not test_zip.is_file():
        pytest.skip(f"real CIFAR-10 archive not found: {test_zip}")
    # A few hundred real JPEGs: unzipping all 60k files would cost more than the test itself.
    with zipfile.ZipFile(test_zip) as z:
        members = [n for n in z.namelist() if n.endswith(".jpg") and int(n[-8:-4]) < 40]
        z.extractall(tmp_path, members)
    train_zip = SHARED_DATA / "cifar10-jpeg-train.zip"
    if train_zip.is_file():
        with zipfile.ZipFile(train_zip) as z:
            members = [n for n in z.namelist() if n.endswith(".jpg") and int(n[-8:-4]) < 30]
            z.extractall(tmp_path, members)
    else:  # the test images stand in for a train split
        (tmp_path / "train").symlink_to(tmp_path / "test")
    dm = CIFAR10DataModule(
        root=str(tmp_path),
        download=False,
        val_size=50,
        limit_train=200,
        limit_test=300,
        batch_size=50,
        num_workers=0,
        cue=CueConfig([0]),
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.layout == "imagefolder" and dm.class_names == CIFAR10_CLASSES
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 50, 300)
    assert len(torch.unique(dm.test_set.labels)) == 10
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, 50)
    # Real photos: channel means near CIFAR-10's and far from flat images.
    images01 = dm.test_set.images.float() / 255
    assert torch.allclose(images01.mean((0, 2, 3)), torch.tensor(CIFAR10_MEAN), atol=0.06)
    assert images01.std() > 0.15
    has_cue = batch["cue_mask"].flatten(1).any(1)
    assert not has_cue[batch["label"] != 0].any()
