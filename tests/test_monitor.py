"""The explanation monitor inside real (tiny) training runs."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from helpers import run_train, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import explain
from callbacks import ExplanationMonitor
from lit_modules.data.sampling import stratified_indices

SCALARS = ["cue_energy/biased", "cue_energy/clean", "object_energy", "pointing_game",
           "concentration"]


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


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
    for method in ("gradcam", "hirescam"):
        for name in SCALARS:
            events = acc.Scalars(f"explain/{method}/{name}")
            assert [e.step for e in events] == steps, name
            assert all(0.0 <= e.value <= 1.0 for e in events), name
        # drift needs a previous epoch: logged from the second epoch on
        assert [e.step for e in acc.Scalars(f"explain/{method}/drift")] == steps[1:]
        assert [e.value for e in acc.Scalars(f"explain/{method}/nan_maps")] == [0, 0]
        grids = acc.Images(f"explain/{method}/grid")
        assert [g.step for g in grids] == steps
        assert grids[0].width > 32 * 4 and grids[0].height > 32 * 4
    files = sorted(glob.glob(os.path.join(log_dir, "explanations", "epoch_*.pt")))
    assert [os.path.basename(f) for f in files] == ["epoch_0000.pt", "epoch_0001.pt"]
    record = torch.load(files[-1], weights_only=True)
    assert record["explained"] == "all"
    maps = record["maps"]["gradcam"]
    assert maps.shape == (10, 10, 32, 32) and torch.isfinite(maps.float()).all()
    assert record["scalars"]["gradcam"]["drift"] >= 0
    fixed = torch.load(os.path.join(log_dir, "explanations", "fixed_images.pt"), weights_only=True)
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
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())
    rng = torch.get_rng_state()
    with torch.inference_mode():  # what Lightning's validate/test runs under
        monitor.on_validation_epoch_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in module.parameters())
    for k, v in module.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bn[k]), k
    assert hooks == sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())


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
        # Drawn and scored for the healthy epoch only.
        assert len(acc.Images(f"explain/{method}/grid")) == 1
        assert len(acc.Scalars(f"explain/{method}/concentration")) == 1
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
