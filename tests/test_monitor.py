"""The explanation monitor inside real (tiny) training runs."""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers import hook_counts, register_tiny_backbone, run_train, tiny_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

import explain
from callbacks import ExplanationMonitor, grid_captions, shortcut_watch
from explain import records
from lit_modules.data.sampling import stratified_indices

SCALARS = ["cue_energy/biased", "cue_energy/clean", "object_energy", "pointing_game",
           "concentration"]


#: Height of the caption strip above each 128-px grid tile (two lines of text).
CAPTION = grid_captions.caption(torch.zeros(1, 3, 128, 128), [["a", "b"]]).shape[-2] - 128


def _decode(image_event) -> torch.Tensor:
    """A TensorBoard image event as a ``[3, H, W]`` tensor in ``[0, 1]``."""
    pixels = Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB")
    return torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1).float() / 255


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    """The run's custom-scalars layout as ``{category: {chart: [tag regex, ...]}}``."""
    (event,) = acc.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart}
            for c in layout.category}


def _positive_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive mass inside its mask, written out independently."""
    m = maps.float().clamp_min(0).flatten(1)
    return (m * masks.flatten(1).float()).sum(1) / m.sum(1)


def test_two_epochs_log_grids_scalars_and_maps(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=2, monitor={"methods": ["gradcam", "hirescam"]})
    cli = run_train(["fit", "--config", str(cfg)])
    log_dir = cli.trainer.log_dir
    acc = _events(log_dir)
    tags = acc.Tags()
    for name in ("train/loss_epoch", "val/loss", "val/acc"):
        assert name in tags["scalars"], tags["scalars"]
    assert len({e.step for e in acc.Scalars("val/acc")}) == 2  # one validation per epoch
    # The monitor logs at Lightning's own step for the epoch's validation, beside val/acc.
    steps = [cli.trainer.num_training_batches * (epoch + 1) - 1 for epoch in range(2)]
    assert [e.step for e in acc.Scalars("val/acc")] == steps
    saved = [records.load_monitor_records(log_dir)[1][e] for e in range(2)]
    for method in ("gradcam", "hirescam"):
        for name in SCALARS:
            events = acc.Scalars(f"explain/{method}/{name}")
            assert [e.step for e in events] == steps, name
            # What TensorBoard shows is what the epoch files hold (float32 in the events).
            want = [r["scalars"][method][name] for r in saved]
            assert [e.value for e in events] == pytest.approx(want, rel=1e-6, abs=1e-7), name
        # drift needs a previous epoch: logged from the second epoch on
        assert [e.step for e in acc.Scalars(f"explain/{method}/drift")] == steps[1:]
        assert [e.value for e in acc.Scalars(f"explain/{method}/nan_maps")] == [0, 0]
        grids = acc.Images(f"explain/{method}/grid")
        assert [g.step for g in grids] == steps
        # 10 images x (image, overlay) = 20 tiles of 32*4 px in rows of 8, 2 px apart, each
        # under a caption strip.
        assert (grids[0].width, grids[0].height) == (8 * 130 + 2, 3 * (130 + CAPTION) + 2)
        # The strip's colour is the verdict of the epoch's saved probabilities: green above
        # both tiles of an image predicted right, red above both of one predicted wrong.
        for grid, record in zip(grids, saved, strict=True):
            pixels = _decode(grid)
            right = (record["probs"].argmax(1) == record["labels"]).tolist()
            for i, ok in enumerate(right):
                for t in (2 * i, 2 * i + 1):
                    y, x = 2 + (t // 8) * (130 + CAPTION), 2 + (t % 8) * 130
                    want = grid_captions.CAPTION_RIGHT if ok else grid_captions.CAPTION_WRONG
                    assert pixels[:, y + 1, x + 125].tolist() == pytest.approx(
                        list(want), abs=1 / 255), (i, t)
    files = sorted(glob.glob(os.path.join(log_dir, "explanations", "epoch_*.pt")))
    assert [os.path.basename(f) for f in files] == ["epoch_0000.pt", "epoch_0001.pt"]
    record = saved[-1]
    assert record["explained"] == "all"
    maps = record["maps"]["gradcam"]
    assert maps.shape == (10, 10, 32, 32) and torch.isfinite(maps.float()).all()
    # The scores, recomputed here from the saved fp16 maps and masks.
    fixed = torch.load(os.path.join(log_dir, "explanations", "fixed_images.pt"), weights_only=True)
    labels, cue = fixed["labels"], fixed["cue_mask"]
    true_maps = maps[torch.arange(10), labels]
    carries = cue.flatten(1).any(1)
    assert carries.tolist() == [c in (0, 1) for c in labels.tolist()]  # cue_p_eval = 1
    biased = _positive_share(true_maps[carries], cue[carries]).nanmean()
    assert record["scalars"]["gradcam"]["cue_energy/biased"] == pytest.approx(float(biased), abs=2e-3)
    cos = torch.nn.functional.cosine_similarity(
        maps.float().flatten(0, 1).flatten(1), saved[0]["maps"]["gradcam"].float().flatten(0, 1).flatten(1),
        dim=1, eps=1e-12)
    assert record["scalars"]["gradcam"]["drift"] == pytest.approx(float((1 - cos).nanmean()), abs=2e-3)
    # One custom-scalars layout: biased and clean cue energy of a method share a chart,
    # and every pattern in it selects exactly one logged curve.
    layout = _layout(acc)
    assert list(layout) == ["explain/gradcam", "explain/hirescam", "explain: methods side by side"]
    assert layout["explain/gradcam"]["gradcam: cue energy: biased vs clean"] == [
        "^explain/gradcam/cue_energy/biased$", "^explain/gradcam/cue_energy/clean$"]
    logged = tags["scalars"]
    for charts in layout.values():
        for chart, patterns in charts.items():
            for pattern in patterns:
                assert len([t for t in logged if re.search(pattern, t)]) == 1, (chart, pattern)
    assert not [t for t in logged if "hp_metric" in t]  # no placeholder from the logger
    assert fixed["images"].dtype == torch.uint8 and fixed["images"].shape == (10, 3, 32, 32)
    # Stratified: 10 images over 10 classes = one of each.
    assert sorted(fixed["labels"].tolist()) == list(range(10))
    # The resolved config sits next to the logs (audit.py reads it back).
    assert os.path.exists(os.path.join(log_dir, "config.yaml"))


def test_resume_keeps_fixed_images(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, monitor={"num_images": 6, "seed": 3})
    first = run_train(["fit", "--config", str(cfg)])
    monitor = next(c for c in first.trainer.callbacks if isinstance(c, ExplanationMonitor))
    chosen = list(monitor.indices)
    ckpt = first.trainer.checkpoint_callback.last_model_path
    # A different seed in the resumed run must not matter: the checkpoint's indices win.
    cfg2 = tiny_config(tmp_path, epochs=2, monitor={"num_images": 6, "seed": 99}, name="resumed")
    second = run_train(["fit", "--config", str(cfg2), "--ckpt_path", ckpt])
    resumed = next(c for c in second.trainer.callbacks if isinstance(c, ExplanationMonitor))
    assert resumed.indices == chosen
    assert second.trainer.current_epoch == 2
    record = torch.load(
        os.path.join(second.trainer.log_dir, "explanations", "epoch_0001.pt"), weights_only=True
    )
    assert record["indices"].tolist() == chosen
    # drift continues from the checkpointed previous maps
    assert "drift" in record["scalars"]["gradcam"]


def test_without_tensorboard_warns_once_and_saves_maps(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=2, logger=False)
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        cli = run_train(["fit", "--config", str(cfg)])
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    folder = os.path.join(cli.trainer.default_root_dir, "explanations")
    assert len(glob.glob(os.path.join(folder, "epoch_*.pt"))) == 2


MONITORED = "explain/gradcam/cue_energy/biased"


def test_scores_reach_every_logger_and_model_checkpoint_can_monitor_them(tmp_path) -> None:
    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "monitor": MONITORED, "mode": "max", "save_top_k": 1, "filename": "best"}}
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(tmp_path / "runs"), "name": "csv"}}
    cfg = tiny_config(tmp_path, epochs=3, backbone=register_tiny_backbone(), logger=csv_logger,
                      callbacks=[best], monitor={"methods": ["gradcam", "saliency"]})
    # A non-TensorBoard logger: one warning (no grids), the scalars still reach it.
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as caught:
        cli = run_train(["fit", "--config", str(cfg)])
    assert sum("no TensorBoardLogger" in str(w.message) for w in caught) == 1
    assert "CSVLogger" in next(str(w.message) for w in caught if "TensorBoard" in str(w.message))
    log_dir = cli.trainer.log_dir
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for method in ("gradcam", "saliency"):
        for name in [*SCALARS, "drift", "nan_maps"]:
            assert f"explain/{method}/{name}" in rows[0], name
    explained = [r for r in rows if r[MONITORED]]
    assert [int(r["epoch"]) for r in explained] == [0, 1, 2]
    # The same step as val/acc, Lightning's own.
    assert [r["step"] for r in explained] == [r["step"] for r in rows if r["val/acc"]]
    logged = [float(r[MONITORED]) for r in explained]
    saved = records.load_monitor_records(log_dir)[1]
    assert logged == pytest.approx([r["scalars"]["gradcam"]["cue_energy/biased"] for r in saved],
                                   rel=1e-6)
    # ModelCheckpoint saw the value the loggers got, and kept the epoch with the highest.
    ckpt_cb = next(cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == MONITORED)
    assert float(ckpt_cb.best_model_score) == pytest.approx(max(logged), rel=1e-6)
    state = torch.load(ckpt_cb.best_model_path, weights_only=True)
    assert state["epoch"] == logged.index(max(logged))
    assert os.path.basename(ckpt_cb.best_model_path) == "best.ckpt"
    assert len(saved) == 3  # maps saved every epoch without TensorBoard


def test_callback_leaves_model_and_rng_untouched(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, monitor={"methods": ["gradcam", "gradcam_pp"]})
    cli = run_train(["fit", "--config", str(cfg)])
    trainer, module = cli.trainer, cli.model
    monitor = next(c for c in trainer.callbacks if isinstance(c, ExplanationMonitor))
    module.train()
    module.backbone.trunk.layer2.eval()  # mixed modes
    modes = {n: m.training for n, m in module.named_modules()}
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    bn = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    hooks = hook_counts(module)
    rng = torch.get_rng_state()
    with torch.inference_mode():  # what Lightning's validate/test runs under
        scalars = monitor.explain_epoch(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in module.parameters())
    for k, v in module.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bn[k]), k
    assert hook_counts(module) == hooks
    # and it did its work: the scores of the last (the current) epoch's saved record
    saved = torch.load(records.epoch_path(trainer.log_dir, 0), weights_only=True)
    for method in ("gradcam", "gradcam_pp"):
        for name, value in saved["scalars"][method].items():
            assert scalars[f"explain/{method}/{name}"] == value


def test_stratified_indices_cover_classes_and_depend_on_seed() -> None:
    labels = torch.arange(10).repeat(20)
    picked = stratified_indices(labels, 25, seed=0)
    counts = torch.bincount(labels[picked], minlength=10)
    assert counts.max() - counts.min() <= 1 and len(set(picked)) == 25
    assert stratified_indices(labels, 25, seed=0) == picked
    assert stratified_indices(labels, 25, seed=1) != picked


def test_monitor_rejects_bad_arguments() -> None:
    with pytest.raises(KeyError, match="gradcam"):
        ExplanationMonitor(methods=["grad_cam"])
    with pytest.raises(ValueError, match="classes"):
        ExplanationMonitor(classes="best")


def test_nan_model_is_reported_and_training_goes_on(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=3, monitor={"methods": ["gradcam", "eigencam"]},
                      callbacks=[{"class_path": "helpers.PoisonAt", "init_args": {"epoch": 1}}])
    with pytest.warns(UserWarning, match="non-finite maps for 10 of 10") as caught:
        cli = run_train(["fit", "--config", str(cfg)])
    assert cli.trainer.current_epoch == 3  # all epochs ran
    assert sum("gradcam gave non-finite" in str(w.message) for w in caught) == 2
    acc = _events(cli.trainer.log_dir)
    for method in ("gradcam", "eigencam"):
        assert [e.value for e in acc.Scalars(f"explain/{method}/nan_maps")] == [0, 10, 10]
        # Drawn for the healthy epoch only; scored NaN when broken, so the same keys are
        # logged every epoch (a ModelCheckpoint monitoring one never misses it).
        assert len(acc.Images(f"explain/{method}/grid")) == 1
        values = [e.value for e in acc.Scalars(f"explain/{method}/concentration")]
        assert [math.isnan(v) for v in values] == [False, True, True]
    record = torch.load(os.path.join(cli.trainer.log_dir, "explanations", "epoch_0002.pt"),
                        weights_only=True)
    assert record["nan_maps"] == {"gradcam": 10, "eigencam": 10} and record["maps"] == {}


def _final_weights(tmp_path, monitor: bool) -> dict[str, torch.Tensor]:
    cfg = tiny_config(tmp_path, epochs=2, monitor={"methods": ["gradcam", "saliency"]},
                      name="with" if monitor else "without")
    args = ["fit", "--config", str(cfg)]
    if not monitor:  # the same config with the callback list minus the monitor
        args += ["--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true"]
    cli = run_train(args)
    has = any(isinstance(cb, ExplanationMonitor) for cb in cli.trainer.callbacks)
    assert has == monitor
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


def test_monitor_never_changes_training(tmp_path) -> None:
    with_monitor = _final_weights(tmp_path, monitor=True)
    without = _final_weights(tmp_path, monitor=False)
    assert with_monitor.keys() == without.keys()
    for name in with_monitor:  # bitwise, BatchNorm running statistics included
        assert torch.equal(with_monitor[name], without[name]), name


def test_shown_classes_only_are_explained_and_equal_the_full_maps(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, monitor={
        "methods": ["gradcam", "saliency"], "classes": "predicted", "explain_classes": "shown"})
    cli = run_train(["fit", "--config", str(cfg)])
    log_dir = cli.trainer.log_dir
    record = torch.load(os.path.join(log_dir, "explanations", "epoch_0000.pt"), weights_only=True)
    assert record["explained"] == "predicted"
    fixed = torch.load(os.path.join(log_dir, "explanations", "fixed_images.pt"), weights_only=True)
    dm = cli.datamodule
    images = torch.stack([dm.dataset("val")[i]["image"] for i in fixed["indices"].tolist()])
    labels, preds = record["labels"], record["probs"].argmax(-1)
    n = len(labels)
    for method in ("gradcam", "saliency"):
        saved = record["maps"][method].float()
        full = explain.run(cli.model, images, method)  # the final weights: no step after
        for pick in (labels, preds):
            want = full[torch.arange(n), pick]
            assert torch.allclose(saved[torch.arange(n), pick], want, rtol=2e-3,
                                  atol=2e-3 * float(want.abs().max())), method
        others = torch.ones_like(saved[:, :, 0, 0], dtype=torch.bool)
        others[torch.arange(n), labels] = False
        others[torch.arange(n), preds] = False
        assert (saved[others] == 0).all()  # classes not shown were not explained
        assert set(record["scalars"][method]) >= {"cue_energy/biased", "concentration"}
    with pytest.raises(ValueError, match="explain_classes"):
        ExplanationMonitor(explain_classes="some")


def test_lifts_are_a_detector_logged_only_for_classes_with_a_usable_map() -> None:
    """Hand-made true-class maps: class 3's all sit in the top-left 4x4, the others' at
    random places, class 7's are all zero. The lift is logged per class (the largest for
    class 3), never as NaN: class 7 logs nothing. No warning: the lift is not a verdict."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(8)
    maps = torch.zeros(80, 32, 32)  # the true class's map of each image
    for i, c in enumerate(labels.tolist()):
        if c == 7:
            continue
        if c == 3:
            y, x = 0, 0
        else:
            y, x = (int(v) for v in torch.randint(0, 26, (2,), generator=g))
        maps[i, y : y + 4 + 2 * (c != 3), x : x + 4 + 2 * (c != 3)] = 1.0
    names = [f"c{i}" for i in range(10)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, hotspots = shortcut_watch.lift_scores(maps, labels, names)
    assert set(scores) == {f"hotspot_lift/c{c}" for c in range(10) if c != 7}
    assert max(scores, key=scores.get) == "hotspot_lift/c3"
    assert scores["hotspot_lift/c3"] == pytest.approx((32 * 32) / 36, rel=1e-4)  # all in 6x6
    assert all(math.isfinite(v) for v in scores.values())
    image = shortcut_watch.hotspot_image(maps, labels, hotspots, 10, {}, 4)
    assert image.shape == (3, 4 * 32 + 4, 10 * (4 * 32 + 2) + 2)
    assert shortcut_watch.lift_scores(None, labels, names) == ({}, None)  # broken maps


def test_discovery_in_a_run_logs_lifts_and_grows_the_fixed_set(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, monitor={"discovery_per_class": 3},
                      data={"num_val": 60})
    cli = run_train(["fit", "--config", str(cfg)])
    log_dir = cli.trainer.log_dir
    fixed = torch.load(os.path.join(log_dir, "explanations", "fixed_images.pt"), weights_only=True)
    assert torch.bincount(fixed["labels"], minlength=10).min() >= 3  # 3 a class, 30 at least
    record = records.load_monitor_records(log_dir)[1][0]
    maps = record["maps"]["gradcam"].float()
    true_maps = maps[torch.arange(len(fixed["labels"])), fixed["labels"]]
    from explain.measures import discovery

    classes = discovery.class_hotspots(true_maps, fixed["labels"], 10, cluster=False)
    acc = _events(log_dir)
    names = cli.datamodule.class_names
    tags = set(acc.Tags()["scalars"])
    for h in classes:  # TensorBoard holds the lifts recomputed here from the saved maps
        tag = f"explain/gradcam/hotspot_lift/{names[h.label]}"
        if h.hotspot is None:  # every map of the class was zero: no lift logged (not NaN)
            assert tag not in tags
        else:
            assert acc.Scalars(tag)[0].value == pytest.approx(h.hotspot.lift, rel=2e-3)
    # The verdict: the tracker ran on gradcam's maps (saliency is not monitored here) and
    # wrote its table; a one-epoch tiny model relies on no shortcut.
    assert acc.Scalars("explain/shortcuts/confirmed")[0].value == 0
    (text,) = acc.Tensors("explain/shortcuts/summary/text_summary")
    assert "Shortcuts at epoch 0" in tensor_util.make_ndarray(text.tensor_proto).item().decode()
    grid = acc.Images("explain/gradcam/grid")[0]
    assert (grid.width, grid.height) == (8 * 130 + 2, 3 * (130 + CAPTION) + 2)  # still 10
    assert acc.Images("explain/gradcam/hotspots")[0].width == 10 * 130 + 2

