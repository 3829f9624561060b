"""Two-process DDP on CPU (gloo) with the explanation monitor attached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config, train_subprocess
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import explain
from lit_modules import ImageClassifier
from lit_modules.data import SyntheticShapesDataModule

EPOCHS = 2
MONITORED = "explain/gradcam/cue_energy/biased"


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_one_writer_and_rank_zero_maps(tmp_path: Path) -> None:
    # The fast data path: its per-rank sharding is this project's code, not Lightning's.
    # A ModelCheckpoint on a monitor score runs on both ranks: rank 1 must see the key too.
    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "monitor": MONITORED, "mode": "max", "save_top_k": 1, "filename": "best"}}
    cfg = tiny_config(tmp_path, epochs=EPOCHS, monitor={"methods": ["gradcam", "saliency"]},
                      data={"data_path": "fast"}, callbacks=[best])
    done = train_subprocess(["fit", "--config", str(cfg), "--trainer.strategy", "ddp",
                             "--trainer.devices", "2"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size: 2" in done.stderr or "Initializing distributed" in done.stderr

    runs = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]  # one run directory
    run = runs / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    for method in ("gradcam", "saliency"):
        steps = [e.step for e in acc.Images(f"explain/{method}/grid")]
        assert len(steps) == EPOCHS and len(set(steps)) == EPOCHS  # one grid per epoch

    # The last epoch's saved maps are those of the final weights (rank zero's model),
    # recomputed here in a single process from the checkpoint written after that epoch.
    record = torch.load(run / "explanations" / f"epoch_{EPOCHS - 1:04d}.pt", weights_only=True)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1
    model = ImageClassifier(backbone="resnet18_cifar")
    model.load_state_dict(state["state_dict"])
    dm = SyntheticShapesDataModule(num_train=64, num_val=40, num_test=40, batch_size=16, seed=0,
                                   cue={"classes": [0, 1], "p_train": 1.0, "p_eval": 1.0})
    images = torch.stack([dm.dataset("val")[i]["image"] for i in record["indices"].tolist()])
    for method in ("gradcam", "saliency"):
        saved = record["maps"][method].float()
        fresh = explain.run(model, images, method)
        scale = fresh.abs().amax().clamp_min(1e-12)
        assert ((saved - fresh).abs().amax() / scale) < 2e-3, method  # fp16 storage
    # The best checkpoint holds the epoch whose logged (rank zero's) score was highest.
    logged = [e.value for e in acc.Scalars(MONITORED)]
    assert len(logged) == EPOCHS
    best_state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best_state["epoch"] == logged.index(max(logged))
    best_cb = next(v for k, v in best_state["callbacks"].items() if MONITORED in k)
    assert float(best_cb["best_model_score"]) == pytest.approx(max(logged), rel=1e-6)
    # Rank zero's broadcast values are logged unsynced on purpose: no advice to sync them.
    assert "recommended to use `self.log('explain/" not in done.stderr
    # Both ranks would have picked the same images: they are a function of (labels, seed).
    monitor_state = next(v for k, v in state["callbacks"].items() if "ExplanationMonitor" in k)
    assert monitor_state["indices"] == record["indices"].tolist()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_run_terminated_mid_epoch_resumes_from_last(tmp_path: Path) -> None:
    kill = {"class_path": "helpers.KillAt", "init_args": {
        "epoch": 1, "batch": 0, "marker": str(tmp_path / "killed"), "signal": "SIGTERM"}}
    cfg = tiny_config(tmp_path, epochs=3, data={"data_path": "fast"}, callbacks=[kill],
                      trainer_args={"limit_train_batches": 4})
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    # Lightning's launcher forwards the SIGTERM to rank 1 and the endings race: rank 1
    # dies before the collective interrupt save (exit 1), or both save and exit (143), or,
    # often when stdout is a pipe, a rank hangs after the save (Lightning broadcasts from
    # inside its signal handler). A scheduler SIGKILLs a job that outlives its grace
    # period; so does this test. Every ending must resume.
    first = train_subprocess(["fit", "--config", str(cfg), *ddp], grace=90)
    assert first.returncode != 0 and (tmp_path / "killed").exists()
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    if (run / "checkpoints" / "interrupted.ckpt").exists():
        saved = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
        assert (saved["epoch"], saved["global_step"]) == (1, 3)
    second = train_subprocess(["fit", "--config", str(cfg), *ddp, "--ckpt_path", "last"],
                              timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("Resuming from") == 1  # said once, not once per process
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == 2
    maps = sorted(p.name for p in (run / "explanations").glob("epoch_*.pt"))
    assert maps == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_refit_gathers_both_ranks_rows_and_moves_only_the_head(tmp_path: Path) -> None:
    """The ``refit`` counter-measure under DDP: the gather of each rank's head inputs (two
    collectives every rank must join) completes, and no weight but the head's moves from
    ``init_weights``."""
    from lit_modules.shortcut_projection import last_linear

    torch.manual_seed(0)
    start = ImageClassifier(backbone="resnet18_cifar")
    init = tmp_path / "init.ckpt"
    torch.save({"state_dict": start.state_dict()}, init)
    removal = {"shortcuts": [{"class_index": 0, "box": [0, 0, 8, 8]}], "method": "refit"}
    cfg = tiny_config(tmp_path, epochs=1, data={"data_path": "fast"},
                      model={"init_weights": str(init), "shortcut_removal": removal})
    done = train_subprocess(["fit", "--config", str(cfg), "--trainer.strategy", "ddp",
                             "--trainer.devices", "2"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=True)["state_dict"]
    before = start.state_dict()
    moved = {k for k in before if not torch.equal(before[k], saved[k])}
    head, _ = last_linear(start)
    assert moved == {f"{head}.weight", f"{head}.bias"}
