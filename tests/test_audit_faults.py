"""Faults found by probing the audit: each must end in one clear line or a clean recompute.

A tampered cache entry, a garbage figure in the cache, an unwritable --out, what a killed
audit leaves behind, a too-large --num_images in the estimate, an empty or a text file
given as a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import register_tiny_backbone, run_train, tiny_config

import audit
import audit_report.run
from audit_report.cache import ResultCache
from lit_modules.loading import CheckpointError, load_checkpoint

FAST = ["--progress", "false", "--num_images", "6", "--sanity_images", "2", "--steps", "4",
        "--counterfactual_images", "2", "--discovery_images", "3", "--methods", "[gradcam]"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    cfg = tiny_config(tmp, epochs=1, backbone=register_tiny_backbone())
    cli = run_train(["fit", "--config", str(cfg)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def _run(ckpt: Path, out: Path, *extra: str) -> dict:
    audit.main(["--ckpt", str(ckpt), "--out", str(out), *FAST, *extra])
    return json.loads((out / "metrics.json").read_text())


def test_a_cache_entry_without_its_fields_is_a_miss_with_one_warning(tiny_ckpt: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "report"
    first = _run(tiny_ckpt, out)
    from test_report_escaping import validate_metrics

    validate_metrics(first)  # a second real output against the shipped schema
    entries = sorted((out / "cache").glob("explanations-*.pt"))
    assert entries
    for entry in entries:
        torch.save({"foo": 1}, entry)  # loads fine, holds nothing the audit stored
    png = next(p for p in (out / "cache").glob("figure-*.png"))
    png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a figure overwritten with garbage
    with pytest.warns(UserWarning, match=r"audit cache: ignoring '.*explanations-.*\.pt'"):
        again = _run(tiny_ckpt, out)
    assert again["models"][0]["summary"] == first["models"][0]["summary"]
    # The new report carries freshly computed entries and a redrawn, verified figure.
    fresh = torch.load(sorted((out / "cache").glob("explanations-*.pt"))[0], weights_only=True)
    assert all(torch.is_tensor(v) for v in fresh["value"]["maps"].values())
    import hashlib

    for figure in (out / "cache").glob("figure-*.png"):  # every cached figure is verified
        side = figure.with_name(figure.name + ".sha256").read_text()
        assert side == hashlib.sha256(figure.read_bytes()).hexdigest()
        assert b"garbage" not in figure.read_bytes()


def test_cached_bytes_are_checked_against_their_digest(tmp_path: Path) -> None:
    cache = ResultCache(None, tmp_path)
    cache.put_bytes("figure", {"a": 1}, ".png", b"real bytes")
    assert cache.get_bytes("figure", {"a": 1}, ".png") == b"real bytes"
    path = next(tmp_path.glob("cache/figure-*.png"))
    path.write_bytes(b"tampered")
    with pytest.warns(UserWarning, match="not the entry stored under this name"):
        assert cache.get_bytes("figure", {"a": 1}, ".png") is None


def test_an_out_that_cannot_be_written_is_one_error_line(tiny_ckpt: Path, tmp_path: Path,
                                                         capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # read and enter, no writing
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root without caps?)")
        with pytest.raises(SystemExit) as exc:
            audit.main(["--ckpt", str(tiny_ckpt), "--out", str(locked / "report"), *FAST])
    finally:
        locked.chmod(0o700)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("audit.py: error:") and str(locked) in err[0]


def test_a_file_as_out_parent_is_one_error_line(tiny_ckpt: Path, tmp_path: Path,
                                               capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", str(tiny_ckpt), "--out", str(blocker / "report"), *FAST])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(blocker) in err


def test_what_a_killed_audit_left_is_removed_by_the_next(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    stale = [tmp_path / ".report.tmp-abc123", tmp_path / ".report.old-999"]
    for folder in stale:
        folder.mkdir()
        (folder / "report.html").write_text("half")
    other = tmp_path / ".other.tmp-xyz"  # another report's: not ours to remove
    other.mkdir()
    _run(tiny_ckpt, out)
    assert not any(p.exists() for p in stale) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "report"]


def test_the_estimate_counts_the_images_actually_sampled(tiny_ckpt: Path, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    said = []
    monkeypatch.setattr(audit_report.run, "say", said.append)
    args = ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "r"), *FAST]
    audit.main(args)
    small = float(said[0].split("estimated ")[1].split(" s")[0])
    said.clear()
    audit.main([*args, "--num_images", "100000"])  # the 40-image split is all there is
    huge = float(said[0].split("estimated ")[1].split(" s")[0])
    assert "on 40 test images" in said[0]
    assert huge < 20 * max(small, 1.0), (small, huge)


def test_an_empty_or_text_checkpoint_is_named_for_what_it_is(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_checkpoint(empty)
    text = tmp_path / "notes.ckpt"
    text.write_text("model: resnet18\nepochs: 4\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as exc:
        load_checkpoint(text)
    assert "weights_only=False" not in str(exc.value)
    with pytest.raises(SystemExit) as stop:
        audit.main(["--ckpt", str(text), "--out", str(tmp_path / "out"), "--progress", "false"])
    assert stop.value.code == 1
    assert "weights_only=False" not in capsys.readouterr().err
