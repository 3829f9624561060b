"""audit.py's command line, generated from AuditSettings: every field once in --help, no
abbreviations, --device and --layer, the monitor's layer from the training config, and the
exit status table shared with train.py."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import register_tiny_backbone, run_train, tiny_config

import audit
import audit_report.run
from audit_report import AuditSettings
from audit_report.settings import method_options, monitor_layer, resolve_device
from lit_modules.exit_status import EXIT_STATUS

OPTIONS = [f.name for f in dataclasses.fields(AuditSettings) if f.name not in audit.NOT_OPTIONS]


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_setting_once_with_its_docstring(capsys) -> None:
    text = _help(capsys)
    listed = text[text.index("\noptions:"):]  # the option list, not the usage line
    described = audit.field_help()
    for name in OPTIONS:
        assert len(re.findall(rf"^\s+--{name}\b", listed, re.MULTILINE)) == 1, name
        first_words = " ".join(described[name].split()[:4])
        assert first_words in " ".join(listed.split()), (name, first_words)
    # Every option of the parser is a field (or the config file and help options).
    flags = {opt for action in audit.build_parser()._actions for opt in action.option_strings
             if not opt.endswith("+")}
    assert flags == {f"--{n}" for n in OPTIONS} | {"-h", "--help", "--config", "--print_config"}
    # Grouped: the groups' titles in --help, in order.
    titles = [text.index(f"\n{title}:") for title in audit.GROUPS]
    assert titles == sorted(titles)


def test_the_defaults_are_the_dataclass_defaults() -> None:
    parsed = audit.parse_args(["--ckpt", "x.ckpt"])
    plain = AuditSettings(ckpt=["x.ckpt"])
    for name in OPTIONS:
        if name not in ("ckpt", "command"):
            assert getattr(parsed, name) == getattr(plain, name), name


@pytest.mark.parametrize("argv", [["--num_im", "5"], ["--fail_on", "true"], ["--dev", "cpu"]])
def test_an_abbreviation_is_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", "x.ckpt", *argv])
    assert exc.value.code == 2
    assert f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err


def test_the_dashed_trust_module_names_the_underscored_one(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", "x.ckpt", "--trust-module", "mypkg"])
    assert exc.value.code == 2
    assert "--trust_module NAME" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "cuda:12", "mps"])
def test_device_choices_parse(device: str) -> None:
    assert audit.parse_args(["--ckpt", "x.ckpt", "--device", device]).device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "gpu", "CPU"])
def test_another_device_is_refused_naming_the_choices(device: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", "x.ckpt", "--device", device])
    assert exc.value.code == 2
    assert "auto|cpu|cuda|cuda:N|mps" in capsys.readouterr().err


def test_resolve_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"cuda:3 was asked for, but torch sees 2 CUDA "
                                         r"device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:3")
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no MPS device"):
        resolve_device("mps")


def test_a_device_torch_cannot_see_is_a_failure_not_a_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:  # before any checkpoint is opened
        audit.main(["--ckpt", "missing.ckpt", "--device", "cuda:1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["audit.py: error: device cuda:1 was asked for, but torch sees no CUDA "
                   "device"]


def test_layer_reaches_the_settings_and_the_methods() -> None:
    settings = audit.parse_args(["--ckpt", "x.ckpt", "--layer", "backbone.trunk.3",
                                 "--methods", "[gradcam, saliency]"])
    assert settings.layer == "backbone.trunk.3"
    assert method_options("gradcam", settings)["layer"] == "backbone.trunk.3"
    assert "layer" not in method_options("saliency", settings)  # no layer to take
    assert audit.parse_args(["--ckpt", "x.ckpt"]).layer is None


TRAIN_CONFIG = """
trainer:
  max_epochs: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {logging_interval: epoch}
    - class_path: callbacks.ExplanationMonitor
      init_args:
        methods: [gradcam]
        layer: features.7
model:
  backbone: vgg16_gap
"""


def test_the_monitor_layer_is_read_from_a_training_config() -> None:
    config = yaml.safe_load(TRAIN_CONFIG)
    assert monitor_layer(config) == "features.7"
    monitor = config["trainer"]["callbacks"][1]
    monitor["class_path"] = "callbacks.monitor.ExplanationMonitor"  # the full module path
    assert monitor_layer(config) == "features.7"
    config["trainer"]["callbacks"] = monitor  # one callback, not a list
    assert monitor_layer(config) == "features.7"
    del monitor["init_args"]["layer"]  # the monitor takes the model's declared layer
    assert monitor_layer(config) is None
    assert monitor_layer({"trainer": {"callbacks": None}, "model": {}}) is None
    assert monitor_layer({"model": {}}) is None
    assert monitor_layer({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"layer": "nope"}}]}}) is None


class _Run:
    def __init__(self, layer: str | None) -> None:
        monitor = {"class_path": "callbacks.ExplanationMonitor",
                   "init_args": {"layer": layer} if layer else {}}
        self.config = {"trainer": {"callbacks": [monitor]}}
        self.log_dir = Path("/tmp/run")


@pytest.mark.parametrize(("given", "monitors", "used"), [
    (None, ["features.7"], "features.7"),  # the monitor's layer
    ("features.3", ["features.7"], "features.3"),  # --layer wins
    (None, [None], None),  # no layer in the config: the model's declared one
    (None, ["features.7", "features.7"], "features.7"),  # two models that agree
    (None, ["features.7", "backbone.layer4"], None),  # or not: each its declared one
])
def test_run_audit_takes_the_monitor_layer(monkeypatch, given, monitors, used) -> None:
    runs = iter([_Run(layer) for layer in monitors])
    monkeypatch.setattr(audit_report.run, "load_run", lambda *a, **k: next(runs))
    seen: list[AuditSettings] = []
    monkeypatch.setattr(audit_report.run, "audit_runs",
                        lambda settings, *a, **k: seen.append(settings))
    audit_report.run.run_audit(AuditSettings(ckpt=[f"{i}.ckpt" for i in range(len(monitors))],
                                             layer=given, device="cpu"))
    assert seen[0].layer == used


def test_an_audit_uses_the_layer_its_training_run_explained(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, backbone=register_tiny_backbone(),
                      monitor={"layer": "backbone.trunk.3"})
    cli = run_train(["fit", "--config", str(cfg)])
    out = tmp_path / "report"
    audit.main(["--ckpt", cli.trainer.checkpoint_callback.last_model_path, "--out", str(out),
                "--progress", "false", "--num_images", "4", "--sanity_images", "1",
                "--steps", "2", "--counterfactual_images", "2", "--discovery_images", "2",
                "--methods", "[gradcam]", "--cache", "false"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["method_options"]["gradcam"]["layer"] == "backbone.trunk.3"


def test_both_clis_end_their_help_with_the_exit_status_table(monkeypatch, capsys) -> None:
    import train

    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI reads it beside args
    texts = [_help(capsys)]
    for argv in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit) as exc:
            train.main(argv)
        assert exc.value.code == 0
        texts.append(capsys.readouterr().out)
    for text in texts:
        table = " ".join(text[text.index("exit status:"):].split())
        for status, meaning in EXIT_STATUS.items():
            assert f"{status} {' '.join(meaning.split())}" in table
    assert sorted(EXIT_STATUS) == [0, 1, 2, 3]
    assert (audit.FAILURE_EXIT_STATUS, audit.FLAGGED_EXIT_STATUS) == (1, 3)


def test_train_refuses_a_misspelled_option_with_status_2(monkeypatch, capsys) -> None:
    import train

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exc:
        train.main(["fit", "--model.lrr", "0.1"])
    assert exc.value.code == 2
    assert "--model.lrr" in capsys.readouterr().err
