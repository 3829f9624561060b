"""ExplanationMonitor: explain fixed validation images every epoch, log maps and numbers."""

from __future__ import annotations

import warnings
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor

import explain
from explain import records
from explain.measures import tracking
from lit_modules.data.protocol import is_auditable

from . import (
    fixed_images,
    monitor_epoch,
    monitor_explain,
    monitor_grid,
    monitor_scores,
    rank_zero,
    shortcut_watch,
)
from .tensorboard_layout import TAG_PREFIX, custom_scalars_layout, writer

#: Which class maps the grid shows. Typed as Literals, so a wrong value fails when the
#: config is parsed, naming the choices.
ClassMode = Literal["true", "predicted", "all"]
#: Which classes are explained (see ``ExplanationMonitor``'s ``explain_classes``).
ExplainClassMode = Literal["auto", "all", "shown"]
#: The shortcut tracker's searches the monitor can run (of ``tracking.KINDS``: ``cluster``
#: needs clusters the monitor does not compute).
ShortcutTest = Literal["box", "colour", "filter", "moving"]
CLASS_MODES: tuple[str, ...] = get_args(ClassMode)
EXPLAIN_CLASS_MODES: tuple[str, ...] = get_args(ExplainClassMode)


class ExplanationMonitor(Callback):
    """Explain a fixed, class-stratified set of validation images at each validation epoch end.

    For every method it logs the scalars ``explain/<method>/...`` through Lightning
    (``pl_module.log``), so every attached logger records them (TensorBoard, CSV, ...) at
    the step of ``val/acc``, and ``ModelCheckpoint`` or ``EarlyStopping`` can monitor them:

    * ``cue_energy/biased``: share of the true-class map's positive mass inside the cue
      patch, over fixed images that carry the cue (a rising curve = a shortcut forming);
    * ``cue_energy/clean``: the same share over images of classes without the cue, inside
      the patch's region (the baseline for "attention to that corner");
    * ``object_energy``: share inside the object mask (datasets with masks);
    * ``pointing_game``: how often the map's peak lies on the object;
    * ``drift``: ``1 - cosine`` similarity with the previous epoch's maps (from the second
      explained epoch on);
    * ``concentration``: ``1 - normalised entropy`` of the map (1 = a single pixel);
    * ``nan_maps``: fixed images whose map was not finite; the method's scores are NaN then;
    * ``hotspot_lift/<class>``: a shortcut *detector* (:mod:`explain.measures.discovery`):
      the best window of the class-mean true-class map, its mass over its area share (1 =
      an even map). A class without a usable map logs nothing that epoch (never NaN).

    The verdict on shortcuts is an experiment, not the lift (:mod:`callbacks.shortcut_watch`):
    every epoch, on ``shortcut_method``'s maps, each candidate class's hotspot (every class
    up to 16 classes) is cut from its fixed images and pasted onto other classes' fixed
    images, against two controls (each source's most salient window from elsewhere; the
    same place cut from other classes' images). A class is *confirmed* when its flips beat
    both controls with the whole 95% interval of the margin (paired per target, clustered
    by the source image pasted from) at or above 0.10; its
    box is then followed every epoch (confirmed while the interval is above zero and the
    margin >= 0.10) until the margin falls to the controls' level. Logged as
    ``explain/shortcuts/margin/<class>``, ``flips/<class>``, ``strongest_control/<class>``,
    ``is_confirmed/<class>`` and ``confirmed`` (the count), with a table per epoch in
    TensorBoard's text tab (``explain/shortcuts/summary``) and one console line when a
    shortcut is confirmed, goes or comes back. No test runs on an epoch whose fixed images
    are all predicted as one class.

    A class mean needs several images per class: with ``discovery_per_class`` (default 8)
    the fixed set grows to that many per class; the grid still shows the first
    ``num_images`` (one per class first), the scores use them all.

    A TensorBoardLogger also gets one image grid per method and epoch
    (``explain/<method>/grid``: every tile under a caption with its class, probability and
    the image's right/wrong, see :meth:`captions`; green when the image is predicted right,
    red when wrong) and a custom-scalars layout that puts each method's paired
    scores on one chart. Without one, a warning says so once; scalars still go to the other
    loggers and the raw maps of every epoch are still saved atomically to
    ``<log_dir>/explanations/`` (see :mod:`explain.records`).

    To monitor a score with ``ModelCheckpoint``, give both callbacks the same
    ``every_n_epochs``: Lightning stops a run whose monitored key was not logged.

    Args:
        methods: explanation method names (see ``explain.available()``).
        num_images: number of fixed validation images (stratified over classes, seeded).
        every_n_epochs: explain every n-th validation epoch.
        classes: which class maps the grid shows: ``true``, ``predicted`` or ``all``
            (YAML's unquoted ``true``, a boolean, means ``true``).
        explain_classes: ``all`` explains every class of every fixed image (drift is then
            over all classes); ``shown`` only the classes the scores and grid use (the true
            class, plus the predicted one in ``predicted`` mode), which for per-class
            methods such as saliency costs one or two backward passes instead of one per
            class; ``auto`` (the default) is ``all`` for up to
            ``explain.ALL_CLASSES_MAX`` (32) classes, else the true and predicted class of
            each image. The saved maps keep their ``[N, K, H, W]`` shape with the classes not
            explained left at zero (the record says which: ``explained``, and why:
            ``explained_rule``).
        layer: explanation layer (None: the backbone's declared layer).
        seed: seed of the image selection.
        upscale: nearest-neighbour enlargement of grid tiles.
        save_maps: write the raw maps of each epoch to disk.
        method_options: per-method engine options, e.g. ``{"scorecam": {"batch_size": 256}}``.
        discovery_per_class: fixed images per class for shortcut discovery (0: off).
        shortcut_method: whose maps propose the shortcut boxes (default: ``saliency`` when
            monitored, a pixel-level method that resolves a 4-pixel cue, else the first).
        shortcut_tests: what the search tries on each candidate class: ``box`` (a fixed
            place), ``colour`` (the class's colour statistics moved onto other images),
            ``filter`` (a class's per-channel range laid over other images: a tint or a
            cast), ``moving`` (each image's own hotspot, for a cue that changes place).
    """

    def __init__(
        self,
        methods: list[str] | None = None,
        num_images: int = 16,
        every_n_epochs: int = 1,
        classes: ClassMode | Literal[True] = "true",
        explain_classes: ExplainClassMode = "auto",
        layer: str | None = None,
        seed: int = 0,
        upscale: int = 4,
        save_maps: bool = True,
        method_options: dict[str, dict] | None = None,
        discovery_per_class: int = 8,
        shortcut_method: str | None = None,
        shortcut_tests: list[ShortcutTest] | None = None,
    ) -> None:
        super().__init__()
        self.methods = list(methods) if methods is not None else [explain.DEFAULT_METHOD]
        for m in self.methods:
            explain.get(m)  # unknown names fail here, listing the valid ones
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if classes is True:  # `classes: true` unquoted in YAML
            classes = "true"
        if classes not in CLASS_MODES:
            raise ValueError(f"classes must be one of {CLASS_MODES}, got {classes!r}")
        if explain_classes not in EXPLAIN_CLASS_MODES:
            raise ValueError(
                f"explain_classes must be one of {EXPLAIN_CLASS_MODES}, got {explain_classes!r}"
            )
        if discovery_per_class < 0:
            raise ValueError(f"discovery_per_class must be >= 0, got {discovery_per_class}")
        self.num_images = num_images
        self.discovery_per_class = discovery_per_class
        if shortcut_method is not None and shortcut_method not in self.methods:
            raise ValueError(f"shortcut_method {shortcut_method!r} is not among the monitored "
                             f"methods {self.methods}")
        self.shortcut_method = shortcut_method or (
            explain.DISCOVERY_METHOD if explain.DISCOVERY_METHOD in self.methods
            else self.methods[0])
        self.tracker = tracking.ShortcutTracker(
            shortcut_tests if shortcut_tests is not None else ["box"], seed=seed)
        self.every_n_epochs = every_n_epochs
        self.classes = classes
        self.explain_classes = "all" if classes == "all" else explain_classes
        self.layer = layer
        self.seed = seed
        self.upscale = upscale
        self.save_maps = save_maps
        self.method_options = method_options or {}
        self.indices: list[int] | None = None
        self._previous: dict[str, torch.Tensor] = {}
        self._batch: dict[str, torch.Tensor] | None = None
        self._warned_logger = False
        self._layout_written = False
        self._dir: str | None = None

    # -- state: primitives and tensors only, so checkpoints load with weights_only=True ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "indices": list(self.indices or []),
            "previous": {k: v.clone() for k, v in self._previous.items()},
            "seed": self.seed,
            "shortcuts": self.tracker.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.indices = list(state_dict["indices"]) or None
        self._previous = dict(state_dict.get("previous", {}))
        self.tracker.load_state_dict(list(state_dict.get("shortcuts", [])))
        self._batch = None

    # -- the fixed images (callbacks.fixed_images) ---------------------------------------
    def _fixed_batch(self, trainer: L.Trainer, device: torch.device) -> dict[str, torch.Tensor]:
        if self._batch is None:
            dataset = fixed_images.val_dataset(trainer)
            if self.indices is None:
                self.indices = fixed_images.pick_from(dataset, self.num_images,
                                                      self.discovery_per_class, self.seed)
            self._batch = fixed_images.load(dataset, self.indices)
        return {k: v.to(device) for k, v in self._batch.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return  # test and predict never reach on_validation_epoch_end
        # Every rank runs setup. trainer.log_dir is a collective (a broadcast), so it is read
        # here and never from the rank-zero-only explanation step, which would hang DDP.
        self._dir = self._log_dir(trainer)
        # The fixed images are a pure function of (labels, seed): every rank picks the same
        # ones. A restored state (resume) replaces them afterwards.
        if self.indices is None and is_auditable(trainer.datamodule):
            self.indices = fixed_images.pick_from(trainer.datamodule.dataset("val"),
                                                  self.num_images, self.discovery_per_class,
                                                  self.seed)
        # A run that removes shortcuts tests their boxes from its first epoch (a resumed
        # run's restored state comes later and keeps what the run saw since).
        removal = getattr(pl_module, "removal_config", None)
        for s in getattr(removal, "shortcuts", ()):
            self.tracker.follow(s.class_index, s.box)
        for f in getattr(removal, "filters", ()):
            self.tracker.follow(f.class_index, None)
        if removal is not None and self.discovery_per_class == 0:
            # The epoch's shortcut tests run with discovery only: with it off nothing
            # shows the shortcut leaving, and the user should hear it before the run.
            rank_zero_warn("the monitor will not test the shortcut removal's shortcuts after "
                           "each epoch: discovery_per_class is 0 (set it to 8, the "
                           "default, to see their margins fall in TensorBoard)")
        if trainer.world_size > 1:
            # Every rank logs rank zero's broadcast numbers unsynced (see rank_zero.share):
            # Lightning's advice to sync_dist them would only average identical values, one
            # collective each.
            warnings.filterwarnings(
                "ignore",
                message=rf"It is recommended to use `self\.log\('{TAG_PREFIX}/",
                category=PossibleUserWarning,
            )
        if trainer.is_global_zero and not self._layout_written:
            tb = self._tensorboard(trainer, warn=False)
            if tb is not None:
                # Written at every fit/validate start of this process: TensorBoard shows
                # the last layout of a run, so a resumed run that adds a method adds its charts.
                tb.add_custom_scalars(
                    custom_scalars_layout(self.methods, self.discovery_per_class > 0))
                self._layout_written = True

    # -- the hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run that removes known shortcuts gets a "before" point at step 0: the followed
        boxes tested on the starting weights, so TensorBoard shows their margins fall."""
        known = [f for f in self.tracker.followed.values() if f.since < 0]
        if not known or trainer.global_step != 0 or not trainer.is_global_zero:
            return
        batch = self._fixed_batch(trainer, pl_module.device)
        images, labels = batch["image"], batch["label"].long()
        with explain.eval_mode(pl_module), torch.no_grad():
            logits = pl_module(images.clone()).float()
        preds = logits.argmax(-1)
        maps, classes = self._explain(pl_module, images, self.shortcut_method,
                                      bool(torch.isfinite(logits).all()), labels, preds,
                                      logits.shape[-1])
        if maps is None or not torch.isfinite(maps).all():
            return
        true_maps = records.class_maps(maps, classes, labels).float()
        verdict = shortcut_watch.baseline(self.tracker, pl_module, images, labels.cpu(),
                                          preds.cpu(), true_maps, logits.shape[-1])
        shortcut_watch.log_before(verdict, fixed_images.class_names(trainer, logits.shape[-1]),
                                  trainer.loggers, self._tensorboard(trainer, warn=False))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        scalars: dict[str, float] | None = None
        failure: Exception | None = None
        # Only rank zero explains: the engine runs no collective, so no rank can wait on it.
        if trainer.is_global_zero:
            try:
                scalars = self.explain_epoch(trainer, pl_module)
            except Exception as exc:
                if trainer.world_size == 1:
                    raise
                failure = exc  # raised after the broadcast, which the other ranks are in
        # Outside the rank-zero branch: every rank reaches this same call.
        scalars = rank_zero.share(trainer, scalars, failure)
        if failure is not None:
            raise failure
        # Lightning's own logging: every logger gets the numbers, at val/acc's step, and
        # ModelCheckpoint/EarlyStopping can monitor them. No sync_dist: the values are
        # already the same on every rank.
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, sync_dist=False, batch_size=1)

    def explain_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Explain the fixed images, draw the grids, save the maps; return the scalars
        (:func:`callbacks.monitor_epoch.explain_epoch`).

        ``{"explain/<method>/<score>": value}``: what :meth:`on_validation_epoch_end` logs.
        Runs on one process (rank zero); calls no collective. Leaves the model as found.
        """
        return monitor_epoch.explain_epoch(self, trainer, pl_module)

    # -- the steps, each in its own module ------------------------------------------------
    def explained(self, num_classes: int) -> tuple[str, str]:
        """Which classes are explained, and why (:func:`callbacks.monitor_explain.explained`)."""
        return monitor_explain.explained(self.explain_classes, self.classes, num_classes)

    def _explain(self, pl_module: L.LightningModule, images: Tensor, method: str,
                 finite_logits: bool, labels: Tensor, preds: Tensor, num_classes: int,
                 ) -> tuple[Tensor | None, Tensor | None]:
        """``(maps, classes)`` of ``method`` with this monitor's layer, options and class
        rule (:func:`callbacks.monitor_explain.class_maps`)."""
        options = {"layer": self.layer, **self.method_options.get(method, {})}
        return monitor_explain.class_maps(
            pl_module, images, method, options, self.explained(num_classes)[0],
            finite_logits, labels, preds, num_classes)

    def _scalars(self, method: str, maps: Tensor | None, classes: Tensor | None,
                 labels: Tensor, batch: dict[str, Tensor]) -> dict[str, float]:
        """The scores of one method's maps (:func:`callbacks.monitor_scores.scores`), drift
        against this method's last finite maps, which it then replaces."""
        out, keep = monitor_scores.scores(maps, classes, labels, batch,
                                          self._previous.get(method))
        if keep is not None:
            self._previous[method] = keep
        return out

    def _grid(self, trainer: L.Trainer, images: Tensor, maps: Tensor, classes: Tensor | None,
              labels: Tensor, preds: Tensor, probs: Tensor) -> Tensor:
        """The grid image (:func:`callbacks.monitor_grid.grid`)."""
        return monitor_grid.grid(
            fixed_images.denormalize(trainer, images), maps, classes, labels, preds, probs,
            fixed_images.class_names(trainer, probs.shape[-1]), self.classes, self.upscale)

    #: Every grid tile's caption lines (:func:`callbacks.monitor_grid.captions`).
    captions = staticmethod(monitor_grid.captions)

    # -- plumbing -----------------------------------------------------------------------
    @staticmethod
    def _log_dir(trainer: L.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _tensorboard(self, trainer: L.Trainer, warn: bool = True) -> Any:
        """The first TensorBoardLogger's writer, or None (with a warning, once)."""
        tb = writer(trainer)
        if tb is not None:
            return tb
        if warn and not self._warned_logger:
            self._warned_logger = True
            others = ", ".join(type(lg).__name__ for lg in trainer.loggers) or "none"
            warnings.warn(
                "ExplanationMonitor: no TensorBoardLogger attached, so no heatmap grids are "
                f"logged (scalars go to the attached loggers: {others}); raw maps are still "
                f"saved under {records.explanations_dir(self._dir or self._log_dir(trainer))}",
                UserWarning,
                stacklevel=2,
            )
        return None
