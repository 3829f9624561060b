"""Crashes and resumes: SIGKILL and SIGTERM mid-epoch, then ``fit --ckpt_path last``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CreatesFile, run_train, tiny_config, train_subprocess
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from explain.measures import map_scores as metrics

EPOCHS, BATCHES = 4, 4


def _config(tmp_path: Path, signal: str | None, name: str = "tiny", batch: int = 1) -> Path:
    kill = [{"class_path": "helpers.KillAt", "init_args": {
        "epoch": 2, "batch": batch, "marker": str(tmp_path / "killed"), "signal": signal}}]
    return tiny_config(
        tmp_path, epochs=EPOCHS, name=name, trainer_args={"limit_train_batches": BATCHES},
        model={"optimizer": "adamw", "scheduler": "onecycle"}, callbacks=kill if signal else None,
    )


def _events(run_dir: Path) -> dict[str, list[int]]:
    """Steps of every scalar and image tag, as TensorBoard's own reader resolves them."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = {t: [e.step for e in acc.Scalars(t)] for t in tags["scalars"]}
    steps.update({t: [e.step for e in acc.Images(t)] for t in tags["images"]})
    return steps


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _counters(ckpt: Path) -> dict[str, object]:
    state = torch.load(ckpt, weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    return {
        "epoch": state["epoch"],
        "global_step": state["global_step"],
        "adam_steps": adam_steps,
        "sched_steps": state["lr_schedulers"][0]["last_epoch"],
        "lr": state["lr_schedulers"][0]["_last_lr"],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same configuration: its run directory."""
    tmp = tmp_path_factory.mktemp("reference")
    cli = run_train(["fit", "--config", str(_config(tmp, None))])
    return Path(cli.trainer.log_dir)


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "batch"), [
    ("SIGKILL", 1),
    ("SIGTERM", 1),
    ("SIGTERM", BATCHES - 1),  # after the epoch's last batch, before its validation
])
def test_killed_mid_epoch_resumes_where_it_stopped(
    tmp_path: Path, reference: Path, signal: str, batch: int
) -> None:
    cfg = _config(tmp_path, signal, batch=batch)
    first = train_subprocess(["fit", "--config", str(cfg)])
    assert (tmp_path / "killed").exists(), first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    ckpts = run_dir / "checkpoints"
    if signal == "SIGKILL":
        assert first.returncode == -9
        assert not (ckpts / "interrupted.ckpt").exists()  # nothing could be saved
        assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1
    elif batch == BATCHES - 1:  # no interrupt checkpoint: it would skip that validation
        assert first.returncode == 143, first.stderr[-2000:]
        assert "not saving" in first.stderr
        assert not (ckpts / "interrupted.ckpt").exists()
        assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1
    else:  # SIGTERM: a checkpoint at the batch boundary, and a non-zero exit status
        assert first.returncode == 143, first.stderr[-2000:]
        saved = torch.load(ckpts / "interrupted.ckpt", weights_only=True)
        assert (saved["epoch"], saved["global_step"]) == (2, 2 * BATCHES + 2)
    maps_dir = run_dir / "explanations"
    before = {p.name: _digest(p) for p in maps_dir.glob("*.pt")}
    assert {"epoch_0000.pt", "epoch_0001.pt", "fixed_images.pt"} <= set(before)

    second = train_subprocess(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stderr
    # Same run directory: no version_1, and the interrupt file is cleaned up.
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert not (ckpts / "interrupted.ckpt").exists()

    # Epoch, step, optimiser and LR schedule continue: the counters of the finished run
    # equal those of the uninterrupted one, and so do its weights, bit for bit (the data
    # and the global RNGs are functions of the position: test_resume_reproducible.py).
    assert _counters(ckpts / "last.ckpt") == _counters(reference / "checkpoints" / "last.ckpt")
    got_w, want_w = (torch.load(p / "last.ckpt", weights_only=True)["state_dict"]
                     for p in (ckpts, reference / "checkpoints"))
    assert got_w.keys() == want_w.keys()
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)

    # Earlier maps intact, every epoch's maps readable, same fixed images throughout.
    after = {p.name: _digest(p) for p in maps_dir.glob("*.pt")}
    for name in ("epoch_0000.pt", "epoch_0001.pt", "fixed_images.pt"):
        assert after[name] == before[name], name
    records = [torch.load(maps_dir / f"epoch_{e:04d}.pt", weights_only=True) for e in range(EPOCHS)]
    fixed = torch.load(maps_dir / "fixed_images.pt", weights_only=True)
    for e, rec in enumerate(records):
        assert rec["epoch"] == e and torch.equal(rec["indices"], fixed["indices"])
    # Drift after the resume is measured against the last epoch saved before the kill.
    m1, m2 = records[1]["maps"]["gradcam"].float(), records[2]["maps"]["gradcam"].float()
    expected = metrics.nanmean(metrics.drift(m2.flatten(0, 1), m1.flatten(0, 1)))
    assert records[2]["scalars"]["gradcam"]["drift"] == pytest.approx(expected, abs=1e-3)

    # TensorBoard sees the same steps for every tag as in the uninterrupted run: the lost
    # steps of the killed epoch are purged, the resumed ones appear once.
    got, want = _events(run_dir), _events(reference)
    assert set(got) == set(want)
    for tag in want:
        assert got[tag] == want[tag], tag
    assert got["explain/gradcam/grid"] == got["val/acc"] == [
        (e + 1) * BATCHES - 1 for e in range(EPOCHS)
    ]


def test_ckpt_path_last_without_a_checkpoint_fails_clearly(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, None)
    with pytest.raises(SystemExit) as exc:
        run_train(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and str(tmp_path / "runs" / "tiny") in err
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing was started


def test_ckpt_path_to_a_missing_file_fails_clearly(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_train(["fit", "--config", str(_config(tmp_path, None)), "--ckpt_path",
                   str(tmp_path / "nope.ckpt")])
    assert "nope.ckpt" in capsys.readouterr().err


def test_resume_from_a_crafted_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "x": CreatesFile(target)}, evil)
    with pytest.raises(SystemExit) as exc:
        run_train(["fit", "--config", str(_config(tmp_path, None)), "--ckpt_path", str(evil)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "refused" in err and "nothing in it was executed" in err and str(evil) in err
    assert not target.exists()


def test_resume_with_lightnings_default_logger_stays_in_its_run(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, epochs=1)
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["trainer"]["logger"]  # Lightning's default: <default_root_dir>/lightning_logs
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_train(["fit", "--config", str(cfg_path)])
    cli = run_train(["fit", "--config", str(cfg_path), "--trainer.max_epochs", "2",
                     "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2
    runs = tmp_path / "runs" / "lightning_logs"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]
    assert len(list((runs / "version_0" / "explanations").glob("epoch_*.pt"))) == 2
