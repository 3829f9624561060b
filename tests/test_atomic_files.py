"""Files are replaced atomically: a crash mid-write leaves the old file and no debris."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_train, tiny_config

from callbacks import AtomicCheckpointIO, atomic_save


def _crash_midway(obj, f, *args, **kwargs) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise KeyboardInterrupt  # as if killed while writing


@pytest.mark.parametrize("writer", ["atomic_save", "checkpoint_io"])
def test_a_crash_mid_write_keeps_the_previous_file(tmp_path: Path, monkeypatch, writer) -> None:
    path = tmp_path / "run" / "last.ckpt"
    save = (atomic_save if writer == "atomic_save"
            else lambda obj, p: AtomicCheckpointIO().save_checkpoint(obj, p))
    save({"step": torch.tensor(1)}, str(path))
    monkeypatch.setattr(torch, "save", _crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save({"step": torch.tensor(2)}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file


def test_train_py_writes_checkpoints_atomically(tmp_path: Path) -> None:
    cli = run_train(["--config", str(tiny_config(tmp_path))], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
