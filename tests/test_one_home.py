"""Each rule has one home: method names and families are read from the registry.

The class-selection rule and a method's per-class cost live in ``explain.registry``
(:class:`ClassSelection`, :class:`ClassCost`); a method picked by name is picked in
``explain/presets.py`` or the audit's presets (``audit_report/settings.py``). Anywhere
else a quoted method or family name is a second home that drifts: this test counts them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch
from helpers import ROOT

import explain
from explain.registry import FAMILY_COSTS

PACKAGES = ("lit_modules", "callbacks", "explain", "audit_report")
# Where a name may be written: the methods themselves, the registry and the presets.
HOMES = {"explain/cam.py", "explain/gradient.py", "explain/perturbation.py",
         "explain/registry.py", "explain/presets.py", "audit_report/settings.py"}
# Option values that happen to share a method's spelling, not a choice of method:
# the removal penalty's map ("occlusion": the box's content swapped, one extra forward).
NOT_METHOD_CHOICES = {("lit_modules/shortcut_removal.py", "occlusion")}


def quoted_names(path: Path, names: set[str]) -> list[str]:
    """String constants in ``path``'s code (docstrings excluded) equal to one of ``names``."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in docstrings]


def test_no_method_or_family_name_outside_its_homes() -> None:
    names = set(explain.available()) | set(FAMILY_COSTS)
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in HOMES:
                continue
            hits = [n for n in quoted_names(path, names) if (rel, n) not in NOT_METHOD_CHOICES]
            if hits:
                found[rel] = hits
    for script in ("train.py", "audit.py"):
        hits = quoted_names(ROOT / script, names)
        if hits:
            found[script] = hits
    assert not found, f"method or family names outside the registry and presets: {found}"


def test_the_count_sees_a_literal() -> None:
    """The counter above is not blind: it finds a name in code and skips a docstring."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.py"
        path.write_text('"""Uses "gradcam"."""\nX = "gradcam"\ndef f():\n    """saliency"""\n'
                        '    return "cam"\n')
        assert sorted(quoted_names(path, {"gradcam", "saliency", "cam"})) == ["cam", "gradcam"]


def test_every_method_states_its_per_class_cost() -> None:
    for name in explain.available():
        cost = explain.get(name).cost
        assert cost is FAMILY_COSTS[explain.get(name).family]
    # Gradient methods pay a full backward a class, so the audit asks them for two classes.
    assert explain.get(explain.DISCOVERY_METHOD).cost.backward_per_class
    assert not explain.get(explain.DEFAULT_METHOD).cost.backward_per_class


def test_class_selection_is_one_rule() -> None:
    rule = explain.CLASS_SELECTION
    labels, preds = torch.tensor([0, 1]), torch.tensor([1, 1])
    assert rule.targets(labels, preds, rule.max_all) is None
    assert rule.targets(labels, preds, rule.max_all + 1).tolist() == [[0, 1], [1, 1]]
    assert explain.auto_targets(labels, preds, rule.max_all + 1).tolist() == [[0, 1], [1, 1]]
    assert "every class" in rule.describe(10) and "true and the predicted" in rule.describe(100)
    assert explain.ALL_CLASSES_MAX == rule.max_all


def test_the_engine_imports_neither_matplotlib_nor_lightning() -> None:
    code = ("import sys, explain, explain.measures, explain.render; "
            "print([m for m in ('matplotlib', 'lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
