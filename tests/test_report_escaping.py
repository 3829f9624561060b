"""Class names are data: a report built for hostile ones shows them as text, never as markup.

Three ImageFolder classes of noise, named as an attacker would name them; the first carries
a bright patch in every image, so the model learns it and the audit confirms a shortcut,
which puts the class name into the shortcut section's headings, tables and captions.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import register_tiny_backbone, run_train, tiny_config
from PIL import Image

import audit

HOSTILE = ["<img src=x onerror=alert(1)>", "<script>alert(2)<", 'a & "b"']


def _folders(root: Path, per_class: int, test_per_class: int) -> None:
    rng = np.random.default_rng(0)
    for part, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(HOSTILE):
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if c == 0:  # the shortcut: a white 8x8 patch in the top-left corner
                    pixels[:8, :8] = 255
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_hostile_class_names_reach_the_report_only_as_text(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _folders(root, per_class=40, test_per_class=12)
    cfg_path = tiny_config(tmp_path, epochs=10, backbone=register_tiny_backbone(),
                           model={"num_classes": 3, "lr": 0.003, "optimizer": "adamw"},
                           monitor={"num_images": 6, "methods": ["saliency"]},
                           trainer_args={"limit_train_batches": 1.0})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"] = {"class_path": "lit_modules.data.ImageFolderDataModule", "init_args": {
        "root": str(root), "image_size": 32, "val_size": 12, "batch_size": 16,
        "num_workers": 0}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli = run_train(["fit", "--config", str(cfg_path)])
    out = tmp_path / "report"
    audit.main(["--ckpt", cli.trainer.checkpoint_callback.last_model_path, "--out", str(out),
                "--progress", "false", "--num_images", "6", "--sanity_images", "2",
                "--steps", "4", "--counterfactual_images", "6", "--discovery_images", "12",
                "--methods", "[gradcam, saliency]"])
    metrics = json.loads((out / "metrics.json").read_text())
    found = metrics["models"][0]["shortcuts"]["suspects"]
    # The path under test: a confirmed shortcut puts the hostile name in every place the
    # shortcut section can show it (heading, table, finding, figure caption).
    assert [s["class"] for s in found if s["confirmed"]] == [HOSTILE[0]], found
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "<script>alert" not in page and 'a & "b"' not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # shown, as text
    assert re.search(r"<figcaption>[^<]*<b>Figure \d+\.</b>[^<]*&lt;img src=x", page)
    # Figure files are named without the class name's characters.
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", p.name) for p in out.rglob("*.png"))
    # The verdict: in metrics.json (valid against the shipped schema), in the banner at the
    # top of the page, and behind --fail_on_findings's exit status.
    validate_metrics(metrics)
    verdict = metrics["verdict"]
    assert verdict["status"] == "findings" and verdict["confirmed_shortcuts"] == 1
    (record,) = [f for f in metrics["findings"] if f["kind"] == "shortcut"]
    assert record["class"] == HOSTILE[0] and record["severity"] == "high"
    assert record["numbers"]["flip_rate"] == found[0]["flip_rate"]
    banner = page.index('<div class="verdict bad">')
    assert banner < page.index('<section id=') and "1 confirmed shortcut(s)" in page[banner:]
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", cli.trainer.checkpoint_callback.last_model_path, "--out",
                    str(out), "--progress", "false", "--num_images", "6", "--sanity_images",
                    "2", "--steps", "4", "--counterfactual_images", "6",
                    "--discovery_images", "12", "--methods", "[gradcam, saliency]",
                    "--fail_on_findings", "true"])
    assert exc.value.code == 3


def validate_metrics(metrics: dict) -> None:
    """``metrics`` against the JSON Schema shipped in the package."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(files("audit_report").joinpath("metrics.schema.json").read_text())
    jsonschema.validate(metrics, schema)
