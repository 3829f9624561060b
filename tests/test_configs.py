"""Every shipped config parses and instantiates through the real CLI (nothing runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, run_train

from callbacks import ExplanationMonitor
from lit_modules import ImageClassifier

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
PRESETS = sorted(p for p in (ROOT / "configs" / "presets").glob("*.yaml"))


def test_the_expected_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "resnet18_cifar10.yaml", "vgg16gap_cifar10.yaml"} <= names
    assert PRESETS, "the CPU smoke preset is missing"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("preset", [None, *PRESETS], ids=["plain", *[p.stem for p in PRESETS]])
def test_config_instantiates(config: Path, preset: Path | None, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # any files a constructor writes land here
    args = ["--config", str(config)] + (["--config", str(preset)] if preset else [])
    cli = run_train(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, ImageClassifier)
    assert cli.datamodule.num_classes == cli.model.hparams.num_classes == 10
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert len(monitors) == 1 and monitors[0].methods
    if preset is not None:
        assert cli.trainer.max_epochs == 2


