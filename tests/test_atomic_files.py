"""Files are replaced atomically: a crash mid-write leaves the old file and no debris."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import run_train, tiny_config

from callbacks import AtomicCheckpointIO
from explain import records
from explain.records import atomic_save, atomic_write_bytes


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


def test_bytes_are_fsynced_before_the_rename_and_a_failed_write_leaves_no_debris(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "report" / "metrics.json"
    atomic_write_bytes(path, b"old")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(path, b"new")
    # The data reaches the disk before the name points at it, then the rename itself.
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert path.read_bytes() == b"new"

    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(path, b"lost")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_written_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_save({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o640
    assert records._umask() == old  # reading the umask did not change it


def test_train_py_writes_checkpoints_atomically(tmp_path: Path) -> None:
    cli = run_train(["--config", str(tiny_config(tmp_path))], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
