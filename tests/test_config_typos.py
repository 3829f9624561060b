"""Config mistakes stop the CLI before anything runs, naming the offending key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, run_train, tiny_config


def _with(cfg_path, section: str, key: str, value) -> str:
    """Write a copy of a config with ``section.key`` (or ``data.init_args.key``) added."""
    cfg = yaml.safe_load(cfg_path.read_text())
    target = cfg["data"]["init_args"] if section == "data" else cfg[section]
    target[key] = value
    out = cfg_path.with_name(f"typo_{section}_{key}.yaml")
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unknown_flag", ["unrecognized arguments: --trainer.max_epoch 3"]),
        ("wrong_type", ['"trainer.max_epochs"', "Given value: abc"]),
        ("yaml_unknown_model_key", ["does not accept option 'model.lrr'"]),
        ("yaml_unknown_data_key", ["Option 'num_trainn' is not accepted"]),
    ],
)
def test_config_typo_is_rejected_naming_the_key(case, expected, tmp_path, capsys) -> None:
    cfg = tiny_config(tmp_path)
    args = {
        # A prefix of max_epochs: argparse would take it for max_epochs without allow_abbrev.
        "unknown_flag": ["--config", str(cfg), "--trainer.max_epoch", "3"],
        "wrong_type": ["--config", str(cfg), "--trainer.max_epochs", "abc"],
        "yaml_unknown_model_key": ["--config", _with(cfg, "model", "lrr", 0.1)],
        "yaml_unknown_data_key": ["--config", _with(cfg, "data", "num_trainn", 5)],
    }[case]
    with pytest.raises(SystemExit) as info:
        run_train(["fit", *args])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, err[-800:]
    assert not (tmp_path / "runs").exists()  # rejected before any training or logging


def test_config_typo_exit_status_of_the_real_script(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", str(cfg), "--trainer.max_epoch", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-800:]
    assert "unrecognized arguments: --trainer.max_epoch 3" in proc.stderr
    assert not (tmp_path / "runs").exists()


OLD_CUE = {"cue_classes": [0, 1], "cue_size": 8, "cue_position": "top_left", "cue_p_eval": 1.0}


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_old_flat_cue_options_fail_showing_the_new_form(where, tmp_path, capsys) -> None:
    cfg = tiny_config(tmp_path)
    if where == "yaml":
        data = yaml.safe_load(cfg.read_text())
        data["data"]["init_args"].pop("cue")
        data["data"]["init_args"].update(OLD_CUE)
        cfg.write_text(yaml.safe_dump(data))
        args = ["--config", str(cfg)]
    else:
        args = ["--config", str(cfg), "--data.init_args.cue_classes", "[3,5]"]
    with pytest.raises(SystemExit) as info:
        run_train(["fit", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    hint = err.strip().splitlines()[-1]  # the last line, where a user looks first
    if where == "yaml":
        assert hint == (
            "cue_classes, cue_size, cue_position, cue_p_eval are now cue.classes, cue.size, "
            "cue.position, cue.p_eval (the cue options are one `cue:` object): write "
            "`cue: {classes: [0, 1], size: 8, position: top_left, p_eval: 1.0}` under "
            "data.init_args in a YAML config, or --data.init_args.cue.classes [0,1] "
            "--data.init_args.cue.size 8 --data.init_args.cue.position top_left "
            "--data.init_args.cue.p_eval 1.0 on the command line"
        ), err[-1500:]
    else:
        assert hint.startswith(
            "cue_classes is now cue.classes (the cue options are one `cue:` object): write "
            "`cue: {classes: [3, 5]}` under data.init_args"
        ), err[-1500:]
    assert err.count("now cue.classes") == 1  # said once, not once per nested parser
    assert not (tmp_path / "runs").exists()


def test_the_hint_is_not_added_to_unrelated_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_train(["fit", "--config", _with(tiny_config(tmp_path), "data", "cue_colour", 1)])
    err = capsys.readouterr().err
    assert "Option 'cue_colour' is not accepted" in err and "is now cue." not in err
