"""ImageFolderDataModule: your own images at their own size, with stated normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lit_modules.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from lit_modules.data.imagefolder import FAST_PATH_MAX_SIZE, resize_size
from lit_modules.data.sampling import dataset_labels
from lit_modules.data.split import ItemKey


def make_folder(root: Path, classes: int = 2, per_class: int = 6, test_per_class: int = 3,
                seed: int = 0) -> Path:
    """Random RGB PNGs of assorted, non-square sizes in ``root/{train,test}/c<k>/``."""
    rng = np.random.default_rng(seed)
    for part, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / part / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _dm(root: Path, **kwargs) -> ImageFolderDataModule:
    args = {"image_size": 32, "val_size": 2, "batch_size": 4, "num_workers": 0}
    return ImageFolderDataModule(root=str(root), **{**args, **kwargs})


def _rgb(path: Path) -> torch.Tensor:
    return TF.pil_to_tensor(Image.open(path).convert("RGB"))


def _eval_by_hand(path: Path, size: int) -> torch.Tensor:
    """Resize the short side to size*256/224, then cut the centre size x size (uint8)."""
    image = TF.resize(_rgb(path), [resize_size(size)], antialias=True)
    h, w = image.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return image[:, top : top + size, left : left + size]


@pytest.mark.parametrize("size", [64, 224])
def test_items_at_the_images_own_size(tmp_path: Path, size: int) -> None:
    dm = _dm(make_folder(tmp_path), image_size=size)
    assert dm.class_names == ["c0", "c1"] and dm.num_classes == 2
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 6)
    for split in ("train", "val", "test"):
        item = dm.dataset(split)[1]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["object_mask"].shape == item["cue_mask"].shape == (size, size)
        assert not item["object_mask"].any() and not item["cue_mask"].any()
        assert int(item["index"]) == 1 and item["label"].dtype == torch.int64
    # Labels come without decoding (sampling stratifies on them), files decode per item.
    assert dataset_labels(dm.test_set).tolist() == [0, 0, 0, 1, 1, 1]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, size, size)


def test_eval_transform_is_deterministic_and_centre_cropped(tmp_path: Path) -> None:
    dm = _dm(make_folder(tmp_path), image_size=48)
    dm.setup("test")
    ds = dm.test_set
    for i in (0, 4):
        expected = _eval_by_hand(ds.files[i], 48).float() / 255
        first, second = ds[i]["image"], ds[i]["image"]
        assert torch.equal(first, second)
        torch.testing.assert_close(dm.denormalize(first), expected, atol=1e-6, rtol=0)


def test_train_crops_differ_by_seed_and_repeat_with_it(tmp_path: Path) -> None:
    # The crop is a function of the item's (seed, epoch, index), not of the global RNG
    # (which it leaves as it was): a resumed run crops as the uninterrupted one did.
    dm = _dm(make_folder(tmp_path), image_size=32)
    dm.setup("fit")

    def item(seed: int, epoch: int = 0, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        rng = torch.get_rng_state()
        image = dm.train_set[ItemKey(3, epoch, seed)]["image"]
        assert torch.equal(torch.get_rng_state(), rng)
        return image

    assert torch.equal(item(0), item(0, global_seed=1))
    assert torch.equal(item(0), dm.train_set[3]["image"])  # a plain index: epoch 0, seed 0
    assert not torch.equal(item(0), item(1))
    assert not torch.equal(item(0), item(0, epoch=1))
    # Val is not augmented: the same whatever the seed.
    torch.manual_seed(0)
    a = dm.val_set[0]["image"]
    torch.manual_seed(1)
    assert torch.equal(a, dm.val_set[0]["image"])


@pytest.mark.parametrize("position", ["bottom_right", "random"])
def test_cue_lands_where_configured_after_the_transforms(tmp_path: Path, position: str) -> None:
    cue = {"classes": [0], "size": 6, "color": [1.0, 0.0, 1.0], "position": position,
           "p_train": 1.0, "p_eval": 1.0, "seed": 3}
    dm = _dm(make_folder(tmp_path), image_size=40, cue=cue)
    dm.setup(None)
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            torch.manual_seed(i)
            item = ds[i]
            expected = dm.cue.mask(40, 40, i, split) if int(item["label"]) == 0 else None
            if expected is None:
                assert not item["cue_mask"].any()
                continue
            assert torch.equal(item["cue_mask"], expected) and int(expected.sum()) == 36
            if position == "bottom_right":
                assert expected[-6:, -6:].all()
            image01 = dm.denormalize(item["image"])
            patch = image01[:, item["cue_mask"]]
            torch.testing.assert_close(patch, torch.tensor([1.0, 0.0, 1.0]).view(3, 1).expand_as(patch),
                                       atol=1e-6, rtol=0)


def test_a_cue_larger_than_the_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16"):
        _dm(tmp_path, image_size=16, cue={"classes": [0], "size": 20})


def test_computed_statistics_equal_a_hand_computation(tmp_path: Path) -> None:
    dm = _dm(make_folder(tmp_path), image_size=32, normalization="computed")
    used = dm.normalization_used
    # By hand: every training image (val excluded) at the eval transforms, every pixel.
    files = dm._files("train")[0]
    train = dm._split_indices(len(files))["train"].tolist()
    pixels = torch.cat([_eval_by_hand(files[i], 32).double().div(255).flatten(1) for i in train], 1)
    torch.testing.assert_close(torch.tensor(used["mean"], dtype=torch.float64), pixels.mean(1))
    torch.testing.assert_close(torch.tensor(used["std"], dtype=torch.float64),
                               pixels.std(1, unbiased=False))
    assert used["normalization"] == "computed" and "10 training images" in used["source"]
    # ...and those are the values applied to the items.
    dm.setup("test")
    item = dm.test_set[0]["image"]
    expected = _eval_by_hand(dm.test_set.files[0], 32).float() / 255
    mean, std = (torch.tensor(used[k]).view(3, 1, 1) for k in ("mean", "std"))
    torch.testing.assert_close(item, (expected - mean) / std)
    # A seeded subset: the same subset every time, a different one for another seed.
    few = [_dm(tmp_path, normalization="computed", stats_images=3, split_seed=s).mean
           for s in (0, 0, 1)]
    assert few[0] == few[1] != few[2]


def test_normalisation_options(tmp_path: Path, caplog) -> None:
    make_folder(tmp_path)
    assert (_dm(tmp_path).mean, _dm(tmp_path).std) == (IMAGENET_MEAN, IMAGENET_STD)
    explicit = _dm(tmp_path, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25])
    assert explicit.normalization_used == {
        "normalization": "explicit", "source": "explicit mean/std",
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}
    with pytest.raises(ValueError, match="both mean and std"):
        _dm(tmp_path, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="contradict"):
        _dm(tmp_path, normalization="imagenet", mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(ValueError, match=r"\['imagenet', 'computed'\]"):
        _dm(tmp_path, normalization="cifar")
    with pytest.raises(ValueError, match="3"):
        _dm(tmp_path, mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(ValueError, match="positive"):
        _dm(tmp_path, mean=[0.5] * 3, std=[0.2, 0.0, 0.2])


def test_state_dict_carries_the_statistics_and_wins_over_recomputing(
    tmp_path: Path, monkeypatch
) -> None:
    make_folder(tmp_path)
    trained = _dm(tmp_path, normalization="computed")
    state = trained.state_dict()
    assert state == {"normalization": "computed", "mean": list(trained.mean),
                     "std": list(trained.std)}
    # Later (the folder may have changed): the checkpoint's values are used, not recomputed.
    later = _dm(tmp_path, normalization="computed")
    later.setup("test")  # datasets built before the state arrives are updated too

    def refuse() -> None:
        raise AssertionError("statistics recomputed although the checkpoint had them")

    monkeypatch.setattr(later, "_compute_stats", refuse)
    later._stats_used = None
    later.load_state_dict({**state, "mean": [0.1, 0.2, 0.3]})
    assert later.mean == (0.1, 0.2, 0.3) and "from the checkpoint" in later.normalization_used["source"]
    assert torch.equal(later.test_set.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_fast_path_only_for_small_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"at most {FAST_PATH_MAX_SIZE} px.*data_path: classic"):
        _dm(tmp_path, image_size=96, data_path="fast")
    dm = _dm(make_folder(tmp_path), image_size=32, data_path="fast")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    # The fast path serves the eval-transformed images, normalised the same way.
    classic = _dm(tmp_path, image_size=32)
    classic.setup("fit")
    torch.testing.assert_close(batch["image"][0], classic.val_set[0]["image"])
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 32, 32)


def test_bad_folders_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"does not exist.*train/<class>/<image>"):
        _ = _dm(tmp_path / "nowhere").class_names
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"half has no test/ folder"):
        _ = _dm(tmp_path / "half").class_names
    root = make_folder(tmp_path / "broken")
    bad = root / "test" / "c1" / "001.png"
    bad.write_bytes(b"not a png")
    dm = _dm(root)
    dm.setup("test")
    with pytest.raises(RuntimeError, match=f"could not decode image {bad}"):
        dm.test_set[4]
    with pytest.raises(ValueError, match="val_size"):
        _dm(root, val_size=12).setup("fit")


# -- end to end: train.py fit, then audit.py on the checkpoint -------------------------------


def _train_and_audit(tmp_path: Path, size: int, backbone: str, data: dict) -> tuple[dict, Path]:
    """Fit one short epoch on a tiny PNG folder, audit the last checkpoint, return metrics."""
    import json

    import yaml
    from helpers import run_train, tiny_config

    import audit

    root = make_folder(tmp_path / "images", classes=2, per_class=6, test_per_class=3)
    cfg_path = tiny_config(tmp_path, epochs=1, backbone=backbone, model={"num_classes": 2},
                           monitor={"num_images": 4, "methods": ["gradcam"]})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"] = {"class_path": "lit_modules.data.ImageFolderDataModule", "init_args": {
        "root": str(root), "image_size": size, "val_size": 2, "batch_size": 4,
        "num_workers": 0, "cue": {"classes": [0], "size": size // 8, "p_train": 1.0,
                                  "p_eval": 1.0}, **data}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli = run_train(["fit", "--config", str(cfg_path)])
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    out = tmp_path / "report"
    audit.main(["--ckpt", str(ckpt), "--out", str(out), "--progress", "false",
                "--num_images", "4", "--sanity_images", "2", "--steps", "4",
                "--counterfactual_images", "2", "--discovery_images", "3",
                "--methods", "[gradcam, saliency]"])
    assert (out / "report.html").is_file()
    return json.loads((out / "metrics.json").read_text()), ckpt


@pytest.mark.parametrize("case", ["folders", "shapes"])
def test_a_model_whose_outputs_differ_from_the_class_count_is_refused_before_training(
    tmp_path: Path, capsys, case: str
) -> None:
    """Three class folders and the default ten outputs (or ten shape classes and five
    outputs): refused at once with the fix, not a crash at the first out-of-range label
    or a head with dead outputs."""
    import yaml
    from helpers import run_train, tiny_config

    model = {"num_classes": 5} if case == "shapes" else {}
    cfg_path = tiny_config(tmp_path, epochs=1, model=model)
    if case == "folders":
        cfg = yaml.safe_load(cfg_path.read_text())
        root = make_folder(tmp_path / "images", classes=3, per_class=2, test_per_class=1)
        cfg["data"] = {"class_path": "lit_modules.data.ImageFolderDataModule", "init_args": {
            "root": str(root), "image_size": 32, "val_size": 1, "batch_size": 2,
            "num_workers": 0}}
        cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        run_train(["fit", "--config", str(cfg_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    expected = ("the model has 10 outputs but the data has 3 classes (c0, c1, c2); set "
                "--model.num_classes 3" if case == "folders" else
                "the model has 5 outputs but the data has 10 classes (circle, square")
    assert expected in err, err[-600:]
    assert not list(tmp_path.rglob("*.ckpt"))


def _map_sizes(folder: Path) -> set[tuple[int, int]]:
    """The spatial sizes of every 3-D-or-more tensor in the audit's cached results."""
    sizes: set[tuple[int, int]] = set()

    def walk(value: object) -> None:
        if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.is_floating_point():
            sizes.add(tuple(value.shape[-2:]))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif hasattr(value, "__dict__"):
            walk(vars(value))

    for entry in (folder / "cache").glob("*.pt"):  # the results (figures are PNGs)
        walk(torch.load(entry, weights_only=True))
    return sizes


def test_train_and_audit_at_64_with_computed_statistics(tmp_path: Path) -> None:
    from lit_modules.loading import load_checkpoint, load_run

    metrics, ckpt = _train_and_audit(tmp_path, 64, "tv:resnet18",
                                     {"normalization": "computed"})
    saved = load_checkpoint(ckpt)["ImageFolderDataModule"]
    assert saved["normalization"] == "computed"
    stated = metrics["data"]["normalization"]
    assert stated["mean"] == saved["mean"] and stated["std"] == saved["std"]
    assert "from the checkpoint" in stated["source"]
    assert _map_sizes(tmp_path / "report") == {(64, 64)}
    # The with/without-cue counterfactual ran on the decoded files (clean01), at 64 px.
    cf = metrics["models"][0]["bias"]["counterfactual"]
    assert cf is not None and cf["n_images"] == 4 and cf["classes"]["c0"]["cue_class"]
    # The folder changes after training: the audit still applies the checkpoint's values.
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "images/train/c0/zzz.png")
    run = load_run(ckpt)
    assert list(run.datamodule.mean) == saved["mean"]
    item = run.datamodule.dataset("test")[4]  # class c1: no cue
    expected = _eval_by_hand(run.datamodule.test_set.files[4], 64).float() / 255
    mean, std = (torch.tensor(saved[k]).view(3, 1, 1) for k in ("mean", "std"))
    torch.testing.assert_close(item["image"], (expected - mean) / std)
    fresh = _dm(tmp_path / "images", image_size=64, normalization="computed")
    assert list(fresh.mean) != saved["mean"]  # what recomputing would have used instead


@pytest.mark.slow
def test_train_and_audit_at_224_with_a_torchvision_backbone(tmp_path: Path) -> None:
    metrics, _ = _train_and_audit(tmp_path, 224, "tv:resnet18", {})
    assert metrics["data"]["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert metrics["data"]["normalization"]["std"] == list(IMAGENET_STD)
    assert _map_sizes(tmp_path / "report") == {(224, 224)}
