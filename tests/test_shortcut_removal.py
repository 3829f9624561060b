"""Removing a confirmed shortcut by fine-tuning: the counter-measures, the plan the audit
writes, and the before/after section's verdicts.

The planted cue: a bright 4x4 box in the corner of every image of class 0 (of 4 classes,
each told apart by a faint coloured blob at a random place). A tiny model learns the box;
each counter-measure must take the transplant margin from high to the controls' level,
where the same fine-tuning without a counter-measure leaves it high.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from audit_report.removal import CONFIG_NAME, PIXELS_NAME, plan_removal, write_removal
from audit_report.sections.removal import ShortcutRemovalSection, removal_spec
from explain.measures import reliance
from lit_modules import ImageClassifier
from lit_modules.shortcut_removal import (
    PixelsError,
    Remover,
    ShortcutBox,
    ShortcutRemoval,
    load_pixels,
    save_pixels,
)
from tests.helpers import register_tiny_backbone, run_train, tiny_config

BOX = (0, 0, 4, 4)
CLASSES = 4


def blobs(n: int, seed: int, cue: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 16x16 noise images, class k marked by a faint blob (channel k, or dark for 3)
    at a random place; class 0 also carries the bright box ``BOX`` when ``cue``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    corners = torch.randint(4, 12, (n, 2), generator=g)
    for i in range(n):
        t, left = corners[i].tolist()
        c = int(y[i])
        if c < 3:
            x[i, c, t:t + 4, left:left + 4] += 1.5
        else:
            x[i, :, t:t + 4, left:left + 4] -= 1.5
    if cue:
        x0, y0, x1, y1 = BOX
        x[y == 0, :, y0:y1, x0:x1] = 3.0
    return x, y


def fit(model: ImageClassifier, epochs: int, seed: int, data=None) -> ImageClassifier:
    """``epochs`` of training on 512 images of ``data(n, seed)`` (default :func:`blobs`)."""
    L.seed_everything(seed, verbose=False)
    x, y = (data or blobs)(512, 0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    return model.eval()


def classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(backbone=register_tiny_backbone(), num_classes=CLASSES,
                           optimizer="adamw", lr=0.01, scheduler="none", **kwargs)


def measured(model: ImageClassifier) -> reliance.Reliance:
    x, y = blobs(256, 1)
    return reliance.measure(model, x, y, 0, BOX)


@pytest.fixture(scope="module")
def shortcut_ckpt(tmp_path_factory) -> Path:
    """A tiny model that reads the box (its weights as a checkpoint file)."""
    torch.manual_seed(0)
    model = fit(classifier(), 5, 0)
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 4}, path)
    return path


def removal(method: str, **kw) -> dict:
    return {"shortcuts": [{"class_index": 0, "box": list(BOX)}], "method": method, **kw}


@pytest.fixture(scope="module")
def fine_tuned(shortcut_ckpt: Path):
    """Models fine-tuned from the shortcut model for 3 epochs, one per removal, made once:
    ``fine_tuned(None)`` is the same fine-tuning without a counter-measure."""
    made: dict = {}

    def get(method: str | None, **kw) -> ImageClassifier:
        key = (method, tuple(sorted(kw.items())))
        if key not in made:
            spec = None if method is None else removal(method, **kw)
            made[key] = fit(classifier(init_weights=str(shortcut_ckpt),
                                       shortcut_removal=spec), 3, 1)
        return made[key]

    return get


def test_the_planted_box_is_a_shortcut_of_the_base_model(shortcut_ckpt: Path) -> None:
    model = classifier()
    model.load_state_dict(torch.load(shortcut_ckpt, weights_only=True)["state_dict"])
    before = measured(model.eval())
    assert before.verdict == "still there"
    assert before.transplant.margin.mean >= 0.5
    # Its own images without the box's content are not recognised: the box stood in for
    # the class.
    assert before.class_accuracy_covered <= 0.2 < before.class_accuracy


@pytest.mark.parametrize("method", ["augment", "penalty", "both", "refit"])
def test_each_counter_measure_removes_the_box_where_plain_fine_tuning_does_not(
        fine_tuned, method: str) -> None:
    plain = measured(fine_tuned(None))
    fixed = measured(fine_tuned(method))
    assert plain.verdict == "still there" and plain.transplant.margin.mean >= 0.5
    assert fixed.verdict == "gone", fixed
    assert fixed.transplant.margin.mean <= 0.05
    # The images the box was hiding are recognised now, and nothing else was lost.
    assert fixed.class_accuracy_covered >= 0.8
    assert fixed.accuracy >= plain.accuracy - 0.02


def test_the_input_gradient_penalty_is_rrr_and_reaches_the_weights() -> None:
    torch.manual_seed(0)
    model = classifier(shortcut_removal=removal("penalty", penalty_map="input_gradient",
                                                penalty_weight=2.0))
    model.setup("fit")
    x, y = blobs(8, 3)
    x = x.requires_grad_(True)
    logits = model(x)
    value = model.remover.penalty(model, x, y, logits, 0)
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1).sum(), x, create_graph=True)
    expected = 2.0 * grad[:, :, 0:4, 0:4].pow(2).sum() / 8
    assert torch.allclose(value, expected)
    value.backward()  # a double backward reaches the weights
    assert model.backbone.classifier.weight.grad.abs().sum() > 0


def test_augment_pastes_and_covers_at_the_rates_asked_and_repeats_per_step() -> None:
    x, y = blobs(400, 2)
    bank = torch.full((5, 3, 4, 4), 7.0)
    r = Remover(ShortcutRemoval([ShortcutBox(0, BOX)], p_paste=0.3, p_cover=0.6), {0: bank})
    out = r.augment(x, y, step=11)
    assert torch.equal(out, r.augment(x, y, step=11))
    assert not torch.equal(out, r.augment(x, y, step=12))
    box = out[:, :, 0:4, 0:4]
    pasted = (box == 7.0).flatten(1).all(1)
    assert not pasted[y == 0].any()
    assert 0.2 < pasted[y != 0].float().mean() < 0.4
    covered = (box != 3.0).flatten(1).any(1) & (y == 0)
    assert 0.5 < covered[y == 0].float().mean() < 0.7
    # Covers come from other classes' original boxes, never from the pasted bank.
    assert not pasted[covered].any()
    # Other classes' images that were not pasted get a cover at the same rate: the seam
    # of a cover says nothing of the label.
    seamed = (box != x[:, :, 0:4, 0:4]).flatten(1).any(1) & (y != 0) & ~pasted
    assert 0.5 < seamed[(y != 0) & ~pasted].float().mean() < 0.7
    # Outside the box nothing changes, and the input is untouched.
    assert torch.equal(out[:, :, 4:], x[:, :, 4:])
    assert (x[y == 0, :, 0:4, 0:4] == 3.0).all()


def test_two_classes_sharing_a_cue_are_never_covered_with_each_other() -> None:
    """Classes 0 and 1 carry the same bright box (as the quickstart's circle and square):
    a cover taken from the other shortcut class would put the cue back."""
    x, y = blobs(400, 4)
    x[y == 1, :, 0:4, 0:4] = 3.0
    r = Remover(ShortcutRemoval([ShortcutBox(0, BOX), ShortcutBox(1, BOX)], p_paste=0.0,
                                p_cover=1.0))
    out = r.augment(x, y, step=3)
    boxes = out[(y == 0) | (y == 1), :, 0:4, 0:4]
    assert not (boxes == 3.0).flatten(1).all(1).any()  # every carrier's cue is gone


def test_without_a_pixels_file_the_box_comes_from_the_class_in_the_batch() -> None:
    x, y = blobs(64, 2)
    r = Remover(ShortcutRemoval([ShortcutBox(0, BOX)], p_paste=1.0, p_cover=0.0))
    out = r.augment(x, y, step=0)
    assert (out[y != 0, :, 0:4, 0:4] == 3.0).all()


@pytest.mark.parametrize(("bad", "words"), [
    ({"shortcuts": []}, "at least one shortcut"),
    ({"shortcuts": [{"class_index": 0, "box": [4, 0, 2, 4]}]}, "x0 < x1"),
    ({"shortcuts": [{"class_index": 0, "box": [0, 0, 4]}]}, "4 ints"),
    ({"shortcuts": [{"class_index": 0, "box": list(BOX)}] * 2}, "one box per class"),
    (removal("retrain"), "method must be one of"),
    (removal("penalty", penalty_map="lrp"), "penalty_map must be one of"),
    (removal("augment", p_paste=1.5), "p_paste must be in [0, 1]"),
    (removal("augment", class_weight=0), "class_weight must be > 0"),
    (removal("refit", refit_l2=-1), "refit_l2 must be >= 0"),
    ({**removal("augment"), "weight": 1}, "unknown shortcut_removal option"),
])
def test_bad_removal_options_are_refused_naming_the_fix(bad: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ShortcutRemoval.coerce(bad)


def test_class_weight_weights_the_shortcut_classes_loss_and_nothing_else() -> None:
    """The training loss is the class-weighted cross-entropy (a weighted mean), and with
    weight 1 exactly the unweighted one."""
    torch.manual_seed(0)
    x, y = blobs(32, 3)
    plain, weighted = (classifier(shortcut_removal=removal("augment", p_paste=0.0,
                                                           p_cover=0.0, class_weight=w))
                       for w in (1.0, 4.0))
    weighted.load_state_dict(plain.state_dict())
    for m in (plain, weighted):
        m.remover = Remover.from_config(m.removal_config)
        m.log = lambda *a, **k: None  # outside a Trainer
    assert plain.remover.loss_weights(CLASSES) is None
    assert weighted.remover.loss_weights(CLASSES).tolist() == [4.0, 1.0, 1.0, 1.0]
    logits = plain(x)
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([4.0, 1, 1, 1]))
    assert torch.allclose(weighted.training_step((x, y), 0), expected, atol=1e-6)
    assert torch.allclose(plain.training_step((x, y), 0),
                          torch.nn.functional.cross_entropy(logits, y), atol=1e-6)
    assert not torch.allclose(expected, torch.nn.functional.cross_entropy(logits, y))


def test_options_survive_a_checkpoint_as_primitives(tmp_path: Path) -> None:
    spec = ShortcutRemoval.coerce(removal("both", penalty_weight=3.0))
    assert ShortcutRemoval.coerce(spec.as_dict()) == spec
    model = classifier(shortcut_removal=spec)
    path = tmp_path / "m.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams)}, path)
    loaded = torch.load(path, weights_only=True)["hyper_parameters"]["shortcut_removal"]
    assert ShortcutRemoval.coerce(loaded) == spec


def test_the_pixels_file_round_trips_and_anything_else_is_refused(tmp_path: Path) -> None:
    pix = torch.rand(6, 3, 4, 4)
    path = save_pixels(tmp_path / PIXELS_NAME, {0: pix}, {0: BOX})
    box, back = load_pixels(path)[0]
    assert box == BOX and torch.equal(back, pix)

    evil = tmp_path / "evil.pt"
    torch.save({"format": "camlight-shortcut-pixels", "version": 1,
                "entries": [SimpleNamespace(x=1)]}, evil)
    with pytest.raises(PixelsError, match="not plain tensors"):
        load_pixels(evil)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(PixelsError, match="not a shortcut pixels file"):
        load_pixels(other)
    torch.save({"format": "camlight-shortcut-pixels", "version": 1,
                "entries": [{"class_index": 0, "box": [0, 0, 4, 4],
                             "pixels": torch.rand(2, 3, 5, 5)}]}, other)
    with pytest.raises(PixelsError, match="do not fit its box"):
        load_pixels(other)
    spec = ShortcutRemoval([ShortcutBox(0, (0, 0, 6, 6))], pixels=str(path))
    with pytest.raises(PixelsError, match="not of"):
        Remover.from_config(spec)


def _planned_audit(ckpt: Path, config: Path, dm) -> SimpleNamespace:
    """The parts of an AuditRun the plan reads: a first model with a confirmed box."""
    suspects = [SimpleNamespace(index=0, class_name="circle", kind="box", box=[0, 0, 8, 8],
                                confirmed=True),
                SimpleNamespace(index=3, class_name="plus", kind="moving", box=None,
                                confirmed=True)]
    run = SimpleNamespace(ckpt_path=ckpt, config_path=config, meta={"epoch": 1})
    model = SimpleNamespace(label="A", run=run,
                            results={"shortcuts": SimpleNamespace(suspects=suspects)})
    return SimpleNamespace(models=[model], data_run=SimpleNamespace(datamodule=dm),
                           settings=SimpleNamespace(split="test"))


def test_the_plan_proposes_a_quarter_of_the_training_within_its_bounds() -> None:
    from audit_report.removal import MAX_EPOCHS, MIN_EPOCHS, proposed_epochs
    assert proposed_epochs(None) == MIN_EPOCHS == 4
    assert proposed_epochs(4) == 4 and proposed_epochs(30) == 8
    assert proposed_epochs(200) == MAX_EPOCHS == 10


def test_the_plan_fine_tunes_from_the_audited_weights_not_the_optimizer(tmp_path: Path,
                                                                         ) -> None:
    config = tiny_config(tmp_path, epochs=2, backbone=register_tiny_backbone(),
                         trainer_args={"limit_train_batches": 1},
                         monitor={"discovery_per_class": 2})
    run_train(["fit", "--config", str(config)])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1
    cli = run_train(["--config", str(config)], run=False)
    out = tmp_path / "audit"
    out.mkdir()
    audit = _planned_audit(ckpt, config, cli.datamodule)
    plan = plan_removal(audit, out)
    assert plan is not None and plan.skipped == ["plus"]
    write_removal(audit, plan, out)
    written = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert written["model"]["init_weights"] == str(ckpt)
    # A 2-epoch model: a quarter of it is under the floor of 4 epochs.
    assert written["trainer"]["max_epochs"] == plan.epochs == 4
    box, pixels = load_pixels(out / PIXELS_NAME)[0]
    assert box == (0, 0, 8, 8) and pixels.shape[1:] == (3, 8, 8)
    # The magenta patch of the tiny config's cue is what was cut: (1, 0, 1) in [0, 1].
    shown = cli.datamodule.denormalize(pixels)
    assert torch.allclose(shown[:, :, :4, :4].mean((0, 2, 3)), torch.tensor([1.0, 0, 1.0]),
                          atol=1e-4)
    assert f"--config {out / CONFIG_NAME}" in plan.command

    # The command as the report prints it, for one epoch here.
    fine = run_train(["fit", "--config", str(config), "--config", str(out / CONFIG_NAME),
                      "--trainer.max_epochs", "1",
                      "--trainer.logger.init_args.name", "fixed"])
    model = fine.model
    assert model.remover is not None and 0 in model.remover.bank
    ckpts = sorted((tmp_path / "runs" / "fixed").rglob("last.ckpt"))
    after = torch.load(ckpts[-1], weights_only=True)
    assert after["epoch"] == 0  # a fresh epoch counter: not a resume
    assert after["hyper_parameters"]["shortcut_removal"]["shortcuts"][0]["box"] == [0, 0, 8, 8]
    # The monitor tested the box on the starting weights: a "before" point at step 0.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs" / "fixed").rglob("events.*"))))
    events.Reload()
    before = events.Scalars("explain/shortcuts/flips/circle")
    assert before[0].step == 0 and len(before) == 2  # before, and after epoch 0
    # One step from the audited weights: close to them, and not equal.
    moved = [(after["state_dict"][k].float() - v.float()).abs().max().item()
             for k, v in saved["state_dict"].items() if v.is_floating_point()]
    assert 0 < max(moved) < 1.0

    # The quick alternative as the report prints it: one epoch of refit moves the head only.
    from lit_modules.shortcut_projection import last_linear

    args = shlex.split(plan.quick_command)[2:]  # after "python train.py"
    assert args[-4:] == ["--model.shortcut_removal.method", "refit", "--trainer.max_epochs", "1"]
    quick = run_train([*args, "--trainer.logger.init_args.name", "quick"])
    refitted = torch.load(sorted((tmp_path / "runs" / "quick").rglob("last.ckpt"))[-1],
                          weights_only=True)["state_dict"]
    head, _ = last_linear(quick.model)
    assert {k for k, v in saved["state_dict"].items()
            if not torch.equal(v, refitted[k])} == {f"{head}.weight", f"{head}.bias"}


def test_the_before_after_section_judges_a_fixed_and_an_unfixed_model(
        shortcut_ckpt: Path, fine_tuned) -> None:
    fixed = fine_tuned("augment")
    # A removal that does nothing (no paste, no cover): the shortcut must read "still there".
    unfixed = fine_tuned("augment", p_paste=0.0, p_cover=0.0)
    base = classifier()
    base.load_state_dict(torch.load(shortcut_ckpt, weights_only=True)["state_dict"])
    x, y = blobs(256, 1)
    dataset = [{"image": x[i], "label": int(y[i])} for i in range(len(y))]
    dm = SimpleNamespace(dataset=lambda split: dataset)
    names = ["zero", "one", "two", "three"]

    def audit_of(*models):
        audit = SimpleNamespace(
            settings=SimpleNamespace(split="test", discovery_images=64, seed=0, batch_size=256),
            data_run=SimpleNamespace(datamodule=dm), sample=SimpleNamespace(class_names=names),
            models=[SimpleNamespace(label=k, model=m.eval(), results={}, name=k)
                    for k, m in zip("AB", models, strict=False)])
        return audit

    section = ShortcutRemovalSection()
    for after, expected in ((fixed, "gone"), (unfixed, "still there")):
        audit = audit_of(base, after)
        assert removal_spec(audit) is not None
        before_r, after_r = (section.compute(audit, m) for m in audit.models)
        assert not before_r.fixed and after_r.fixed
        assert before_r.checks[0].verdict == "still there"
        assert after_r.checks[0].verdict == expected
        found = section.findings(audit, audit.models[1], after_r)
        assert len(found) == 1 and found[0].flag == (expected != "gone")
        assert ("no longer relies" in found[0].text) == (expected == "gone")
        assert section.findings(audit, audit.models[0], before_r) == []
        record = dataclasses.asdict(after_r)
        assert record["checks"][0]["cls"] == "zero"


HOSTILE = '<img src=x onerror=alert(1)>'


def test_the_removal_html_escapes_class_names_and_paths(shortcut_ckpt: Path,
                                                        fine_tuned) -> None:
    from audit_report.removal import RemovalPlan
    from audit_report.sections.shortcuts import _removal_note

    x, y = blobs(256, 1)
    dataset = [{"image": x[i], "label": int(y[i])} for i in range(len(y))]
    base = classifier()
    base.load_state_dict(torch.load(shortcut_ckpt, weights_only=True)["state_dict"])
    names = [HOSTILE, 'a & "b"', "</figcaption><script>", "three"]
    audit = SimpleNamespace(
        settings=SimpleNamespace(split="test", discovery_images=64, seed=0, batch_size=256),
        data_run=SimpleNamespace(datamodule=SimpleNamespace(dataset=lambda split: dataset)),
        sample=SimpleNamespace(class_names=names),
        models=[SimpleNamespace(label=k, model=m.eval(), results={}, name=f"{k} {HOSTILE}")
                for k, m in zip("AB", (base, fine_tuned("augment")), strict=True)])
    section = ShortcutRemovalSection()
    for m in audit.models:
        m.results[section.id] = section.compute(audit, m)
    html = section.render_all(SimpleNamespace(audit=audit))
    plan = RemovalPlan("A", [{"class_index": 0, "box": [0, 0, 4, 4], "class_name": HOSTILE}],
                       2, "augment", f"/tmp/{HOSTILE}/remove_shortcuts.yaml", "/tmp/p.pt",
                       f"python train.py fit --config '/tmp/{HOSTILE}'", "val", [names[2]],
                       filters=[{"class_index": 1, "class_name": names[1] + HOSTILE}])
    html += _removal_note(plan)
    for bad in (HOSTILE, "<script>", "</figcaption>"):
        assert bad not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "no longer relies" in html
    assert "per-channel range laid over" in html  # the filter's part of the plan's note


@pytest.mark.parametrize("data_path", ["classic", "fast"])
def test_augment_acts_on_the_batches_of_either_data_path(data_path: str) -> None:
    from lit_modules.data import SyntheticShapesDataModule

    dm = SyntheticShapesDataModule(
        num_train=128, num_val=20, num_test=20, batch_size=32, seed=0, data_path=data_path,
        cue={"classes": [0], "size": 8, "p_train": 1.0, "p_eval": 1.0})
    model = ImageClassifier(backbone=register_tiny_backbone(), num_classes=10,
                            shortcut_removal={"shortcuts": [{"class_index": 0,
                                                             "box": [0, 0, 8, 8]}]})
    seen = []
    model.setup("fit")
    augment = model.remover.augment

    def recording(images, labels, step):
        out = augment(images, labels, step)
        seen.append((labels.cpu(), out.detach().cpu()))
        return out

    model.remover.augment = recording
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    labels = torch.cat([y for y, _ in seen])
    images = torch.cat([x for _, x in seen])
    assert len(labels) == 128
    magenta = dm.normalize(torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 8, 8))
    has_patch = (images[:, :, :8, :8] - magenta).abs().flatten(1).amax(1) < 1e-4
    # The cue now appears about as often on other classes' images as on the class's own.
    assert 0.3 < has_patch[labels != 0].float().mean() < 0.7
    assert 0.2 < has_patch[labels == 0].float().mean() < 0.8


def test_audit_compares_a_repeated_ckpt_instead_of_keeping_the_last() -> None:
    from audit import parse_args

    settings = parse_args(["--ckpt", "before.ckpt", "--ckpt", "after.ckpt",
                           "--train_config", "a.yaml", "--train_config=b.yaml"])
    assert settings.ckpt == ["before.ckpt", "after.ckpt"]
    assert settings.train_config == ["a.yaml", "b.yaml"]
    assert parse_args(["--ckpt", "a.ckpt", "--ckpt+", "b.ckpt"]).ckpt == ["a.ckpt", "b.ckpt"]


def test_a_monitor_without_discovery_images_says_it_will_not_follow_the_boxes(
        tmp_path: Path) -> None:
    """The epochs' box tests need the discovery images: without them the user is told at
    the start of the run."""
    config = tiny_config(tmp_path, epochs=1, backbone=register_tiny_backbone(),
                         trainer_args={"limit_train_batches": 1, "limit_val_batches": 1},
                         model={"shortcut_removal": {"shortcuts": [
                             {"class_index": 0, "box": [0, 0, 8, 8]}]}},
                         monitor={"discovery_per_class": 0})
    with pytest.warns(UserWarning, match="will not test the shortcut removal's shortcuts"):
        run_train(["fit", "--config", str(config)])


def test_the_projection_removes_the_box_without_training_and_folds_into_the_head(
        shortcut_ckpt: Path) -> None:
    """P-ClArC: the cue's direction in the head's input, projected out and folded into the
    last Linear, takes the planted box's transplant to the controls with no training."""
    from lit_modules.shortcut_projection import (
        fit_projection,
        fold_projection,
        head_inputs,
        last_linear,
    )

    model = classifier()
    model.load_state_dict(torch.load(shortcut_ckpt, weights_only=True)["state_dict"])
    model.eval()
    before = measured(model)
    x, y = blobs(128, 2)  # "validation" images: not those the measure uses
    projection = fit_projection(model, x, y, [ShortcutBox(0, BOX)], seed=0)
    assert projection.directions.shape[1] == 1
    test_x, _ = blobs(64, 3)
    _, head = last_linear(model)
    with torch.no_grad():
        h = head_inputs(model, test_x)
        v, z = projection.directions, projection.levels
        projected = head(h - (h @ v - z) @ v.T)
    fold_projection(model, projection)
    with torch.no_grad():
        folded = model(test_x)
    assert torch.allclose(folded, projected, atol=1e-4)  # the fold is the projection
    after = measured(model)
    assert before.transplant.margin.mean >= 0.5
    assert after.transplant.margin.mean <= 0.15, after
    # It takes away what the box gave and nothing else: the other three classes keep
    # their accuracy, while class 0, which the model knew only by the box (0% with it
    # covered), is lost. Winning a class back takes training (the fine-tuning test above).
    assert before.class_accuracy_covered <= 0.2
    assert after.class_accuracy <= 0.2
    assert after.accuracy >= before.accuracy - 1 / CLASSES - 0.02


def test_init_weights_that_do_not_fit_are_refused_naming_the_file(tmp_path: Path) -> None:
    from lit_modules.checkpoint_file import CheckpointError

    other = ImageClassifier(backbone=register_tiny_backbone(), num_classes=CLASSES + 1)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"init_weights '.*other\.ckpt' does not fit "
                                              r"this model \(.*, 4 classes\)"):
        classifier().load_init_weights(path)
    torch.save({"state_dict": {"w": [1, 2]}}, path)
    with pytest.raises(CheckpointError, match="has no 'state_dict' of tensors"):
        classifier().load_init_weights(path)


def test_refit_moves_only_the_head_and_leaves_the_backbone_as_it_was(
        shortcut_ckpt: Path, fine_tuned) -> None:
    """``refit`` takes no optimizer step: every weight and BatchNorm statistic but the last
    Linear's is the audited checkpoint's, and the head is what moved."""
    from lit_modules.shortcut_projection import last_linear

    before = torch.load(shortcut_ckpt, weights_only=True)["state_dict"]
    after = fine_tuned("refit").state_dict()
    head, _ = last_linear(fine_tuned("refit"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{head}.weight", f"{head}.bias"}


def test_fit_head_reaches_the_regularised_optimum_from_any_start() -> None:
    """The re-fit is a convex problem solved to convergence: from the current head or from
    another start it lands on the same weights, where the gradient vanishes."""
    from lit_modules.head_refit import FeatureBank, fit_head

    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=g) + torch.nn.functional.one_hot(y, 8).float() * 2
    heads = [torch.nn.Linear(8, 3) for _ in range(2)]
    with torch.no_grad():
        heads[1].weight.mul_(50)  # a bad start
    for head in heads:
        fit_head(head, x, y, l2=1e-2)
    assert torch.allclose(heads[0].weight, heads[1].weight, atol=1e-3)
    w = heads[0].weight.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + heads[0].bias.detach(), y) \
        + 1e-2 * w.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-3
    with pytest.raises(ValueError, match="takes 8 features"):
        fit_head(heads[0], x[:, :5], y)
    bank = FeatureBank(max_rows=250)
    for lo in range(0, 300, 100):
        bank.add(x[lo:lo + 100], y[lo:lo + 100])
    rows, labels = bank.take()
    assert rows.shape == (250, 8) and torch.equal(labels, y[:250]) and bank.rows == 0
    with pytest.raises(ValueError, match="no features"):
        bank.take()
