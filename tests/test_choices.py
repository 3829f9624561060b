"""Closed sets of option values are Literals: a wrong value fails when the config is
parsed, naming the choices; ``classes: true`` unquoted (a YAML boolean) means ``true``."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import yaml
from helpers import run_train, tiny_config

from callbacks import ExplanationMonitor
from callbacks.monitor import ShortcutTest
from explain.measures import tracking
from lit_modules.data import DATA_PATHS, POSITIONS, CueConfig
from lit_modules.data.choices import DataPath


def _config(tmp_path, monitor: dict | None = None, data: dict | None = None,
            cue: dict | None = None):
    path = tiny_config(tmp_path, monitor=monitor, data=data)
    if cue:
        written = yaml.safe_load(path.read_text())
        written["data"]["init_args"]["cue"].update(cue)
        path.write_text(yaml.safe_dump(written))
    return path


@pytest.mark.parametrize("where,value,choices", [
    ("classes", "tru", "Literal['true', 'predicted', 'all']"),
    ("classes", False, "Literal['true', 'predicted', 'all']"),
    ("explain_classes", "some", "Literal['auto', 'all', 'shown']"),
    ("shortcut_tests", ["boxes"], "Literal['box', 'colour', 'filter', 'moving']"),
    ("position", "top", "Literal['top_left', 'top_right', 'bottom_left', 'bottom_right', "
                        "'center', 'random']"),
    ("data_path", "fastest", "Literal['classic', 'fast']"),
])
def test_a_wrong_choice_fails_at_parse_time_naming_the_choices(
        where, value, choices, tmp_path, capsys) -> None:
    cfg = _config(tmp_path, monitor={where: value} if where not in ("position", "data_path")
                  else None, data={where: value} if where == "data_path" else None,
                  cue={where: value} if where == "position" else None)
    with pytest.raises(SystemExit) as info:
        run_train(["--config", str(cfg)], run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert choices in err, err[-1500:]
    shown = value[0] if isinstance(value, list) else value
    assert re.search(rf"(Given|Got) value: {re.escape(str(shown))}\b", err), err[-1500:]
    assert not (tmp_path / "runs").exists()  # nothing was built


def test_unquoted_yaml_true_means_the_true_class(tmp_path) -> None:
    cfg = tiny_config(tmp_path, monitor={"classes": True})
    assert "classes: true\n" in cfg.read_text()  # what a YAML writer types, unquoted
    cli = run_train(["--config", str(cfg)], run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert monitor.classes == "true"
    assert monitor.explained(10) == ("all", "explain_classes=auto: 10 classes <= 32, all")
    # In Python too, and a wrong value still names the choices there.
    assert ExplanationMonitor(classes=True).classes == "true"
    with pytest.raises(ValueError, match=r"\('true', 'predicted', 'all'\)"):
        ExplanationMonitor(classes=False)


def test_the_literals_are_the_checked_sets() -> None:
    # One list each: the Literal the parser checks is the set the code checks.
    assert get_args(DataPath) == DATA_PATHS
    assert set(get_args(ShortcutTest)) <= set(tracking.KINDS)
    with pytest.raises(ValueError, match="choose one of"):  # in Python, the same set
        CueConfig(classes=[0], position="top")
    assert CueConfig(classes=[0], position=POSITIONS[-1]).position == "random"
