"""The fast data path (split on the device, batched augmentation) against the classic one."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import run_train, tiny_config
from test_data import write_imagefolder

from callbacks import ExactResume
from lit_modules.data import (
    CIFAR10DataModule,
    CueConfig,
    DeviceLoader,
    DeviceSplit,
    EpochSampler,
    SplitDataset,
    SpuriousCue,
    SyntheticShapes,
    SyntheticShapesDataModule,
)
from lit_modules.data.fast import reflect_index
from lit_modules.data.split import ItemKey

KEYS = ("image", "label", "object_mask", "cue_mask", "index")
# chi-square quantiles at 0.999 (scipy.stats.chi2.ppf(0.999, dof)): a correct sampler
# fails one comparison about once in a thousand seeds, and the seeds here are fixed.
CHI2_999 = {1: 10.83, 8: 26.12, 80: 124.84}


def loader(ds: SplitDataset, batch_size: int = 16, shuffle: bool = True, **kwargs) -> DeviceLoader:
    return DeviceLoader(DeviceSplit.from_dataset(ds, "cpu"), batch_size, shuffle, **kwargs)


def epoch(dl: DeviceLoader, e: int) -> list[dict[str, torch.Tensor]]:
    dl.set_epoch(e)
    return list(dl)


def cat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in KEYS}


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(KEYS) and list(y) == list(KEYS)
        for k in KEYS:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def chi2(counts: torch.Tensor) -> float:
    """Goodness of fit of ``counts`` to a uniform distribution over its cells."""
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_reflect_index_is_f_pad_reflect() -> None:
    for size, pad in [(16, 4), (5, 4), (32, 0), (7, 1)]:
        line = torch.arange(size, dtype=torch.float32).view(1, 1, size)
        expected = F.pad(line, (pad, pad), mode="reflect").flatten().long()
        assert torch.equal(reflect_index(size, pad), expected)
    with pytest.raises(ValueError, match="pad"):
        reflect_index(4, 4)


# -- augmentation: distribution and values ------------------------------------------------


def coded_dataset(n: int, pad: int = 4) -> SplitDataset:
    """``n`` copies of a 16x16 image whose channel 0 numbers its pixels 0..255.

    Any crop and flip of it is recognisable, so each item tells which one it got. The
    object mask is an asymmetric shape, to check it moves with the image.
    """
    code = torch.arange(256, dtype=torch.uint8).view(16, 16)
    image = torch.stack([code, 255 - code, torch.full_like(code, 7)])
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    mask = (rows < 9) & (cols < rows + 3) & (cols > 1)
    return SplitDataset(
        image.expand(n, 3, 16, 16).contiguous(),
        torch.zeros(n, dtype=torch.long),
        mask.expand(n, 16, 16).contiguous(),
        split="train",
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        flip=True,
        crop_padding=pad,
    )


def crop_table(ds: SplitDataset, pad: int) -> tuple[dict[bytes, tuple[int, int, int]], dict]:
    """Every (top, left, flip) crop of the coded image, keyed by its channel-0 bytes, and the
    matching object masks; made with F.pad as the per-item path does."""
    code = F.pad(ds.images[:1].float(), (pad,) * 4, mode="reflect")[0, 0]
    mask = F.pad(ds.object_masks[:1, None].float(), (pad,) * 4, mode="reflect")[0, 0] > 0.5
    table, masks = {}, {}
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            for flip in (0, 1):
                crop = code[top : top + 16, left : left + 16]
                m = mask[top : top + 16, left : left + 16]
                if flip:
                    crop, m = crop.flip(-1), m.flip(-1)
                table[crop.to(torch.uint8).numpy().tobytes()] = (top, left, flip)
                masks[(top, left, flip)] = m
    return table, masks


def decode(ds: SplitDataset, images: torch.Tensor, table: dict) -> list[tuple[int, int, int]]:
    """Normalised images -> (top, left, flip) of each, read from the channel-0 codes."""
    codes = ((images[:, 0] * ds.std[0] + ds.mean[0]) * 255).round().to(torch.uint8)
    return [table[c.numpy().tobytes()] for c in codes]


def test_classic_and_fast_draw_the_same_uniform_crops_and_flips() -> None:
    # Until the classic path drew from (seed, epoch, index) (a resumed run replayed other
    # crops), it drew from the global RNG and this compared the two distributions; now
    # both read split.augment_draws, so every image gets the same crop on both paths.
    pad, n, epochs = 4, 400, 5
    ds = coded_dataset(n, pad)
    table, masks = crop_table(ds, pad)
    assert len(table) == (2 * pad + 1) ** 2 * 2  # every crop and flip is distinguishable

    fast = {}
    dl = loader(ds, batch_size=128, seed=3)
    for e in range(epochs):
        for batch in epoch(dl, e):
            drawn = decode(ds, batch["image"], table)
            for i, d, m in zip(batch["index"].tolist(), drawn, batch["object_mask"], strict=True):
                assert torch.equal(m, masks[d])  # the mask got the image's crop and flip
                fast[(e, i)] = d
    rng = torch.get_rng_state()
    for e in range(epochs):
        for i in range(n):
            item = ds[ItemKey(i, e, 3)]
            drawn = decode(ds, item["image"][None], table)[0]
            assert torch.equal(item["object_mask"], masks[drawn])
            assert drawn == fast[(e, i)], (e, i)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used

    t = torch.tensor(list(fast.values()))
    assert t.shape == (n * epochs, 3)
    tops = torch.bincount(t[:, 0], minlength=9)
    lefts = torch.bincount(t[:, 1], minlength=9)
    joint = torch.bincount(t[:, 0] * 9 + t[:, 1], minlength=81)
    flips = torch.bincount(t[:, 2], minlength=2)
    assert tops.numel() == lefts.numel() == 9  # offsets stay within 0..2p
    assert chi2(tops) < CHI2_999[8], tops
    assert chi2(lefts) < CHI2_999[8], lefts
    assert chi2(joint) < CHI2_999[80], joint  # top and left independent
    assert chi2(flips) < CHI2_999[1], flips
    # An image's crop changes from epoch to epoch.
    per_epoch = t.view(epochs, n, 3)
    assert (per_epoch[0] != per_epoch[1]).any(1).float().mean() > 0.8


def test_fast_train_batch_equals_classic_items_of_its_epoch() -> None:
    shapes = SyntheticShapes(40, 32, seed=2, split="train")
    cue = SpuriousCue(list(range(5)), size=5, position="random", p_train=0.7, seed=1)
    ds = SplitDataset(shapes.images, shapes.labels, shapes.masks, "train",
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), cue=cue, flip=True,
                      crop_padding=4)
    dl = loader(ds, batch_size=16, seed=5)
    batches = epoch(dl, 3)
    draws = dl.draws(3)
    assert torch.equal(torch.cat([b["index"] for b in batches]), draws.order)
    assert draws.flips.any() and (draws.tops != 4).any()  # crops and flips were exercised
    stamped = 0
    for batch in batches:
        for j, index in enumerate(batch["index"].tolist()):
            # The per-item path asked for this item as augmented in epoch 3 under seed 5.
            item = ds[ItemKey(index, 3, 5)]
            for k in KEYS:
                assert torch.equal(batch[k][j], item[k]), (k, index)
            stamped += int(item["cue_mask"].any())
    assert 5 < stamped < 30  # the cue was exercised, on some items only


@pytest.mark.parametrize("workers", [0, 2])
def test_classic_and_fast_training_batches_are_equal(workers) -> None:
    """Same order and crops from (seed, epoch): the classic DataLoader (its items made in
    worker processes or not) serves the fast path's training batches, bit for bit."""
    args = {"image_size": 16, "num_train": 40, "batch_size": 16, "seed": 6,
            "cue": {"classes": [0, 1], "p_train": 0.5}}
    fast = shapes_dm(**args).train_dataloader()
    classic = shapes_dm(data_path="classic", num_workers=workers, **args).train_dataloader()
    rng = torch.get_rng_state()
    for e in (0, 1, 4):
        assert_batches_equal(epoch(classic, e), epoch(fast, e))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used
    # Resumed after 2 batches of epoch 4: the rest of that epoch, then epoch 5 whole.
    classic.load_state_dict({"epoch": 4, "batches": 2})
    assert_batches_equal(epoch(classic, 4), epoch(fast, 4)[2:])
    assert_batches_equal(epoch(classic, 5), epoch(fast, 5))


# -- evaluation batches ---------------------------------------------------------------------


def test_fast_eval_batches_equal_classic_shapes() -> None:
    kwargs = {"num_train": 40, "num_val": 37, "num_test": 20, "batch_size": 8,
              "cue": CueConfig([0, 3], position="random", p_eval=0.6)}
    fast = SyntheticShapesDataModule(data_path="fast", **kwargs)
    classic = SyntheticShapesDataModule(**kwargs)
    for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        a, b = list(getattr(fast, name)()), list(getattr(classic, name)())
        assert type(getattr(fast, name)()) is DeviceLoader
        assert [len(x["index"]) for x in a] == ([8] * 4 + [5] if name == "val_dataloader" else
                                               [8, 8, 4])
        assert_batches_equal(a, b)
    assert cat(list(fast.val_dataloader()))["cue_mask"].any()


def test_fast_eval_and_train_on_cifar_layout(tmp_path) -> None:
    write_imagefolder(tmp_path, ["a", "b", "c"], {"train": 8, "test": 3})
    kwargs = {"root": str(tmp_path), "val_size": 5, "batch_size": 4, "num_workers": 0,
              "cue": CueConfig([1], p_train=1.0, p_eval=1.0)}
    fast = CIFAR10DataModule(data_path="fast", **kwargs)
    classic = CIFAR10DataModule(**kwargs)
    assert_batches_equal(list(fast.val_dataloader()), list(classic.val_dataloader()))
    assert_batches_equal(list(fast.test_dataloader()), list(classic.test_dataloader()))
    # Train: every image once, CIFAR's crop (padding 4) and flip active, cue in place.
    dl = fast.train_dataloader()
    assert dl.data.crop_padding == 4 and dl.data.flip
    got = cat(epoch(dl, 0))
    assert sorted(got["index"].tolist()) == list(range(19))
    cue = got["cue_mask"][got["label"] == 1]
    assert cue.shape[0] > 0 and cue[:, :4, :4].all() and cue.flatten(1).sum(1).eq(16).all()


# -- epochs -----------------------------------------------------------------------------------


def shapes_dm(**kwargs) -> SyntheticShapesDataModule:
    args = {"num_train": 50, "num_val": 20, "num_test": 20, "batch_size": 16, "data_path": "fast"}
    return SyntheticShapesDataModule(**(args | kwargs))


def test_every_image_once_per_epoch_last_batch_kept() -> None:
    dl = shapes_dm().train_dataloader()
    assert len(dl) == 4
    for e in (0, 1, 7):
        batches = epoch(dl, e)
        assert [b["index"].numel() for b in batches] == [16, 16, 16, 2]
        assert sorted(cat(batches)["index"].tolist()) == list(range(50))
    dropping = shapes_dm(drop_last=True).train_dataloader()
    batches = epoch(dropping, 0)
    assert len(dropping) == len(batches) == 3
    assert len(set(cat(batches)["index"].tolist())) == 48
    # drop_last is for training only, and the classic path honours it too.
    assert len(shapes_dm(drop_last=True).val_dataloader()) == 2
    assert len(list(shapes_dm(drop_last=True, data_path="classic").train_dataloader())) == 3
    with pytest.raises(ValueError, match="data_path"):
        shapes_dm(data_path="gpu")


def test_epochs_differ_and_seed_epoch_repeat_exactly() -> None:
    rng = torch.get_rng_state()
    dl = shapes_dm(seed=3).train_dataloader()
    e0, e1 = cat(epoch(dl, 0)), cat(epoch(dl, 1))
    assert not torch.equal(e0["index"], e1["index"])
    # The same image is flipped in one epoch and not in the other about half the time.
    a = e0["image"][e0["index"].argsort()]
    b = e1["image"][e1["index"].argsort()]
    changed = (a != b).flatten(1).any(1).float().mean().item()
    assert 0.3 < changed < 0.7, changed
    # A fresh loader asked for epoch 1 directly gives epoch 1 again, bit for bit.
    again = shapes_dm(seed=3).train_dataloader()
    assert_batches_equal(epoch(again, 1), epoch(dl, 1))
    assert_batches_equal(epoch(again, 0), epoch(dl, 0))
    other = cat(epoch(shapes_dm(seed=4).train_dataloader(), 1))
    assert not torch.equal(other["index"], e1["index"])
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used


def test_state_dict_resumes_mid_epoch() -> None:
    dl = shapes_dm().train_dataloader()
    dl.set_epoch(2)
    it = iter(dl)
    seen = [next(it), next(it)]
    state = dl.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    rest = list(it)
    resumed = shapes_dm().train_dataloader()
    resumed.load_state_dict(state)
    assert_batches_equal(epoch(resumed, 2), rest)
    assert_batches_equal(epoch(resumed, 2), seen + rest)  # the skip applies once
    resumed.load_state_dict(state)
    assert len(epoch(resumed, 3)) == 4  # a state of another epoch skips nothing


def test_ranks_share_one_permutation() -> None:
    whole = EpochSampler(10, shuffle=True, seed=1)
    whole.set_epoch(4)
    order = whole.indices()
    parts = []
    for rank in range(3):
        s = EpochSampler(10, shuffle=True, seed=1, num_replicas=3, rank=rank)
        s.set_epoch(4)
        assert len(s) == 4
        parts.append(s.indices())
    padded = torch.cat([order, order[:2]])
    for rank in range(3):
        assert torch.equal(parts[rank], padded[rank::3])
    ds = shapes_dm().dataset("train")
    halves = [cat(epoch(loader(ds, 8, num_replicas=2, rank=r), 0))["index"] for r in (0, 1)]
    assert halves[0].numel() == halves[1].numel() == 25
    assert sorted(torch.cat(halves).tolist()) == list(range(50))


# -- inside Lightning -------------------------------------------------------------------------


def test_fast_path_trains_with_the_monitor(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=2, data={"data_path": "fast"})
    cli = run_train(["fit", "--config", str(cfg)])
    trainer = cli.trainer
    dl = trainer.train_dataloader
    assert type(dl) is DeviceLoader and dl.sampler.epoch == 1  # Lightning set the epoch
    assert type(trainer.val_dataloaders) is DeviceLoader and len(trainer.val_dataloaders) == 3
    files = sorted(glob.glob(os.path.join(trainer.log_dir, "explanations", "epoch_*.pt")))
    assert [os.path.basename(f) for f in files] == ["epoch_0000.pt", "epoch_0001.pt"]
    record = torch.load(files[-1], weights_only=True)
    fixed = torch.load(os.path.join(trainer.log_dir, "explanations", "fixed_images.pt"),
                       weights_only=True)
    # The fast path stamped the cue on exactly the fixed images of classes 0 and 1, as a
    # 4x4 patch in the top-left corner (tiny_config's cue).
    carries = fixed["cue_mask"].flatten(1).any(1)
    assert torch.equal(carries, fixed["labels"] <= 1) and carries.any()
    patch = torch.zeros(32, 32, dtype=torch.bool)
    patch[:4, :4] = True
    assert (fixed["cue_mask"][carries] == patch).all()
    # The logged score is the share of positive true-class Grad-CAM mass on that patch.
    maps = record["maps"]["gradcam"].float()
    true_maps = maps[torch.arange(len(maps)), fixed["labels"]][carries].clamp_min(0)
    share = ((true_maps * patch).flatten(1).sum(1) / true_maps.flatten(1).sum(1)).nanmean()
    assert record["scalars"]["gradcam"]["cue_energy/biased"] == pytest.approx(float(share), abs=2e-3)
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}
    ]


class DataRecorder(L.LightningModule):
    """A linear model that records what each training step was fed, and a draw from the
    global RNG (what dropout would draw) there.

    Its optimizer setup asks for ``trainer.estimated_stepping_batches`` (as the onecycle
    schedule does), which makes Lightning build the train loader before it reads the
    checkpoint, and then never hand the loader its saved position.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * 16 * 16, 10)
        self.seen: list[tuple[int, list[int], float, float]] = []

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        self.seen.append((self.current_epoch, batch["index"].tolist(), x.sum().item(),
                          torch.rand(()).item()))
        return F.cross_entropy(self.net(x.flatten(1)), batch["label"])

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(L.Callback):
    """Save a checkpoint after (epoch, batch_idx) and stop there, like a killed run."""

    def __init__(self, epoch: int, batch_idx: int, path: str) -> None:
        self.at, self.path = (epoch, batch_idx), path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(epochs: int, data_path: str, ckpt: str | None = None,
        callbacks: list | None = None) -> DataRecorder:
    model = DataRecorder()
    # A fresh process's RNG state would not be the killed one's either.
    torch.manual_seed(len(callbacks or []) + (ckpt is not None))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ExactResume(seed=0), *(callbacks or [])])
    dm = shapes_dm(image_size=16, num_train=40, batch_size=8, seed=1, data_path=data_path)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model


@pytest.mark.parametrize("data_path", ["fast", "classic"])
@pytest.mark.parametrize("stop", [(0, 4), (1, 1)], ids=["epoch_end", "mid_epoch"])
def test_resumed_run_sees_the_same_data(tmp_path, stop, data_path) -> None:
    whole = fit(3, data_path).seen
    assert len(whole) == 15 and whole[0][1] != whole[5][1]
    path = str(tmp_path / "killed.ckpt")
    first = fit(3, data_path, callbacks=[StopAt(*stop, path)]).seen
    second = fit(3, data_path, ckpt=path).seen
    assert first + second == whole


@pytest.mark.parametrize("name", ["resnet18_cifar10_fast", "vgg16gap_cifar10_fast"])
def test_fast_recipes_select_the_fast_settings(name, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")
    cli = run_train(["--config", config, "--trainer.default_root_dir", str(tmp_path)], run=False)
    dm, hp = cli.datamodule, cli.model.hparams
    assert isinstance(dm, CIFAR10DataModule) and dm.data_path == "fast"
    assert 512 <= dm.batch_size <= 1024 and dm.cue is None
    assert cli.trainer.precision == "bf16-mixed" and 20 <= cli.trainer.max_epochs <= 30
    assert hp.channels_last and hp.compile and hp.optimizer == "sgd" and hp.momentum == 0.9
    assert hp.label_smoothing == 0.1 and hp.scheduler in ("onecycle", "warmup_linear")
    monitor = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ExplanationMonitor")
    assert monitor.methods == ["gradcam", "saliency"] and monitor.num_images == 16
    assert monitor.explain_classes == "shown" and monitor.discovery_per_class == 8
