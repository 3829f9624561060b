"""Removing a shortcut with no place: a filter (a colour cast) over every image of a class.

The planted cue: class 0 of 4 is cast towards magenta (a per-channel offset of every
pixel); the classes themselves differ by shape only (a horizontal bar, a vertical bar, a
square, a diagonal, equally bright in every channel), so a class's per-channel range
carries its cast and not its content. A tiny model learns the cast instead of the bar;
the counter-measures swap ranges where box removals swap pixels
(``shortcut_removal.filters``), and the range test (``causal.filter_test``) is the
transplant that must fall to the controls' level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from audit_report.removal import CONFIG_NAME, PIXELS_NAME, plan_removal, write_removal
from audit_report.sections.removal import ShortcutRemovalSection
from explain.measures import reliance
from explain.measures.causal import channel_ranges
from lit_modules import ImageClassifier
from lit_modules.shortcut_removal import Remover, ShortcutFilter, ShortcutRemoval
from tests.helpers import register_tiny_backbone, run_train, tiny_config
from tests.test_shortcut_removal import CLASSES, classifier
from tests.test_shortcut_removal import fit as fit_on

CAST = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1)
FILTERS = [{"class_index": 0, "class_name": "bar"}]


def cast_shapes(n: int, seed: int, cast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 16x16 noise images with a bright shape at a random place (class k: horizontal
    bar, vertical bar, square, diagonal); class 0's images cast by ``CAST`` when ``cast``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    at = torch.randint(1, 8, (n, 2), generator=g)
    for i in range(n):
        t, left = at[i].tolist()
        c = int(y[i])
        if c == 0:
            x[i, :, t + 3:t + 5, left:left + 8] += 1.5
        elif c == 1:
            x[i, :, t:t + 8, left + 3:left + 5] += 1.5
        elif c == 2:
            x[i, :, t + 2:t + 6, left + 2:left + 6] += 1.5
        else:
            for k in range(7):
                x[i, :, t + k, left + k] += 1.5
    if cast:
        x[y == 0] = x[y == 0] + CAST
    return x, y


def fit(model: ImageClassifier, epochs: int, seed: int) -> ImageClassifier:
    return fit_on(model, epochs, seed, data=cast_shapes)


def measured(model: ImageClassifier) -> reliance.Reliance:
    x, y = cast_shapes(256, 1)
    return reliance.measure_filter(model, x, y, 0)


@pytest.fixture(scope="module")
def cast_ckpt(tmp_path_factory) -> Path:
    """A tiny model that reads class 0's cast (its weights as a checkpoint file)."""
    torch.manual_seed(0)
    model = fit(classifier(), 5, 0)
    path = tmp_path_factory.mktemp("cast") / "base.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 4}, path)
    return path


@pytest.fixture(scope="module")
def fixed(cast_ckpt: Path):
    """Fine-tuned from the cast model, one per removal, made once."""
    made: dict = {}

    def get(method: str, epochs: int, **kw) -> ImageClassifier:
        key = (method, epochs, tuple(sorted(kw.items())))
        if key not in made:
            spec = {"filters": FILTERS, "method": method, **kw}
            made[key] = fit(classifier(init_weights=str(cast_ckpt), shortcut_removal=spec),
                            epochs, 1)
        return made[key]

    return get


def test_the_cast_is_a_shortcut_of_the_base_model(cast_ckpt: Path) -> None:
    model = classifier()
    model.load_state_dict(torch.load(cast_ckpt, weights_only=True)["state_dict"])
    before = measured(model.eval())
    assert before.verdict == "still there" and before.box is None
    assert before.transplant.kind == "filter" and before.transplant.margin.mean >= 0.8
    # The class's own images with another class's range are not recognised: the cast
    # stood in for the bar.
    assert before.class_accuracy_covered <= 0.1 < 0.9 <= before.class_accuracy


@pytest.mark.parametrize(("method", "epochs"), [("augment", 6), ("refit", 1)])
def test_swapping_ranges_removes_the_cast_where_a_no_op_fix_does_not(
        fixed, method: str, epochs: int) -> None:
    # The same fine-tuning with nothing swapped (p_paste = p_cover = 0) keeps the cast.
    noop = measured(fixed(method, epochs, p_paste=0.0, p_cover=0.0))
    after = measured(fixed(method, epochs))
    assert noop.verdict == "still there" and noop.transplant.margin.mean >= 0.8
    assert noop.class_accuracy_covered <= 0.2
    assert after.verdict != "still there", after
    assert after.transplant.margin.mean <= 0.2
    # The bars without their cast are recognised now (refit re-weighs the frozen
    # features, so it wins back less than six epochs of augment).
    assert after.class_accuracy_covered >= 0.5
    assert after.accuracy >= 0.75


def test_augment_lays_the_class_range_on_others_and_others_ranges_on_the_class() -> None:
    x, y = cast_shapes(400, 2)
    r = Remover(ShortcutRemoval(filters=[ShortcutFilter(0)], p_paste=0.3, p_cover=0.6))
    out = r.augment(x, y, step=11)
    assert torch.equal(out, r.augment(x, y, step=11))
    assert not torch.equal(out, r.augment(x, y, step=12))
    lo, span = channel_ranges(x)
    new_lo, new_span = channel_ranges(out)

    def has_range_of(i: int, pool: torch.Tensor) -> bool:
        return bool(((lo[pool] - new_lo[i]).abs().amax(1) < 1e-4).any())

    own, other = torch.nonzero(y == 0).flatten(), torch.nonzero(y != 0).flatten()
    changed = (out != x).flatten(1).any(1)
    pasted = torch.tensor([bool(changed[i]) and has_range_of(i, own) for i in other])
    covered = torch.tensor([bool(changed[i]) and has_range_of(i, other) for i in own])
    assert 0.2 < pasted.float().mean() < 0.4
    assert 0.5 < covered.float().mean() < 0.7
    assert not changed[own][~covered].any()
    # Images of the other classes that were not pasted are re-ranged at the cover's rate
    # too, so "re-ranged" says nothing of the label.
    seamed = changed[other][~pasted]
    assert 0.5 < seamed.float().mean() < 0.7
    # A range swap is per channel and linear: each image keeps its content.
    for i in torch.nonzero(changed).flatten()[:20].tolist():
        unit_before = (x[i] - lo[i][:, None, None]) / span[i][:, None, None]
        unit_after = (out[i] - new_lo[i][:, None, None]) / new_span[i][:, None, None]
        assert torch.allclose(unit_before, unit_after, atol=1e-3)
    assert (x[y == 0].mean((0, 2, 3)) - CAST.flatten()).abs().max() < 0.2  # input untouched


@pytest.mark.parametrize(("bad", "words"), [
    ({"filters": []}, "at least one shortcut"),
    ({"filters": FILTERS * 2}, "at most once in shortcut_removal.filters"),
    ({"filters": [{"class_index": -1}]}, "non-negative int"),
    ({"filters": FILTERS, "method": "penalty", "penalty_map": "input_gradient"},
     "a filter has none"),
])
def test_bad_filter_options_are_refused(bad: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ShortcutRemoval.coerce(bad)


def test_filter_options_survive_a_checkpoint_as_primitives(tmp_path: Path) -> None:
    spec = ShortcutRemoval.coerce({"filters": FILTERS, "shortcuts": [
        {"class_index": 1, "box": [0, 0, 4, 4]}], "method": "refit"})
    assert [f.class_index for f in spec.filters] == [0]
    assert len(spec.all_shortcuts()) == 2
    model = classifier(shortcut_removal=spec)
    path = tmp_path / "m.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams)}, path)
    loaded = torch.load(path, weights_only=True)["hyper_parameters"]["shortcut_removal"]
    assert ShortcutRemoval.coerce(loaded) == spec


def test_the_plan_for_a_filter_writes_no_pixels_and_train_follows_its_range(
        tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=1, backbone=register_tiny_backbone(),
                         trainer_args={"limit_train_batches": 1},
                         monitor={"discovery_per_class": 2})
    run_train(["fit", "--config", str(config)])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    cli = run_train(["--config", str(config)], run=False)
    suspects = [SimpleNamespace(index=2, class_name="triangle", kind="filter", box=None,
                                confirmed=True)]
    run = SimpleNamespace(ckpt_path=ckpt, config_path=config, meta={"epoch": 0})
    audit = SimpleNamespace(
        models=[SimpleNamespace(label="A", run=run,
                                results={"shortcuts": SimpleNamespace(suspects=suspects)})],
        data_run=SimpleNamespace(datamodule=cli.datamodule),
        settings=SimpleNamespace(split="test"))
    out = tmp_path / "audit"
    out.mkdir()
    plan = plan_removal(audit, out)
    assert plan is not None and plan.shortcuts == [] and plan.skipped == []
    assert plan.filters == [{"class_index": 2, "class_name": "triangle"}]
    write_removal(audit, plan, out)
    written = yaml.safe_load((out / CONFIG_NAME).read_text())
    removal = written["model"]["shortcut_removal"]
    assert removal["filters"] == plan.filters and removal["pixels"] is None
    assert not (out / PIXELS_NAME).exists() and plan.pixels_path == ""

    fine = run_train(["fit", "--config", str(config), "--config", str(out / CONFIG_NAME),
                      "--trainer.max_epochs", "1", "--trainer.logger.init_args.name", "fixed"])
    assert [f.class_index for f in fine.model.removal_config.filters] == [2]
    # The monitor tested the range from the starting weights on, as it does a box.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs" / "fixed").rglob("events.*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("explain/shortcuts/flips/triangle")][0] == 0


def test_the_before_after_section_judges_a_filter(cast_ckpt: Path, fixed) -> None:
    base = classifier()
    base.load_state_dict(torch.load(cast_ckpt, weights_only=True)["state_dict"])
    after = fixed("refit", 1)
    x, y = cast_shapes(256, 1)
    dataset = [{"image": x[i], "label": int(y[i])} for i in range(len(y))]
    audit = SimpleNamespace(
        settings=SimpleNamespace(split="test", discovery_images=64, seed=0, batch_size=256),
        data_run=SimpleNamespace(datamodule=SimpleNamespace(dataset=lambda split: dataset)),
        sample=SimpleNamespace(class_names=["<b>bar</b>", "vbar", "square", "diagonal"]),
        models=[SimpleNamespace(label=k, model=m.eval(), results={}, name=k)
                for k, m in zip("AB", (base, after), strict=True)])
    section = ShortcutRemovalSection()
    for m in audit.models:
        m.results[section.id] = section.compute(audit, m)
    before_r, after_r = (m.results[section.id] for m in audit.models)
    assert before_r.checks[0].box is None and before_r.checks[0].verdict == "still there"
    assert after_r.checks[0].verdict == "gone"
    found = section.findings(audit, audit.models[1], after_r)
    assert len(found) == 1 and not found[0].flag
    assert "no longer relies on its filter" in found[0].text
    html = section.render_all(SimpleNamespace(audit=audit))
    assert "a filter over the whole image" in html and "<b>bar</b>" not in html
    assert dataclasses.asdict(after_r)["checks"][0]["box"] is None
