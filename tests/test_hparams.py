"""TensorBoard's HParams tab: each fit's options beside its final val/acc and shortcut
measures; and the end-of-fit message gives the TensorBoard command that shows every epoch."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import register_tiny_backbone, run_train, tiny_config
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks import HParamsSummary
from callbacks.hparams import MAX_MARGIN, METRICS, flatten
from lit_modules.data import CueConfig


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams(acc: EventAccumulator) -> tuple[list[str], dict[str, object]]:
    """The HParams experiment's metric tags and the session's hyperparameter values."""
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return [m.name.tag for m in experiment.metric_infos], values


def test_flatten_opens_configs_and_keeps_scalars() -> None:
    tree = {"model": {"lr": 0.05, "pretrained": False, "init_weights": None, "_private": 1},
            "data": {"class_path": "a.B", "init_args": {
                "cue": CueConfig(classes=[0, 1], size=8), "num_train": 64}}}
    flat = flatten(tree)
    assert flat["model/lr"] == 0.05 and flat["model/pretrained"] is False
    assert flat["model/init_weights"] == "None" and "model/_private" not in flat
    assert flat["data/class_path"] == "a.B" and flat["data/num_train"] == 64
    assert flat["data/cue/classes"] == "[0, 1]" and flat["data/cue/size"] == 8
    assert flat["data/cue/position"] == "top_left"


def _trainer(logger, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(callback_metrics=metrics, sanity_checking=False, is_global_zero=True,
                           loggers=[CSVLogger(logger.save_dir), logger], global_step=8,
                           state=SimpleNamespace(fn="fit"), datamodule=None)


def test_max_margin_is_the_last_validations_and_the_session_names_the_metrics(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    logger.log_metrics({"val/acc": 0.75}, step=7)
    stale = torch.tensor(0.9)  # a class tested at an earlier validation only
    metrics = {"explain/shortcuts/margin/cat": stale, "val/acc": torch.tensor(0.5)}
    trainer = _trainer(logger, metrics)
    module = SimpleNamespace(hparams={"lr": 0.05, "backbone": "resnet18_cifar"})
    callback = HParamsSummary({"seed_everything": 3})
    callback.on_validation_epoch_start(trainer, module)
    metrics.update({"explain/shortcuts/margin/dog": torch.tensor(0.3),
                    "explain/shortcuts/margin/cow": torch.tensor(0.4),
                    "val/acc": torch.tensor(0.75)})
    callback.on_validation_end(trainer, module)
    assert callback.metrics() == {MAX_MARGIN: pytest.approx(0.4)}  # not the stale 0.9
    callback.on_train_end(trainer, module)
    acc = _events(logger.log_dir)
    tags, values = _hparams(acc)
    assert tags == list(METRICS) and "val/acc" in tags
    assert values == {"model/lr": 0.05, "model/backbone": "resnet18_cifar",
                      "seed_everything": 3.0}
    (point,) = acc.Scalars(MAX_MARGIN)
    assert (point.step, point.value) == (7, pytest.approx(0.4))  # at val/acc's step
    assert [e.step for e in acc.Scalars("val/acc")] == [7]  # not logged a second time


def test_no_margin_no_max_margin_and_no_tensorboard_no_session(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = _trainer(logger, {"val/acc": torch.tensor(0.5)})
    module = SimpleNamespace(hparams={"lr": 0.1})
    callback = HParamsSummary()
    callback.on_validation_epoch_start(trainer, module)
    trainer.callback_metrics["explain/shortcuts/confirmed"] = torch.tensor(0.0)
    callback.on_validation_end(trainer, module)
    assert callback.metrics() == {}
    callback.on_train_end(trainer, module)
    acc = _events(logger.log_dir)
    assert MAX_MARGIN not in acc.Tags()["scalars"]  # no class tested: no number, not 0
    assert _hparams(acc)[0] == list(METRICS)
    written = {p: p.stat().st_size for p in tmp_path.rglob("events.*")}
    csv_only = SimpleNamespace(**{**vars(trainer), "loggers": [CSVLogger(tmp_path / "csv")]})
    callback.on_train_end(csv_only, module)  # nothing to write to, and no error
    assert {p: p.stat().st_size for p in tmp_path.rglob("events.*")} == written


def test_a_fit_writes_its_options_and_final_numbers_and_says_how_to_see_every_epoch(
        tmp_path, capsys) -> None:
    cfg = tiny_config(tmp_path, epochs=2, backbone=register_tiny_backbone(),
                      monitor={"discovery_per_class": 2})
    cli = run_train(["fit", "--config", str(cfg)])
    acc = _events(cli.trainer.log_dir)
    tags, values = _hparams(acc)
    assert tags == list(METRICS)
    # Options from the model, the data section (class and init_args, the cue opened) and
    # the seed, as the config gave them.
    assert values["model/lr"] == pytest.approx(0.05) and values["model/scheduler"] == "none"
    assert values["data/class_path"] == "lit_modules.data.SyntheticShapesDataModule"
    assert values["data/num_train"] == 64 and values["data/cue/classes"] == "[0, 1]"
    assert values["seed_everything"] == 0
    # The metrics' values are the run's own curves, each logged once per validation.
    steps = [e.step for e in acc.Scalars("val/acc")]
    assert len(steps) == len(set(steps)) == 2
    assert [e.step for e in acc.Scalars("explain/shortcuts/confirmed")] == steps
    # The end-of-fit message: TensorBoard keeps 10 image steps per tag without the flag.
    root = cli.trainer.logger.root_dir
    out = capsys.readouterr().out
    assert re.search(rf"Look at it with: +tensorboard --logdir {re.escape(str(root))} "
                     r"--samples_per_plugin images=0$", out, re.MULTILINE), out[-600:]
