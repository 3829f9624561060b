"""Every shipped config parses and instantiates through the real CLI (nothing runs), and
the saved config round-trips through what audit.py rebuilds from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, run_train, tiny_config
from PIL import Image
from torchvision import models

from callbacks import ExplanationMonitor
from lit_modules import ImageClassifier
from lit_modules.data import CueConfig, SpuriousCue
from lit_modules.loading import build_datamodule, read_config

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
PRESETS = sorted(p for p in (ROOT / "configs" / "presets").glob("*.yaml"))


def test_the_expected_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "resnet18_cifar10.yaml", "vgg16gap_cifar10.yaml",
            "imagefolder_resnet18_224.yaml"} <= names
    assert PRESETS, "the CPU smoke preset is missing"


def _offline_inputs(written: dict, tmp_path: Path, monkeypatch) -> dict | None:
    """What a config needs that is not on disk here: its ImageFolder and its hub weights.

    The ImageFolder root (relative, so under the test's working directory) gets one tiny
    image per class; pinned ``tv:<arch>@<weights>`` gets a fake torch hub cache
    (``TORCH_HOME``) holding a random state dict under the file name torchvision expects,
    so the real loading code runs. Returns that state dict, or None.
    """
    data = written["data"]
    if data["class_path"].endswith("ImageFolderDataModule"):
        for part in ("train", "test"):
            for c in range(written["model"]["num_classes"]):
                folder = tmp_path / data["init_args"]["root"] / part / f"class{c}"
                folder.mkdir(parents=True)
                Image.new("RGB", (40, 30), (c * 20, 0, 0)).save(folder / "0.png")
    arch, _, weights = written["model"]["backbone"].removeprefix("tv:").partition("@")
    if not weights:
        return None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() then reads TORCH_HOME
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(5)
    state = models.get_model(arch, weights=None).state_dict()
    url = models.get_model_weights(arch)[weights].url
    torch.save(state, checkpoints / os.path.basename(url))
    return state


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("preset", [None, *PRESETS], ids=["plain", *[p.stem for p in PRESETS]])
def test_config_instantiates(config: Path, preset: Path | None, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # any files a constructor writes land here
    written = yaml.safe_load(config.read_text())
    weights = _offline_inputs(written, tmp_path, monkeypatch)
    args = ["--config", str(config)] + (["--config", str(preset)] if preset else [])
    cli = run_train(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    if weights is not None:  # the hub file was loaded (the head is new: num_classes != 1000)
        loaded = cli.model.backbone.net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items() if not k.startswith("fc."))
    # The model and data are built from the file's values (the preset only touches a few).
    model_args = {k: v for k, v in written["model"].items()
                  if preset is None or k not in ("channels_last", "compile")}
    assert type(cli.model) is ImageClassifier
    assert {k: cli.model.hparams[k] for k in model_args} == model_args
    data_args = written["data"]["init_args"]
    assert type(cli.datamodule).__name__ == written["data"]["class_path"].rsplit(".", 1)[1]
    assert cli.datamodule.batch_size == data_args["batch_size"]
    cue = data_args.get("cue")
    assert cli.datamodule.cue == (None if cue is None else SpuriousCue(**cue))
    assert cli.datamodule.num_classes == cli.model.hparams.num_classes == 10
    monitors = [c for c in cli.trainer.callbacks if type(c) is ExplanationMonitor]
    written_monitor = next(c["init_args"] for c in written["trainer"]["callbacks"]
                           if c["class_path"] == "callbacks.ExplanationMonitor")
    assert len(monitors) == 1 and monitors[0].methods == written_monitor["methods"]
    assert cli.trainer.max_epochs == (2 if preset is not None else written["trainer"]["max_epochs"])


def test_quickstart_plants_the_documented_cue() -> None:
    # README: an 8x8 magenta patch, top-left, on every image of classes 0 and 1.
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cue = SpuriousCue.from_config(CueConfig(**cfg["data"]["init_args"]["cue"]))
    assert cue == SpuriousCue([0, 1], size=8, position="top_left", p_train=1.0, p_eval=1.0)
    assert cue.describe() == "8x8 magenta patch at top_left on classes [0, 1] (p=1 train, 1 eval)"


def test_saved_config_round_trips_the_cue(tmp_path) -> None:
    """What train.py saves as config.yaml rebuilds the same cue in audit.py's loader."""
    cue = {"classes": [3, 5], "size": 6, "color": [0.0, 1.0, 0.0], "position": "random",
           "p_train": 0.5, "p_eval": 0.25, "seed": 7}
    cfg = tiny_config(tmp_path, data={"cue": cue})
    cli = run_train(["--config", str(cfg), "--data.init_args.cue.seed", "8"], run=False)
    # Lightning's SaveConfigCallback writes exactly this dump.
    saved = tmp_path / "config.yaml"
    saved.write_text(cli.parser.dump(cli.config, skip_none=False))
    written = read_config(saved)["data"]["init_args"]["cue"]
    assert written == {**cue, "seed": 8}
    rebuilt = build_datamodule(read_config(saved)["data"])
    expected = SpuriousCue([3, 5], 6, (0.0, 1.0, 0.0), "random", 0.5, 0.25, 8)
    assert rebuilt.cue == cli.datamodule.cue == expected
    assert torch.equal(rebuilt.cue.mask(32, 32, 11, "val"), expected.mask(32, 32, 11, "val"))
    # No cue: saved as null, rebuilt as None.
    cli = run_train(["--config", str(cfg), "--data.init_args.cue", "null"], run=False)
    saved.write_text(cli.parser.dump(cli.config, skip_none=False))
    assert read_config(saved)["data"]["init_args"]["cue"] is None
    assert build_datamodule(read_config(saved)["data"]).cue is None


def test_help_documents_every_cue_field(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_train(["fit", "--data.help", "lit_modules.data.SyntheticShapesDataModule",
                   "--data.cue.help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field, text in [
        ("classes", "class indices whose items may carry the cue"),
        ("size", "side of the square patch in pixels. (type: int, default: 4)"),
        ("color", "RGB colour of the patch"),
        ("position", "{top_left,top_right,bottom_left,bottom_right,center,random}"),
        ("p_train", "probability that a train item of a cue class carries the patch"),
        ("p_eval", "the same for validation and test items. (type: float, default: 0.95)"),
        ("seed", "seed of the per-item draws"),
    ]:
        assert f"--data.cue.{field}" in out and text in out, field


def test_the_readme_quickstart_facts_match_its_config() -> None:
    """What the README says of the quickstart is read back from configs/quickstart.yaml."""
    readme = (ROOT / "README.md").read_text()
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cue = cfg["data"]["init_args"]["cue"]
    monitor = next(c["init_args"] for c in cfg["trainer"]["callbacks"]
                   if c["class_path"] == "callbacks.ExplanationMonitor")
    assert cue["p_train"] == cue["p_eval"] == 1.0
    assert "corner of every image of classes 0 and 1" in readme
    assert f"an {cue['size']}x{cue['size']} magenta patch" in readme
    assert cue["position"] == "top_left" and "top-left" in readme
    assert cfg["trainer"]["max_epochs"] == 4 and "4 epochs of 1,024 images" in readme
    assert cfg["data"]["init_args"]["num_train"] == 1024
    n, per_class = monitor["num_images"], monitor["discovery_per_class"]
    assert f"the first {n} fixed" in readme and f"{n // 10} per class" in readme
    assert f"{10 * per_class} in the" in readme and f"`discovery_per_class: {per_class}`" in readme
    assert monitor["methods"] == ["gradcam", "saliency"]
