"""audit.py end to end: tiny real training runs, the report, and refusing unsafe files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CreatesFile, run_train, tiny_config

import audit
import audit_report
import audit_report.run
import explain
from lit_modules.loading import CheckpointError, load_checkpoint, load_run

SECTION_IDS = [section.id for section in audit_report.SECTIONS]
METHODS = ["gradcam", "hirescam", "cam"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-epoch ResNet-18 on synthetic shapes whose classes 0 and 1 carry a cue."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, epochs=2, monitor={"methods": ["gradcam", "hirescam"]})
    cli = run_train(["fit", "--config", str(cfg)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def _audit(ckpt: Path, out: Path, *extra: str) -> dict:
    audit.main(["--ckpt", str(ckpt), "--out", str(out), "--progress", "false", "--num_images",
                "12", "--sanity_images", "4", "--steps", "8", "--counterfactual_images", "4",
                *extra])
    return json.loads((out / "metrics.json").read_text())


def _listed(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]"


def _images(html: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)


def test_end_to_end_report_holds_every_section_and_method(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    m = _audit(trained, out, "--methods", _listed(METHODS))

    # metrics.json: provenance
    assert m["schema_version"] == audit.SCHEMA_VERSION
    assert m["seed"] == 0 and m["versions"]["torch"] not in ("", "not installed")
    assert set(m["versions"]) >= {"python", "torch", "lightning", "torchmetrics"}
    model = m["models"][0]
    assert model["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert model["config"]["model"]["backbone"] == "resnet18_cifar"
    assert m["settings"]["methods"] == METHODS
    assert m["measures"]["deletion_auc"]["higher_is_better"] is False

    # every section's numbers, for every selected method
    summary = model["summary"]
    acc = summary["accuracy"]
    assert acc["n"] == 40 and acc["k"] == sum(c["k"] for c in summary["per_class"].values())
    assert acc["value"] == pytest.approx(acc["k"] / 40)
    assert m["device"] == "cpu"  # --device auto on a machine without CUDA
    assert len(summary["confusion_matrix"]) == 10 and len(summary["per_class"]) == 10
    assert len(model["images_classes"]["probabilities"]) == 10
    assert model["cam_vs_gradcam"]["correlation"]["mean"] > 0.999  # GAP + Linear: equal
    assert model["evolution"]["epochs"] == [0, 1]
    assert "cue_energy/biased" in model["evolution"]["scalars"]["gradcam"]
    sanity_steps = model["sanity"]["steps"]
    for method in METHODS:
        assert model["methods_classes"]["methods"][method]["status"] == "ok"
        loc = model["localisation"]["methods"][method]
        for name in ("box_iou", "localisation_accuracy", "pointing_game", "energy_pointing_game"):
            assert loc[name]["n"] > 0 and "higher_is_better" in loc[name], name
        faith = model["faithfulness"]["methods"][method]
        for name in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
            assert faith[name]["n"] == 12 and faith[name]["mean"] is not None, name
        assert len(faith["curves"]["deletion_mean"]) == 9
        san = model["sanity"]["methods"][method]
        assert len(san["spearman"]) == len(sanity_steps) and isinstance(san["flagged"], bool)
        bias = model["bias"]["methods"][method]
        assert set(bias) == {"border_energy", "cue_energy", "cue_region_energy_without_cue"}
        # Only the cue classes carry the cue (a class whose maps are all zero has no share).
        assert bias["cue_energy"] and set(bias["cue_energy"]) <= {"circle", "square"}
    cf = model["bias"]["counterfactual"]
    assert cf["classes"]["circle"]["cue_class"] and cf["n_images"] == 40
    assert f"Accuracy: {acc['value']:.1%}" in model["findings"][len(model["bias"]["flagged"])]
    assert "skipped" in m["side_by_side"]
    shortcuts = model["shortcuts"]
    assert shortcuts["method"] == "saliency" and shortcuts["n_images"] == 40  # the whole split
    assert set(shortcuts["classes"]) <= set(summary["per_class"]) and shortcuts["classes"]
    lifts = [c["lift"] for c in shortcuts["classes"].values()]
    suspects = {s["class"] for s in shortcuts["suspects"]}
    assert suspects == {n for n, c in shortcuts["classes"].items() if c["suspect"]}
    assert all(math.isfinite(v) and v >= 1.0 for v in lifts)  # mass over area share
    for s in shortcuts["suspects"]:  # a suspect is a tested class whose flips reached 10%
        assert s["flip_rate"] >= 0.1 and set(s["margins"]) == set(s["controls"])
        assert s["confirmed"] == (s["targets"] >= 5 and all(
            m["low"] > 0 and m["mean"] >= 0.1 for m in s["margins"].values()))

    # report.html: every section, every image inline, nothing fetched from elsewhere
    html = (out / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
    images = _images(html)
    assert len(images) >= 10
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert len(list((out / "figures").glob("*.png"))) == len(images)
    # No temporary folders left beside the report.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_compare_two_checkpoints_side_by_side(trained: Path, tmp_path: Path) -> None:
    # The same run twice stands in for two models: every number must then agree.
    out = tmp_path / "cmp"
    m = _audit(trained, out, "--ckpt+", str(trained), "--methods", "[gradcam, gradcam_pp]",
               "--num_images", "6")
    a, b = m["models"]
    assert (a["label"], b["label"]) == ("A", "B")
    sbs = m["side_by_side"]
    assert sbs["models"] == ["A", "B"]
    row = sbs["methods"]["gradcam"]["insertion_auc"]
    assert row["means"][0] == pytest.approx(row["means"][1]) and row["better"] is None
    html = (out / "report.html").read_text()
    assert "Model B" in html and "side_by_side" in " ".join(
        p.name for p in (out / "figures").glob("*.png")
    )


# The cheapest settings of the costly methods: this checks plumbing, not explanations.
CHEAP = {"integrated_gradients": {"steps": 4}, "lime": {"samples": 16},
         "smoothgrad": {"samples": 2}, "occlusion": {"window": 16, "stride": 16}}


@pytest.mark.slow  # scorecam alone needs 512 forwards per image per cascade step
def test_all_methods_on_very_few_images(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    options = {k: v for k, v in CHEAP.items() if k in explain.available()}
    m = _audit(trained, out, "--methods", "all", "--num_images", "2", "--sanity_images", "1",
               "--method_options", json.dumps(options))
    for name, opts in options.items():
        assert m["settings"]["method_options"][name].items() >= opts.items()
    model = m["models"][0]
    assert m["settings"]["methods"] == explain.available()
    for method in explain.available():
        entry = model["methods_classes"]["methods"][method]
        assert entry["status"] == "ok", (method, entry.get("error"))
        assert method in model["faithfulness"]["methods"]
        assert method in model["sanity"]["methods"]


def test_data_without_cue_masks_or_monitor_maps(trained: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    """The CIFAR-like case: no object masks, no cue, no saved maps; every section still renders."""
    import yaml

    from lit_modules.data import SyntheticShapesDataModule

    cfg = yaml.safe_load((trained.parent.parent / "config.yaml").read_text())
    cfg["data"]["init_args"]["cue"] = None
    config = tmp_path / "elsewhere" / "config.yaml"  # no explanations/ folder beside it
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(SyntheticShapesDataModule, "has_object_masks", False)
    out = tmp_path / "report"
    m = _audit(trained, out, "--train_config", str(config), "--methods", "gradcam",
               "--num_images", "4")
    model = m["models"][0]
    assert model["localisation"]["ground_truth"] is False
    assert model["localisation"]["methods"]["gradcam"] == {}  # boxes drawn, nothing scored
    assert model["bias"]["counterfactual"] is None and model["bias"]["flagged"] == []
    assert set(model["bias"]["methods"]["gradcam"]) == {"border_energy"}
    assert "skipped" in model["evolution"]
    html = (out / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
    assert "no object masks" in html and "declares no spurious cue" in html


def test_a_normal_checkpoint_loads_with_weights_only(trained: Path) -> None:
    ckpt = load_checkpoint(trained)  # weights_only=True inside
    assert {"state_dict", "hyper_parameters", "callbacks"} <= set(ckpt)
    run = load_run(trained)
    assert run.config_path.name == "config.yaml" and not run.model.training


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path: Path, capsys) -> None:
    # Proof that the payload is live: an unrestricted load does create its file.
    proof, proof_target = tmp_path / "proof.ckpt", tmp_path / "created_by_unsafe_load"
    torch.save({"state_dict": {}, "x": CreatesFile(proof_target)}, proof)
    torch.load(proof, weights_only=False)
    assert proof_target.exists()

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": CreatesFile(target)}, evil)
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", str(evil), "--out", str(tmp_path / "out"), "--progress", "false"])
    assert exc.value.code == 1  # a failure, not a usage error
    err = capsys.readouterr().err
    assert str(evil) in err and "refused" in err and "nothing in it was executed" in err
    assert not target.exists()
    assert not (tmp_path / "out").exists()
    # A legacy (non-zip) pickle is refused the same way.
    legacy = tmp_path / "legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"x": CreatesFile(target)}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(legacy)
    assert not target.exists()


def test_missing_config_is_a_clear_error(trained: Path, tmp_path: Path, capsys) -> None:
    lonely = tmp_path / "somewhere" / "model.ckpt"
    lonely.parent.mkdir()
    shutil.copy(trained, lonely)
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", str(lonely), "--progress", "false"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "no training config found" in err and "--train_config" in err
    # --config points it at the right file.
    config = trained.parent.parent / "config.yaml"
    run = load_run(lonely, config)
    assert run.config_path == config.resolve()


def test_interrupt_leaves_no_half_written_report(
    trained: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')  # an earlier report stays intact

    def interrupted(folder, *args, **kwargs):
        (Path(folder) / "report.html").write_text("<html>half")
        raise KeyboardInterrupt

    monkeypatch.setattr(audit_report.run, "write_report", interrupted)
    with pytest.raises(SystemExit) as exc:
        _audit(trained, out, "--methods", "gradcam", "--num_images", "2")
    assert exc.value.code == 130
    assert "no report was written" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_out_that_is_not_a_report_is_not_replaced(trained: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        _audit(trained, tmp_path, "--methods", "gradcam", "--num_images", "2")
    assert "does not hold an earlier audit report" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in audit.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, action.option_strings
    for name in explain.available():
        assert name in text


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", "x.ckpt", "--methods", "grad_cam"])
    assert exc.value.code == 2
    assert "gradcam" in capsys.readouterr().err  # the valid names are listed
    with pytest.raises(SystemExit):
        audit.main(["--ckpt", "[a, b, c]"])
    assert "one checkpoint or two" in capsys.readouterr().err


@pytest.mark.parametrize(("old", "new"), [
    (["--num-images", "4"], "--num_images"), (["--no-progress"], "--progress false"),
    (["--compare", "b.ckpt"], "a second --ckpt"), (["--method-options", "{}"], "--method_options"),
    (["--methods", "gradcam,cam"], "--methods '[gradcam, cam]'"),
])
def test_old_spellings_name_the_new_one(old: list[str], new: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", "a.ckpt", *old])
    assert exc.value.code == 2
    assert new in capsys.readouterr().err


def test_a_training_config_given_as_config_is_redirected(trained: Path, capsys) -> None:
    config = trained.parent.parent / "config.yaml"
    with pytest.raises(SystemExit) as exc:
        audit.main(["--ckpt", str(trained), "--config", str(config)])
    assert exc.value.code == 2
    assert f"--train_config {config}" in capsys.readouterr().err


def test_an_audit_config_file_and_print_config(trained: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(f"ckpt: {trained}\nmethods: [gradcam, cam]\nnum_images: 5\n"
                   "method_options: {occlusion: {window: 8}}\n")
    with pytest.raises(SystemExit) as exc:
        audit.main(["--config", str(cfg), "--print_config"])
    assert exc.value.code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["methods"] == ["gradcam", "cam"] and printed["num_images"] == 5
    assert printed["method_options"] == {"occlusion": {"window": 8}}
    settings = audit.parse_args(["--config", str(cfg), "--seed", "3"])
    assert (settings.methods, settings.num_images, settings.seed) == (["gradcam", "cam"], 5, 3)


def _train_for_bias(tmp: Path, cue: bool) -> Path:
    """A short real run at 16x16 (4x cheaper than 32x32); the cue sits on class 0 only.

    One cue class keeps the planted shortcut unambiguous: with the same patch on two
    classes, a briefly trained model maps the patch to one of them and never predicts the
    other, which is a true finding but not the one this test is about.
    """
    data = {"image_size": 16, "num_train": 240, "num_val": 50, "num_test": 400,
            "batch_size": 32,
            "cue": {"classes": [0], "p_train": 1.0, "p_eval": 1.0} if cue else None}
    tmp.mkdir(parents=True)
    cfg = tiny_config(tmp, epochs=3, data=data, name="cue" if cue else "clean")
    cli = run_train(["fit", "--config", str(cfg), "--trainer.limit_train_batches", "1.0",
                     "--model.optimizer", "adamw", "--model.lr", "0.003"])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.mark.slow
def test_counterfactual_flags_the_planted_cue_only_where_it_was_learned(tmp_path: Path) -> None:
    biased = _train_for_bias(tmp_path / "biased", cue=True)
    clean = _train_for_bias(tmp_path / "clean", cue=False)
    # Compare mode audits both on model A's data, so the clean model meets the same cue.
    out = tmp_path / "report"
    m = _audit(biased, out, "--ckpt+", str(clean), "--methods", "gradcam",
               "--counterfactual_images", "40")
    flagged_biased = {f["class"] for f in m["models"][0]["bias"]["flagged"]}
    flagged_clean = {f["class"] for f in m["models"][1]["bias"]["flagged"]}
    assert flagged_biased == {"circle"}, m["models"][0]["bias"]["counterfactual"]
    assert flagged_clean == set(), m["models"][1]["bias"]["counterfactual"]
    assert any(text.startswith("class circle:") for text in m["models"][0]["findings"])
    # Discovery, told nothing, finds the same shortcut in the biased model only: circle,
    # at the 4x4 top-left patch, confirmed by transplant against both controls.
    biased_found, clean_found = (model["shortcuts"] for model in m["models"])
    confirmed = [s for s in biased_found["suspects"] if s["confirmed"]]
    assert [s["class"] for s in confirmed] == ["circle"], biased_found["suspects"]
    x0, y0, x1, y1 = confirmed[0]["box"]
    inter = max(0, min(x1, 4) - x0) * max(0, min(y1, 4) - y0)
    assert inter / ((x1 - x0) * (y1 - y0) + 16 - inter) >= 0.5  # IoU with the cue's box
    assert all(m["low"] > 0 for m in confirmed[0]["margins"].values())
    assert biased_found["declared_cue_found"] is True
    check = biased_found["self_check"]["circle"]
    assert check["iou"] >= 0.5 and check["found_box"] == confirmed[0]["box"]
    assert not [s for s in clean_found["suspects"] if s["confirmed"]], clean_found["suspects"]


def test_presets_default_and_all() -> None:
    settings = audit.parse_args(["--ckpt", "x.ckpt"])
    assert settings.methods == ["gradcam", "saliency", "ablationcam"] == audit.PRESETS["default"]
    assert {explain.get(m).family for m in settings.methods} == {"cam", "gradient",
                                                                 "perturbation"}
    assert audit.parse_args(["--ckpt", "x.ckpt", "--methods", "all"]).methods == \
        explain.available()


def _engine_calls(monkeypatch) -> list[tuple[str, int, bool]]:
    """Record every explain.run call as (method, number of images, all classes?)."""
    calls: list[tuple[str, int, bool]] = []
    real = explain.run

    def counting(model, images, method="gradcam", layer=None, targets=None, **options):
        calls.append((method, len(images), targets is None))
        return real(model, images, method, layer, targets, **options)

    monkeypatch.setattr(explain, "run", counting)
    return calls


def _figure_stores(monkeypatch) -> list:
    """Every report page's FigureStore, as it is made (``.drawn`` names the figures drawn)."""
    from audit_report.page import FigureStore

    stores: list = []
    real = FigureStore.__init__

    def keeping(self, *args, **kwargs):
        real(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(FigureStore, "__init__", keeping)
    return stores


@pytest.mark.slow  # four audits (75 s): the fast suite stays under 10 minutes
def test_a_rerun_reuses_cached_results_and_a_changed_checkpoint_does_not(
    trained: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "report"
    calls = _engine_calls(monkeypatch)
    stores = _figure_stores(monkeypatch)
    first = _audit(trained, out, "--methods", "[gradcam, saliency]")
    # The sample: Grad-CAM for every class at once, saliency (a backward per class) for the
    # true classes only (then for the predicted class of the images it gets wrong).
    # (The time estimate and the sections make calls of their own; the sample's come first
    # after the estimate's calibration on a few images.)
    start = calls.index(("gradcam", 12, True))
    assert calls[start:start + 2] == [("gradcam", 12, True), ("saliency", 12, False)]
    # Per method: maps, curves, sanity; per model: accuracy, discovery, the cue test, the
    # CAM vs Grad-CAM check and the deletion/insertion curves' map-free ends.
    cached = list((out / "cache").iterdir())
    entries = sorted(p.name.rsplit("-", 1)[0] for p in cached if p.suffix != ".sha256")
    # Each cached figure has its SHA-256 beside it (checked before the PNG is reused).
    assert sorted(p.name for p in cached if p.suffix == ".sha256") == sorted(
        p.name + ".sha256" for p in cached if p.suffix == ".png")
    assert [e for e in entries if e != "figure"] == [
        "accuracy", "cam-vs-gradcam", "counterfactual", "curve-ends", "explanations",
        "explanations", "faithfulness", "faithfulness", "sanity", "sanity", "shortcuts"]
    # Every figure was drawn, and its PNG kept for the next report.
    figures = sorted(p.name.split("_", 1)[1][:-4] for p in (out / "figures").iterdir())
    assert sorted(stores[-1].drawn) == figures and entries.count("figure") == len(figures)
    discovery_calls = [c for c in calls if c[0] == "saliency" and c[1] not in (2, 4, 11, 12)]
    assert discovery_calls  # the discovery sample's saliency maps

    capsys.readouterr()
    calls.clear()  # one more method: only it is explained, randomised and scored
    second = _audit(trained, out, "--methods", "[gradcam, saliency, hirescam]")
    # The estimate knows: two methods and the map-free sections come from the cache, so
    # neither is calibrated (no discovery-sized saliency call before the sample's).
    assert "(2 method result(s) from the earlier report's cache)" in capsys.readouterr().err
    assert [m for m, n, every in calls if n == 12 and every] == ["hirescam"]
    assert {m for m, n, every in calls if n == 4 and not every} == {"hirescam"}  # sanity
    assert not [c for c in calls if c in discovery_calls]  # discovery came from the cache
    for section in ("localisation", "faithfulness", "sanity"):
        a, b = (r["models"][0][section]["methods"]["gradcam"] for r in (first, second))
        assert a == b, section
    for section in ("summary", "shortcuts"):
        assert first["models"][0][section] == second["models"][0][section], section
    assert (first["models"][0]["bias"]["counterfactual"]
            == second["models"][0]["bias"]["counterfactual"])
    # Only the figures that show every method are drawn again; the rest (the confusion
    # matrix, the images x classes grid, CAM vs Grad-CAM, the bias figure of the lead
    # method...) are the earlier report's PNGs.
    shows_methods = {"methods_classes", "localisation", "faithfulness", "sanity_curves",
                     "sanity_maps"}
    assert set(stores[-1].drawn) == shows_methods & set(figures), stores[-1].drawn
    assert {"confusion", "images_classes", "cam_vs_gradcam"} <= set(figures)
    assert len([p for p in (out / "cache").iterdir() if not p.name.startswith("figure")]) == 14

    # The same weights, moved a little: another hash, so nothing is reused.
    ckpt = torch.load(trained, weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("classifier.weight"))
    ckpt["state_dict"][name] += 1e-3
    changed = trained.with_name("changed.ckpt")
    torch.save(ckpt, changed)
    calls.clear()
    third = _audit(changed, out, "--methods", "[gradcam, saliency, hirescam]")
    start = calls.index(("gradcam", 12, True))
    # (saliency twice: the true classes, then the predicted class of the errors)
    assert [m for m, _, _ in calls[start:start + 4]] == [
        "gradcam", "saliency", "saliency", "hirescam"]
    assert third["models"][0]["sha256"] != second["models"][0]["sha256"]
    changed.unlink()


# -- the audit's speed settings ----------------------------------------------------------------
def test_exact_drops_the_speed_settings_and_user_options_win() -> None:
    from audit_report.settings import (
        FAST_OPTIONS,
        curve_schedule,
        faithfulness_images,
        method_options,
    )

    fast = audit.parse_args(["--ckpt", "x.ckpt", "--methods", "all"])
    exact = audit.parse_args(["--ckpt", "x.ckpt", "--methods", "all", "--exact", "true"])
    assert not fast.exact and exact.exact
    for method, options in FAST_OPTIONS.items():
        assert method_options(method, fast).items() >= options.items()
        assert not set(method_options(method, exact)) & set(options)
    assert method_options("scorecam", exact) == {"batch_size": 128}
    assert faithfulness_images(exact, 64) == 64 and faithfulness_images(fast, 64) == 32
    assert faithfulness_images(fast, 12) == 12
    assert curve_schedule(fast) == (10, "quadratic") and curve_schedule(exact) == (16, "uniform")
    assert curve_schedule(audit.parse_args(["--ckpt", "x.ckpt", "--steps", "32"])) == (32, "uniform")
    mine = audit.parse_args(["--ckpt", "x.ckpt", "--method_options",
                             "{integrated_gradients: {steps: 50}, scorecam: {top_k: null}}"])
    assert method_options("integrated_gradients", mine) == {"steps": 50}
    assert method_options("scorecam", mine) == {"batch_size": 128, "top_k": None}


@pytest.mark.parametrize("method", ["saliency", "occlusion"])
def test_sanity_final_step_only_equals_the_full_cascade_last_step(method, tiny_explain_net):
    from audit_report.sections.measured import final_step_only
    from explain.measures.sanity import cascade_steps, cascading_randomization

    model = tiny_explain_net(seed=3, split=False).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 2, 4])
    fns = {method: lambda net: explain.run(net, x, method, targets=targets)}
    full = cascading_randomization(model, fns, seed=7, keep=1)
    last = final_step_only(model, fns, seed=7)
    steps = len(cascade_steps(model))
    assert steps >= 2 and last["spearman"][method].shape == (steps, 3)
    assert torch.equal(last["spearman"][method][-1], full["spearman"][method][-1])
    assert torch.isnan(last["spearman"][method][:-1]).all()
    assert torch.equal(last["maps"][method][[0, -1]], full["maps"][method][[0, -1]])


@pytest.mark.slow  # two audits, one with every sanity step (66 s)
def test_sanity_final_only_in_the_report_and_exact_runs_every_step(trained: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    methods = ["--methods", "[gradcam, occlusion]", "--method_options",
               "{occlusion: {window: 16, stride: 16}}"]
    calls = _engine_calls(monkeypatch)
    fast = _audit(trained, tmp_path / "fast", *methods)
    # Occlusion is deterministic: its trained-model maps in the test are the sample's, so
    # the sanity images (4) are explained once, on the randomised model.
    assert [c for c in calls if c[0] == "occlusion" and c[1] == 4] == [("occlusion", 4, False)]
    exact = _audit(trained, tmp_path / "exact", *methods, "--exact", "true")
    f, e = fast["models"][0]["sanity"], exact["models"][0]["sanity"]
    assert f["final_only"] == ["occlusion"] and e["final_only"] == []
    assert [s["n"] for s in f["methods"]["occlusion"]["spearman"][:-1]] == [0] * (
        len(f["steps"]) - 1)
    assert [s["n"] for s in e["methods"]["occlusion"]["spearman"]] == [4] * len(e["steps"])
    # The verdict's step is the full cascade's, to the bit; gradcam is cascaded either way.
    assert f["methods"]["occlusion"]["final"] == e["methods"]["occlusion"]["final"]
    assert f["methods"]["gradcam"] == e["methods"]["gradcam"] | {
        "seconds": f["methods"]["gradcam"]["seconds"]}
    html = (tmp_path / "fast" / "report.html").read_text()
    assert "occlusion ran on the trained and the fully randomised model only" in html


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam", "occlusion"])
def test_class_maps_equal_the_all_class_maps_rows(method, tiny_explain_net) -> None:
    """The audit's true/predicted-class maps are the rows of the every-class maps, whether
    the method was asked for two classes (input gradients) or all of them."""
    from audit_report.run import class_maps

    model = tiny_explain_net(seed=1).eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    preds = torch.tensor([0, 3, 2, 3, 1, 0])  # wrong on images 1 and 4
    options = {"steps": 4} if method == "integrated_gradients" else {}
    got = class_maps(model, x, labels, preds, method, options)
    every = explain.run(model, x, method, **options)
    rows = torch.arange(6)
    torch.testing.assert_close(got["true"], every[rows, labels], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["pred"], every[rows, preds], rtol=1e-4, atol=1e-6)
    assert (got["all"] is None) == (explain.get(method).family == "gradient")


def test_cache_entries_of_another_cache_version_are_not_reused(tmp_path: Path,
                                                              monkeypatch) -> None:
    """A report made by an earlier version of the audit is recomputed, not reused."""
    from audit_report import cache as cache_module

    parts = {"checkpoint": "abc", "method": "gradcam"}
    earlier = tmp_path / "earlier"
    cache_module.ResultCache(None, earlier).put("explanations", parts, {"x": torch.ones(2)})
    now = cache_module.ResultCache(earlier, tmp_path / "now")
    assert torch.equal(now.get("explanations", parts)["x"], torch.ones(2))
    monkeypatch.setattr(cache_module, "CACHE_VERSION", cache_module.CACHE_VERSION + 1)
    later = cache_module.ResultCache(earlier, tmp_path / "later")
    assert not later.has("explanations", parts)
    assert later.get("explanations", parts) is None


def test_a_figure_is_drawn_again_only_when_its_inputs_or_its_code_change(
    tmp_path: Path, monkeypatch
) -> None:
    """The figure cache: the same inputs give the earlier PNG (byte for byte what drawing
    gives); other inputs, or an edit of the drawing code, draw anew."""
    from audit_report import page as page_module
    from audit_report.cache import ResultCache, digest
    from audit_report.figures import fig_confusion
    from audit_report.page import Drawing, FigureStore

    names = ["a", "b", "c"]
    confusion = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 6]])

    def report(folder: str, earlier: str | None, matrix: torch.Tensor) -> FigureStore:
        read = None if earlier is None else tmp_path / earlier
        store = FigureStore(tmp_path / folder, ResultCache(read, tmp_path / folder))
        store.add("confusion", Drawing(fig_confusion, matrix, names), "caption", "alt")
        return store

    first = report("r1", None, confusion)
    again = report("r2", "r1", confusion.clone())
    assert first.drawn == ["confusion"] and again.drawn == []
    png = (tmp_path / "r1" / "figures" / "01_confusion.png").read_bytes()
    assert (tmp_path / "r2" / "figures" / "01_confusion.png").read_bytes() == png
    assert FigureStore.png(fig_confusion(confusion, names)) == png  # a fresh draw: the same
    other = confusion.clone()
    other[0, 0] += 1
    assert report("r3", "r2", other).drawn == ["confusion"]
    import matplotlib

    with matplotlib.rc_context({"font.size": 13}):  # a user's matplotlibrc
        assert report("r4", "r2", confusion).drawn == ["confusion"]
    monkeypatch.setattr(page_module, "_code_digest", lambda module: "edited")
    assert report("r5", "r2", confusion).drawn == ["confusion"]
    # The content digest: equal content, equal digest; any difference in value, dtype,
    # shape or container changes it; sets are ordered; what it can not read is refused.
    assert digest({"x": torch.ones(2), "s": {3, 1}}) == digest({"s": {1, 3}, "x": torch.ones(2)})
    variants = [torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(1, 2),
                torch.tensor([1.0, 2.0]), [torch.ones(2)], (torch.ones(2),), [1], ["1"], [1.0]]
    assert len({digest(v) for v in variants}) == len(variants)
    with pytest.raises(TypeError, match="no content digest for object"):
        digest([object()])
