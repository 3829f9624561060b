"""Train an image classifier while watching what it looks at.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/resnet18_cifar10.yaml --data.root /path/to/cifar10
    python train.py --help          # every option, from the classes' signatures

Subcommands: fit, validate, test, predict (LightningCLI). The resolved config is saved as
``config.yaml`` next to the TensorBoard logs; ``audit.py`` reads it back. ``predict
--ckpt_path CKPT`` writes ``predictions.pt`` and ``predictions.csv`` into the log directory.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks import (
    AtomicCheckpointIO,
    ExactResume,
    HParamsSummary,
    InterruptCheckpoint,
    PredictionWriter,
)
from explain import records
from lit_modules import ImageClassifier
from lit_modules.data.cue import FLAT_KEYS, flat_keys_hint
from lit_modules.exit_status import HelpFormatter, exit_status_help
from lit_modules.resume import ResumeError, plan_resume

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
#: What ``tensorboard`` needs to show every epoch's image grids (it samples 10 otherwise).
TENSORBOARD_FLAGS = "--samples_per_plugin images=0"
_FLAT_CUE_KEY = re.compile(r"\b(" + "|".join(FLAT_KEYS) + r")\b")


def old_cue_values(message: str) -> dict[str, object]:
    """The old flat cue options (``cue_classes``, ...) a parser error mentions, with their
    values where the message shows them (``...`` where it does not).

    jsonargparse ends such an error with ``Given value: <repr>``: the data section's dict
    for a YAML config, ``NestedArg(key='cue_classes', val=[3, 5])`` for a command-line flag.
    """
    found: dict[str, object] = {k: ... for k in _FLAT_CUE_KEY.findall(message)}
    given = re.search(r"Given value: (.*)$", message, re.MULTILINE)
    if not found or given is None:
        return found
    text = given.group(1).strip()
    nested = re.fullmatch(r"NestedArg\(key='(\w+)', val=(.*)\)", text)
    try:
        if nested is not None:
            pairs = {nested.group(1): ast.literal_eval(nested.group(2))}
        else:
            value = ast.literal_eval(text)
            pairs = value.get("init_args", value) if isinstance(value, dict) else {}
    except (ValueError, SyntaxError):  # not a literal: keep the keys without values
        return found
    found.update((k, v) for k, v in pairs.items() if k in FLAT_KEYS)
    return found


class TrainParser(LightningArgumentParser):
    """LightningCLI's parser, with the new spelling appended to errors about old options."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Nested parsers (one per class in the config) raise instead of exiting, and the
        # parser that exits repeats their message: only that one adds the hint, once.
        values = old_cue_values(message) if self.exit_on_error else {}
        if values:
            message = f"{message.rstrip()}\n{flat_keys_hint(values)}"
        super().error(message, ex)


class TrainCLI(LightningCLI):
    """LightningCLI that resumes into the same run, saves on interrupts and says where
    everything went when fitting ends.

    * checkpoints are loaded with ``weights_only=True`` unless ``--weights_only false``;
    * ``fit --ckpt_path last`` resumes the newest ``last.ckpt``/``interrupted.ckpt`` of the
      configured run and fails with a clear message when there is none (Lightning would
      warn and start from scratch); a resumed run logs into its checkpoint's run directory;
    * every fit gets an :class:`~callbacks.InterruptCheckpoint` (SIGTERM, Ctrl-C, errors),
      and checkpoints are written atomically (:class:`~callbacks.AtomicCheckpointIO`);
    * every fit gets an :class:`~callbacks.ExactResume` (the global RNGs seeded per
      training step, the loader's position restored), so a resumed fit ends with the
      uninterrupted one's weights;
    * every fit gets an :class:`~callbacks.HParamsSummary`: its options in TensorBoard's
      HParams tab with its final ``val/acc`` and shortcut measures;
    * ``predict`` writes ``predictions.pt`` and ``predictions.csv`` into the run's log
      directory (:class:`~callbacks.PredictionWriter`) unless the config has a writer.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then resolve ``fit --ckpt_path`` before LightningCLI opens the checkpoint
        (it reads hyperparameters from it right after parsing)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        cfg = self.config[subcommand]
        if "weights_only" in cfg and cfg["weights_only"] is None:
            cfg["weights_only"] = True
        resuming = subcommand == "fit" and cfg.get("ckpt_path") is not None
        for entry in self._tensorboard_entries(cfg["trainer"], resuming):
            # The TensorBoardLogger's hp_metric is a -1 placeholder (meant to be
            # overwritten by log_hyperparams(metrics=...), which nothing here calls): a
            # meaningless curve on every run's scalars page.
            entry["init_args"]["default_hp_metric"] = False
        if resuming:
            self._plan_resume(cfg)

    def _plan_resume(self, cfg: Any) -> None:
        trainer = cfg["trainer"]
        logger = self._tensorboard_config(trainer)
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        save_dir = name = version = None
        if logger is not None:
            args = logger["init_args"]
            save_dir = Path(args.get("save_dir") or root)
            name = args.get("name") or ""
            version = args.get("version")
            version = f"version_{version}" if isinstance(version, int) else version
        try:
            plan = plan_resume(
                str(cfg["ckpt_path"]), save_dir, name, version, self._checkpoint_dirs(trainer, root)
            )
        except ResumeError as exc:
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from exc
        cfg["ckpt_path"] = str(plan.ckpt_path)
        if logger is not None:
            args = logger["init_args"]
            if plan.version is not None:
                args["version"] = plan.version
            if args.get("purge_step") is None:
                # Lightning logs batch k at step k, so the checkpoint's global_step is the
                # first step the resumed run logs: TensorBoard drops the killed run's events
                # from there on and no curve shows a step twice.
                args["purge_step"] = plan.global_step
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            print(  # once, not once per DDP process
                f"Resuming from {plan.ckpt_path} (epoch {plan.epoch}, step {plan.global_step})",
                file=sys.stderr,
                flush=True,
            )

    @classmethod
    def _tensorboard_config(cls, trainer: Any) -> Any:
        """The first TensorBoardLogger entry of the trainer config, or None."""
        entries = cls._tensorboard_entries(trainer)
        return entries[0] if entries else None

    @staticmethod
    def _tensorboard_entries(trainer: Any, resuming: bool = False) -> list[Any]:
        """The TensorBoardLogger entries of the trainer config.

        A config that leaves the logger at Lightning's default (``logger: true``) gets that
        default spelled out (TensorBoard in ``<default_root_dir>/lightning_logs``, and for a
        new run the SLURM job id as version under SLURM, as Lightning would; a resume
        picks the version from its checkpoint instead), so that train.py can configure it.
        """
        logger = trainer.get("logger")
        if logger is None or logger is True:
            from jsonargparse import Namespace
            from lightning.fabric.plugins.environments import SLURMEnvironment

            logger = Namespace(
                class_path=TENSORBOARD,
                init_args=Namespace(
                    save_dir=trainer.get("default_root_dir") or os.getcwd(),
                    name="lightning_logs",
                    version=None if resuming else SLURMEnvironment.job_id(),
                    purge_step=None,
                ),
            )
            trainer["logger"] = logger
        if logger is False:
            return []
        entries = logger if isinstance(logger, list) else [logger]
        return [e for e in entries if getattr(e, "class_path", None) == TENSORBOARD]

    @staticmethod
    def _checkpoint_dirs(trainer: Any, root: Path) -> list[Path]:
        """Explicit ModelCheckpoint folders and the no-logger default ``<root>/checkpoints``."""
        folders = [root / "checkpoints"]
        for cb in trainer.get("callbacks") or []:
            dirpath = getattr(getattr(cb, "init_args", None), "dirpath", None)
            if dirpath:
                folders.append(Path(dirpath))
        return folders

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand in (None, "fit") and not any(
            isinstance(cb, InterruptCheckpoint) for cb in trainer.callbacks
        ):
            trainer.callbacks.append(InterruptCheckpoint())
        if self.subcommand in (None, "fit") and not any(
            isinstance(cb, ExactResume) for cb in trainer.callbacks
        ):
            # Global RNGs seeded per step, the loader's position handed back: a resumed
            # fit repeats the uninterrupted one (Lightning saves no RNG state).
            trainer.callbacks.append(ExactResume())
        if self.subcommand in (None, "fit") and not any(
            isinstance(cb, HParamsSummary) for cb in trainer.callbacks
        ):
            # TensorBoard's HParams tab: this run's options beside its final val/acc and
            # shortcut measures (the model's own hyperparameters come from the model).
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer.callbacks.append(HParamsSummary(
                {"data": cfg.get("data"), "seed_everything": cfg.get("seed_everything")}))
        if self.subcommand == "predict" and not any(
            isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks
        ):
            trainer.callbacks.append(PredictionWriter())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _check_class_count(self) -> None:
        """Refuse a model whose output size is not the data's class count, before any step.

        More classes than outputs crash mid-epoch on the first out-of-range label; fewer
        train a head with dead outputs. Either is a config mistake that costs a run.
        """
        outputs = getattr(self.model, "hparams", {}).get("num_classes")
        names = getattr(self.datamodule, "class_names", None)
        if outputs is None or names is None or len(names) == outputs:
            return
        shown = ", ".join(map(str, names[:12])) + (", ..." if len(names) > 12 else "")
        print(
            f"train.py: error: the model has {outputs} outputs but the data has "
            f"{len(names)} classes ({shown}); set --model.num_classes {len(names)} (or "
            "model.num_classes in the config)",
            file=sys.stderr, flush=True,
        )
        raise SystemExit(2)

    def before_fit(self) -> None:
        self._check_class_count()

    def before_validate(self) -> None:
        self._check_class_count()

    def before_test(self) -> None:
        self._check_class_count()

    def before_predict(self) -> None:
        self._check_class_count()

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # argparse takes any unique prefix of an option, so a typo such as
        # --trainer.max_epoch would quietly set max_epochs: every key must be spelled out.
        kwargs.setdefault("allow_abbrev", False)
        # The exit statuses, the same table as audit.py's, end every parser's --help.
        kwargs.setdefault("epilog", exit_status_help())
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().init_parser(**kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        log_dir = os.path.abspath(log_dir or trainer.default_root_dir)
        lines = ["", "Training finished."]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            if ckpt.best_model_path:
                lines.append(f"  best checkpoint : {os.path.abspath(ckpt.best_model_path)}")
            if getattr(ckpt, "last_model_path", ""):
                lines.append(f"  last checkpoint : {os.path.abspath(ckpt.last_model_path)}")
        lines.append(f"  logs and config : {log_dir}")
        maps = str(records.explanations_dir(log_dir))
        if os.path.isdir(maps):
            lines.append(f"  explanation maps: {maps}")
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is not None:
            root = os.path.abspath(tb.root_dir)
            # Without --samples_per_plugin TensorBoard keeps 10 random steps of each image
            # tag: the grids of most epochs would be missing from the slider.
            lines.append(f"Look at it with:  tensorboard --logdir {shlex.quote(root)} "
                         f"{TENSORBOARD_FLAGS}")
        if ckpt is not None and ckpt.best_model_path:
            best = shlex.quote(os.path.abspath(ckpt.best_model_path))
            lines.append(f"Audit it with:    python audit.py --ckpt {best}")
        print("\n".join(lines), flush=True)


PREDICT_HELP = (
    "Predict the datamodule's predict split (the test split, or the validation split with "
    "--data.init_args.predict_split val) with a trained model: "
    "python train.py predict --config CONFIG --ckpt_path CKPT. Writes predictions.pt "
    "(index, label, pred, probs, class_names) and predictions.csv (index, label, pred, "
    "confidence, one probability per class) atomically into the run's log directory; "
    "add callbacks.PredictionWriter with output_dir to the trainer's callbacks to choose "
    "another folder."
)


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Build the CLI (``run=False`` only instantiates, which the config tests use)."""
    return TrainCLI(
        ImageClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_class=TrainParser,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"predict": {"description": PREDICT_HELP}},
        args=args,
        run=run,
    )


def close_process_group() -> None:
    """Tear torch.distributed down before the interpreter exits.

    Lightning leaves the process group open; left to interpreter shutdown, a gloo run
    that had finished its fit was seen to abort ("terminate called without an active
    exception", status -6) in CI. Destroying the group is local, never a collective.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        # No args: LightningCLI reads sys.argv itself. Passing sys.argv[1:] as ``args`` made
        # it warn on every run that it was given both args and command-line arguments.
        main()
    except SIGTERMException:
        # Lightning ends a SIGTERMed fit with a bare SystemExit (status 0); a scheduler or
        # a shell script should see that the run was terminated, not that it finished.
        sys.exit(128 + signal.SIGTERM)
    finally:
        close_process_group()
