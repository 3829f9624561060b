"""Auditing a model that is not ours: trusted config modules, and the Python API."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import register_tiny_backbone, run_train, tiny_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import audit
import audit_report
from lit_modules.loading import CheckpointError, load_run

FAST = ["--progress", "false", "--num_images", "10", "--sanity_images", "2", "--steps", "4",
        "--counterfactual_images", "2", "--discovery_images", "4", "--methods", "[gradcam, saliency]"]
API_FAST = {"progress": False, "sanity_images": 2, "steps": 4, "counterfactual_images": 2,
            "discovery_images": 4}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 1-epoch run of the millisecond backbone on shapes with a cue on classes 0 and 1."""
    tmp = tmp_path_factory.mktemp("foreign")
    cfg = tiny_config(tmp, epochs=1, backbone=register_tiny_backbone())
    cli = run_train(["fit", "--config", str(cfg)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def _user_package(root: Path, name: str) -> Path:
    """A package whose import leaves a marker file: proof of whether its code ran."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(root / (name + '.imported'))!r}).touch()
        from lit_modules.classifier import ImageClassifier
        from lit_modules.data import SyntheticShapesDataModule

        class UserClassifier(ImageClassifier):
            pass

        class UserShapes(SyntheticShapesDataModule):
            pass
    """))
    return root / (name + ".imported")


def _foreign_config(ckpt: Path, tmp: Path, package: str) -> Path:
    cfg = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())
    cfg["model"] = {"class_path": f"{package}.UserClassifier", "init_args": cfg["model"]}
    cfg["data"]["class_path"] = f"{package}.UserShapes"
    path = tmp / "foreign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_untrusted_module_is_refused_and_never_imported(tiny_run: Path, tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    marker = _user_package(tmp_path, "userpkg_untrusted")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _foreign_config(tiny_run, tmp_path, "userpkg_untrusted")
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", str(tiny_run), "--train_config", str(config),
                    "--out", str(tmp_path / "out"), *FAST])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "userpkg_untrusted.UserClassifier" in err
    assert "--trust_module userpkg_untrusted" in err and "runs its module's code" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # Trusting another package, or a name that merely starts the same, is not enough.
    with pytest.raises(CheckpointError, match="--trust_module userpkg_untrusted"):
        load_run(tiny_run, config, trusted=["userpkg_untrust", "other"])
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="module or package name"):
        load_run(tiny_run, config, trusted=["os; rm"])


def test_a_trusted_package_loads_and_audits(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    marker = _user_package(tmp_path, "userpkg_trusted")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _foreign_config(tiny_run, tmp_path, "userpkg_trusted")
    out = tmp_path / "out"
    audit.main(["--ckpt", str(tiny_run), "--train_config", str(config), "--out", str(out),
                "--trust_module", "other_pkg", "--trust_module", "userpkg_trusted", *FAST])
    assert marker.exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["config"]["class_path"] == "userpkg_trusted.UserShapes"
    assert m["models"][0]["config"]["model"]["class_path"] == "userpkg_trusted.UserClassifier"
    assert m["models"][0]["summary"]["accuracy"]["n"] == 40
    run = load_run(tiny_run, config, trusted=["userpkg_trusted"])
    assert type(run.model).__name__ == "UserClassifier"
    assert type(run.datamodule).__name__ == "UserShapes"


# Fields that identify a run rather than measure the model: when and how it was called,
# where the files are, which checkpoint, how long each part took.
IDENTIFYING = {"created", "command", "audit_seconds"}
MODEL_IDENTIFYING = {"name", "checkpoint", "sha256", "config_path", "config", "meta", "timing",
                     "evolution"}


def _without_seconds(tree):
    """``tree`` without the wall-clock ``seconds`` a section records (they vary run to run)."""
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


def test_the_api_on_the_checkpoints_model_reports_what_the_cli_does(tiny_run: Path,
                                                                    tmp_path: Path) -> None:
    cli_out = tmp_path / "cli"
    audit.main(["--ckpt", str(tiny_run), "--out", str(cli_out), *FAST])
    cli = json.loads((cli_out / "metrics.json").read_text())

    run = load_run(tiny_run)  # the same nn.Module and data, handed over from Python
    dm = run.datamodule
    test_set = dm.dataset("test")
    api_out = audit_report.audit(
        run.model, test_set, class_names=dm.class_names, out=tmp_path / "api",
        methods=["gradcam", "saliency"], num_images=10, mean=dm.mean, std=dm.std,
        device="cpu", **API_FAST)
    api = json.loads((api_out / "metrics.json").read_text())

    assert api["models"][0]["config"]["data"]["class_path"].endswith("SplitDataset")
    assert api["models"][0]["checkpoint"] is None and "skipped" in api["models"][0]["evolution"]
    assert cli["models"][0]["evolution"]["epochs"] == [0]
    # Numbers the two must share exactly, spelled out so a failure names them.
    cli, api = _without_seconds(cli), _without_seconds(api)
    a, b = cli["models"][0], api["models"][0]
    assert a["summary"]["accuracy"] == b["summary"]["accuracy"]
    assert a["faithfulness"] == b["faithfulness"] and a["sanity"] == b["sanity"]
    assert a["bias"] == b["bias"] and a["bias"]["counterfactual"] is not None
    assert a["shortcuts"] == b["shortcuts"]
    assert a["localisation"] == b["localisation"] and b["localisation"]["ground_truth"]
    for whole in (cli, api):
        for key in IDENTIFYING:
            whole.pop(key)
        whole["data"].pop("config")
        for model in whole["models"]:
            for key in MODEL_IDENTIFYING:
                model.pop(key)
    assert api == cli


def _plain_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _tensor_data(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % 3)


def test_a_plain_sequential_and_a_tensor_dataset(tmp_path: Path) -> None:
    model, data = _plain_cnn(), _tensor_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = audit_report.audit(model, DataLoader(data, batch_size=4), class_names=["a", "b", "c"],
                             out=tmp_path / "plain", layer=model[2], num_images=6,
                             device="cpu", **API_FAST)
    m = json.loads((out / "metrics.json").read_text())
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert m["settings"]["method_options"]["gradcam"]["layer"] == "2"
    assert "layer" not in m["settings"]["method_options"]["saliency"]
    model_m = m["models"][0]
    assert model_m["summary"]["accuracy"]["n"] == 24
    assert model_m["methods_classes"]["methods"]["gradcam"]["status"] == "ok"
    assert model_m["methods_classes"]["methods"]["ablationcam"]["status"] == "ok"
    assert model_m["bias"]["counterfactual"] is None and "skipped" in model_m["evolution"]
    assert model_m["localisation"]["ground_truth"] is False
    html = (out / "report.html").read_text()
    assert "given from Python" in html and "no monitor maps" in html


def test_bad_input_to_the_api_is_explained(tmp_path: Path) -> None:
    model, data = _plain_cnn(), _tensor_data()
    kw = {"class_names": ["a", "b", "c"], "out": tmp_path / "x", "device": "cpu"}
    with pytest.raises(audit_report.AuditError, match=r"layer=.*Candidates.*0, 1, 2, 3"):
        audit_report.audit(model, data, **kw)
    with pytest.raises(audit_report.AuditError, match="no layer named 'conv9'.*valid names"):
        audit_report.audit(model, data, layer="conv9", **kw)
    two = ["a", "b"]
    with pytest.raises(audit_report.AuditError, match="labels run from 0 to 2, but 2"):
        audit_report.audit(model, data, layer="2", **{**kw, "class_names": two})
    binary = TensorDataset(data.tensors[0], data.tensors[1] % 2)
    with pytest.raises(audit_report.AuditError, match="3 logits, but 2 class names"):
        audit_report.audit(model, binary, layer="2", **{**kw, "class_names": two})
    with pytest.raises(audit_report.AuditError, match=r"float tensors \[3, H, W\]"):
        audit_report.audit(model, TensorDataset(torch.rand(4, 16, 16), torch.zeros(4)),
                           layer="2", **kw)
    with pytest.raises(TypeError, match="ckpt"):
        audit_report.audit(model, data, layer="2", ckpt=["x"], **kw)
    assert not (tmp_path / "x").exists()
