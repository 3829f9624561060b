"""Training-speed switches: no per-step host syncs, warm-up schedules, torch.compile."""

from __future__ import annotations

import glob
import os
import traceback
from itertools import pairwise

import lightning as L
import pytest
import torch
from helpers import register_tiny_backbone, run_train, tiny_config

import explain
from lit_modules import ImageClassifier
from lit_modules.classifier import warmup_factor
from lit_modules.data import SyntheticShapesDataModule

# What copies a tensor's value to the host, i.e. waits for the device (a sync on a GPU):
# reading a value, and ops whose output size depends on the values.
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "unique",
           "bincount", "masked_select")
SYNCING_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "unique_consecutive")


class SyncTrap(L.Callback):
    """Records every host-sync call from the start of batch ``first`` to that of ``last``.

    That window holds whole steps (data, forward, backward, optimiser, logging, Lightning's
    per-step metric bookkeeping). A CPU run cannot stall on a sync, so the calls that would
    cause one are what is counted.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: int = 1, last: int = 3) -> None:
        self.monkeypatch, self.first, self.last = monkeypatch, first, last
        self.calls: list[str] = []

    def _trap(self, owner: object, name: str) -> None:
        real = getattr(owner, name)

        def trapped(*args, **kwargs):
            where = traceback.extract_stack(limit=2)[0]
            self.calls.append(f"{name} at {where.filename}:{where.lineno}")
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, trapped)

    def _arm(self) -> None:
        for name in SYNCING:
            self._trap(torch.Tensor, name)
        for name in SYNCING_FUNCTIONS:
            self._trap(torch, name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self._arm()
        elif batch_idx == self.last:
            self.monkeypatch.undo()

    def on_train_end(self, trainer, pl_module) -> None:
        self.monkeypatch.undo()


def test_training_steps_make_no_host_sync(monkeypatch) -> None:
    # The fast data path, so that fetching a batch counts too (the classic path's per-item
    # work runs on the CPU by design, before any copy to the device).
    trap = SyncTrap(monkeypatch)
    model = ImageClassifier(scheduler="warmup_cosine", label_smoothing=0.1)
    dm = SyntheticShapesDataModule(num_train=40, num_val=8, num_test=8, image_size=16,
                                   batch_size=8, data_path="fast")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, limit_train_batches=4,
                        limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=100, callbacks=[trap])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert trap.calls == [], "\n".join(trap.calls)


def test_warmup_factor_shapes() -> None:
    total, warm = 100, 10
    for decay in ("cosine", "linear"):
        f = [warmup_factor(s, total, warm, decay) for s in range(total)]
        assert f[0] == pytest.approx(1 / warm)
        assert all(b > a for a, b in pairwise(f[:warm]))  # rising
        assert f[warm - 1] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
        assert all(b < a for a, b in pairwise(f[warm - 1 :]))  # falling from the peak on
        assert 0 < f[-1] < 0.02
        middle = warm + (total - warm) // 2  # halfway through the decay
        assert f[middle] == pytest.approx(0.5, abs=0.02)
    quarter = warm + (total - warm) // 4
    assert warmup_factor(quarter, total, warm, "cosine") == pytest.approx(0.854, abs=0.02)
    assert warmup_factor(quarter, total, warm, "linear") == pytest.approx(0.75, abs=0.02)
    # No warm-up: the decay starts at the peak.
    assert warmup_factor(0, total, 0, "linear") == 1.0
    with pytest.raises(ValueError, match="decay"):
        warmup_factor(0, total, warm, "step")


class _FakeTrainer:
    """The two trainer facts configure_optimizers reads."""

    estimated_stepping_batches = 200
    max_epochs = 10


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear"])
def test_warmup_scheduler_lr_curve(name) -> None:
    model = ImageClassifier(scheduler=name, lr=0.4, warmup_fraction=0.05)
    model.trainer = _FakeTrainer()
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = max(range(200), key=lrs.__getitem__)
    assert peak == 9 and lrs[peak] == pytest.approx(0.4)  # 5% of 200 steps = 10 warm-up steps
    assert lrs[0] == pytest.approx(0.04)
    assert lrs[-1] < 0.01 and lrs == sorted(lrs[:10]) + sorted(lrs[10:], reverse=True)
    # Both parameter groups (with and without weight decay) follow the schedule.
    assert len({group["lr"] for group in opt.param_groups}) == 1
    with pytest.raises(ValueError, match="warmup_fraction"):
        ImageClassifier(scheduler=name, warmup_fraction=1.0)


def _compile_works() -> str | None:
    """Why torch.compile can not run here, or None when it can."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) * 2)
        fn(torch.randn(4))
    except Exception as err:  # no C compiler, unsupported Python, ...
        return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.slow
def test_monitor_explains_a_compiled_model(tmp_path) -> None:
    reason = _compile_works()
    if reason is not None:
        pytest.skip(f"torch.compile does not work here: {reason}")
    # The tiny backbone keeps a cold compile to seconds (ResNet-18's takes minutes on CPU).
    cfg = tiny_config(tmp_path, epochs=1, data={"data_path": "fast", "image_size": 16},
                      monitor={"methods": ["gradcam", "saliency"]},
                      backbone=register_tiny_backbone())
    cli = run_train(["fit", "--config", str(cfg), "--model.compile", "true"])
    model = cli.model
    # Training went through the compiled backbone; the module itself stays the plain one.
    compiled = model.compiled_backbone
    assert compiled is not None and compiled._orig_mod is model.backbone
    assert not any(name.startswith("_compiled") for name in model.state_dict())
    files = glob.glob(os.path.join(cli.trainer.log_dir, "explanations", "epoch_0000.pt"))
    assert files
    record = torch.load(files[0], weights_only=True)
    for method in ("gradcam", "saliency"):
        maps = record["maps"][method].float()
        assert maps.shape[:2] == (10, 10) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    # The explanation of the trained model equals that of an uncompiled copy of it.
    images = torch.randn(4, 3, 16, 16)
    args = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    eager = ImageClassifier(**{**args, "compile": False})
    eager.load_state_dict(model.state_dict())
    for layer in (None, "backbone.trunk.4"):  # the split, and a hooked layer by name
        got = explain.run(model, images, "gradcam", layer=layer)
        want = explain.run(eager, images, "gradcam", layer=layer)
        assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5), layer
