"""A killed and resumed fit ends with the weights of the uninterrupted one, bit for bit.

Every random draw of training is a function of the run's seeds and its position: each
epoch's order and each item's crop and flip from ``(seed, epoch, index)`` (both data paths,
with or without worker processes: ``lit_modules/data/classic.py``, ``fast.py``), the global
RNGs from ``(seed, epoch, batch)`` (``callbacks.ExactResume``), and a mid-epoch checkpoint
holds the loader's position in its epoch. The two paths and the worker count serve the
same batches, so one uninterrupted run (classic, no workers) is the reference for all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import register_tiny_backbone, run_train, tiny_config, train_subprocess

EPOCHS, BATCHES = 3, 4
DATA = {
    "classic": {"data_path": "classic", "num_workers": 0},
    "fast": {"data_path": "fast"},
    "classic_workers": {"data_path": "classic", "num_workers": 2},
}


def _config(tmp_path: Path, data: str, signal: str | None) -> Path:
    kill = [{"class_path": "helpers.KillAt", "init_args": {
        "epoch": 1, "batch": 1, "marker": str(tmp_path / "killed"), "signal": signal,
        "wait": 0.0 if signal == "SIGTERM" else 5.0}}]  # SIGTERM: acted on at the next batch
    return tiny_config(
        tmp_path, epochs=EPOCHS, backbone=register_tiny_backbone(), data=DATA[data],
        trainer_args={"limit_train_batches": BATCHES},
        model={"optimizer": "adamw", "scheduler": "onecycle"},
        callbacks=kill if signal else None,
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[k].double()).abs().max().item() for k, x in a.items())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted run on the classic path without workers."""
    tmp = tmp_path_factory.mktemp("reference")
    cli = run_train(["fit", "--config", str(_config(tmp, "classic", None))])
    return _weights(Path(cli.trainer.log_dir))


# Each case kills a child process that pays ~10 s of imports: the README's test command
# keeps the two that cover both resume points on the default path; CI runs the rest (slow).
@pytest.mark.parametrize(("data", "signal"), [
    ("classic", "SIGKILL"),  # resumes from epoch 0's last.ckpt
    ("classic", "SIGTERM"),  # resumes from interrupted.ckpt, mid-epoch 1
    pytest.param("fast", "SIGKILL", marks=pytest.mark.slow),
    pytest.param("fast", "SIGTERM", marks=pytest.mark.slow),
    pytest.param("classic_workers", "SIGTERM", marks=pytest.mark.slow),
])
def test_resumed_run_ends_with_the_uninterrupted_weights(
    tmp_path: Path, reference: dict[str, torch.Tensor], data: str, signal: str
) -> None:
    cfg = _config(tmp_path, data, signal)
    first = train_subprocess(["fit", "--config", str(cfg)], script="tests/train_tiny.py")
    assert (tmp_path / "killed").exists(), first.stderr[-3000:]
    ckpts = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    if signal == "SIGKILL":
        assert first.returncode == -9
        assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 0
    else:
        assert first.returncode == 143, first.stderr[-3000:]
        saved = torch.load(ckpts / "interrupted.ckpt", weights_only=True)
        assert (saved["epoch"], saved["global_step"]) == (1, BATCHES + 2)

    cli = run_train(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == EPOCHS
    difference = max_abs_difference(_weights(ckpts.parent), reference)
    assert difference == 0.0, f"max abs weight difference {difference}"
