"""ExplanationMonitor: explain fixed validation images every epoch, log maps and numbers."""

from __future__ import annotations

import warnings
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

import explain
from explain import records, render
from explain.measures import discovery, map_scores, tracking
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices

from . import shortcut_watch
from .tensorboard_layout import SHORTCUTS, TAG_PREFIX, custom_scalars_layout, scalar_tag

#: Which class maps the grid shows. Typed as Literals, so a wrong value fails when the
#: config is parsed, naming the choices.
ClassMode = Literal["true", "predicted", "all"]
#: Which classes are explained (see ``ExplanationMonitor``'s ``explain_classes``).
ExplainClassMode = Literal["auto", "all", "shown"]
#: The shortcut tracker's searches the monitor can run (of ``tracking.KINDS``: ``cluster``
#: needs clusters the monitor does not compute).
ShortcutTest = Literal["box", "colour", "moving"]
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
    both controls with the whole 95% paired interval of the margin at or above 0.10; its
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
            ``moving`` (each image's own hotspot, for a cue that changes place).
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
        self.methods = list(methods) if methods is not None else ["gradcam"]
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
            "saliency" if "saliency" in self.methods else self.methods[0])
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

    # -- selection ----------------------------------------------------------------------
    @staticmethod
    def _val_dataset(trainer: L.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "dataset"):
            return dm.dataset("val")
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        return loader.dataset

    def _pick(self, labels: torch.Tensor) -> list[int]:
        """The fixed images: ``num_images`` for the grid, grown to ``discovery_per_class``
        a class for shortcut discovery. Stratified round robin, so the first ``num_images``
        are the same with or without discovery."""
        n = max(self.num_images, self.discovery_per_class * len(torch.unique(labels)))
        return stratified_indices(labels, n, self.seed)

    def _fixed_batch(self, trainer: L.Trainer, device: torch.device) -> dict[str, torch.Tensor]:
        if self._batch is None:
            dataset = self._val_dataset(trainer)
            if self.indices is None:
                self.indices = self._pick(dataset_labels(dataset))
            self._batch = sample_batch(dataset, self.indices)
        return {k: v.to(device) for k, v in self._batch.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return  # test and predict never reach on_validation_epoch_end
        # Every rank runs setup. trainer.log_dir is a collective (a broadcast), so it is read
        # here and never from the rank-zero-only explanation step, which would hang DDP.
        self._dir = self._log_dir(trainer)
        # The fixed images are a pure function of (labels, seed): every rank picks the same
        # ones. A restored state (resume) replaces them afterwards.
        dm = trainer.datamodule
        if self.indices is None and dm is not None and hasattr(dm, "dataset"):
            self.indices = self._pick(dataset_labels(dm.dataset("val")))
        # A run that removes shortcuts tests their boxes from its first epoch (a resumed
        # run's restored state comes later and keeps what the run saw since).
        removal = getattr(pl_module, "removal_config", None)
        for s in getattr(removal, "shortcuts", ()):
            self.tracker.follow(s.class_index, s.box)
        if trainer.world_size > 1:
            # Every rank logs rank zero's broadcast numbers unsynced (see _share): Lightning's
            # advice to sync_dist them would only average identical values, one collective each.
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

    # -- the work -----------------------------------------------------------------------
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
        if true_maps.shape[-2:] != images.shape[-2:]:
            true_maps = torch.nn.functional.interpolate(
                true_maps.unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear",
                align_corners=False).squeeze(1)
        norm, usable = discovery.normalise_maps(true_maps)
        verdict = self.tracker.baseline(pl_module, images.detach().cpu(), labels.cpu(),
                                        preds.cpu(), norm, usable, logits.shape[-1])
        names = self._class_names(trainer, logits.shape[-1])
        scalars = shortcut_watch.verdict_scalars(verdict, names)
        for line in shortcut_watch.before_line(verdict, names):
            rank_zero_warn(line)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=0)
        tb = self._tensorboard(trainer, warn=False)
        if tb is not None:
            tb.add_text(scalar_tag(SHORTCUTS, "summary"),
                        tracking.summary_markdown(verdict, names), 0)

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
        scalars = self._share(trainer, scalars, failure)
        if failure is not None:
            raise failure
        # Lightning's own logging: every logger gets the numbers, at val/acc's step, and
        # ModelCheckpoint/EarlyStopping can monitor them. No sync_dist: the values are
        # already the same on every rank.
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, sync_dist=False, batch_size=1)

    @staticmethod
    def _share(
        trainer: L.Trainer, scalars: dict[str, float] | None, failure: Exception | None
    ) -> dict[str, float]:
        """Rank zero's scalars on every rank (one broadcast under DDP, nothing otherwise).

        Every rank must log them: ModelCheckpoint runs on every rank, raises where its
        monitored key is missing, and decides with the other ranks whether to save, so all
        ranks need the same value. Rank zero's are broadcast rather than computed on every
        rank, because each rank's BatchNorm statistics move with its own last batch (the
        values would differ slightly, and the ranks could disagree on the best checkpoint),
        and an expensive method would cost every device the time. A failure on rank zero is
        broadcast too, so the other ranks stop instead of waiting forever.
        """
        if trainer.world_size == 1:
            return scalars or {}
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        scalars, message = trainer.strategy.broadcast((scalars, message), src=0)
        if message is not None and not trainer.is_global_zero:
            raise RuntimeError(f"ExplanationMonitor failed on global rank 0: {message}")
        return scalars or {}

    def explain_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Explain the fixed images, draw the grids, save the maps; return the scalars.

        ``{"explain/<method>/<score>": value}``: what :meth:`on_validation_epoch_end` logs.
        Runs on one process (rank zero); calls no collective. Leaves the model as found
        (train/eval flags, BatchNorm statistics, ``.grad``, hooks, the RNG stream).
        """
        batch = self._fixed_batch(trainer, pl_module.device)
        images, labels = batch["image"], batch["label"].long()
        with explain.eval_mode(pl_module), torch.no_grad():  # eval mode: BN stats stay
            logits = pl_module(images.clone()).float()
        probs = logits.softmax(-1)
        preds = probs.argmax(-1)
        n = len(images)
        finite_logits = bool(torch.isfinite(logits).all())
        record: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "indices": torch.tensor(self.indices),
            "labels": labels.cpu(),
            "probs": probs.cpu(),
            "maps": {},
            "scalars": {},
            "nan_maps": {},
        }
        record["explained"], record["explained_rule"] = self.explained(logits.shape[-1])
        tb = self._tensorboard(trainer)
        out: dict[str, float] = {}
        for method in self.methods:
            maps, classes = self._explain(
                pl_module, images, method, finite_logits, labels, preds, logits.shape[-1]
            )
            # Images whose map is not finite (a diverged or poisoned model): counted and
            # logged, never drawn or scored (their scores are NaN), and training goes on.
            bad = int((~torch.isfinite(maps).flatten(1).all(1)).sum()) if maps is not None else n
            record["nan_maps"][method] = bad
            out[scalar_tag(method, "nan_maps")] = float(bad)
            if bad:
                rank_zero_warn(
                    f"ExplanationMonitor: {method} gave non-finite maps for {bad} of {n} fixed "
                    f"images at epoch {trainer.current_epoch} (does the model output NaN?); "
                    "no grid or scores this epoch"
                )
                maps = None
            scalars = self._scalars(method, maps, classes, labels.cpu(), batch)
            true_maps = None if maps is None else records.class_maps(maps, classes, labels)
            names = self._class_names(trainer, logits.shape[-1])
            lifts, hotspots = ({}, None) if not self.discovery_per_class else (
                shortcut_watch.lift_scores(true_maps, labels.cpu(), names))
            scalars.update(lifts)
            if method == self.shortcut_method and hotspots is not None:
                verdict = shortcut_watch.run_tracker(
                    self.tracker, trainer.current_epoch, pl_module, images, labels.cpu(),
                    preds.cpu(), true_maps, hotspots, logits.shape[-1])
                out.update(shortcut_watch.verdict_scalars(verdict, names))
                shortcut_watch.announce(verdict, names, method)
                if tb is not None:
                    tb.add_text(scalar_tag(SHORTCUTS, "summary"),
                                tracking.summary_markdown(verdict, names),
                                self._image_step(trainer))
            out.update({scalar_tag(method, k): v for k, v in scalars.items()})
            if maps is None:
                continue
            record["maps"][method] = maps.half()
            if classes is not None:
                record.setdefault("map_classes", {})[method] = classes
            record["scalars"][method] = scalars
            if tb is not None:
                g = min(self.num_images, n)  # the grid shows the first num_images
                tb.add_image(
                    scalar_tag(method, "grid"),
                    self._grid(trainer, images[:g], maps[:g],
                               None if classes is None else classes[:g], labels[:g], preds[:g],
                               probs[:g]),
                    self._image_step(trainer),
                )
                if hotspots is not None:
                    followed = (self.tracker.followed if method == self.shortcut_method
                                else {})
                    tb.add_image(scalar_tag(method, "hotspots"), shortcut_watch.hotspot_image(
                        true_maps.float(), labels.cpu(), hotspots, logits.shape[-1], followed,
                        self.upscale), self._image_step(trainer))
        if self.save_maps:
            folder = self._dir or self._log_dir(trainer)
            records.save_fixed_images(folder, self._fixed_record(trainer, batch))
            records.save_epoch(folder, record)
        return out

    def explained(self, num_classes: int) -> tuple[str, str]:
        """Which classes are explained for ``num_classes`` classes, and why.

        ``("all", ...)`` or the class mode whose classes alone are explained (``true``, or
        ``predicted``: the true and the predicted class), with a sentence for the record.
        """
        if self.explain_classes == "all":
            return "all", "explain_classes=all" if self.classes != "all" else "classes=all"
        if self.explain_classes == "shown":
            return self.classes, "explain_classes=shown: the classes the grid shows"
        limit = explain.ALL_CLASSES_MAX
        if num_classes <= limit:
            return "all", f"explain_classes=auto: {num_classes} classes <= {limit}, all"
        return "predicted", (
            f"explain_classes=auto: {num_classes} classes > {limit}, only the true and "
            "predicted class of each image"
        )

    def _explain(
        self,
        pl_module: L.LightningModule,
        images: torch.Tensor,
        method: str,
        finite_logits: bool,
        labels: torch.Tensor,
        preds: torch.Tensor,
        num_classes: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(maps, classes)`` on the CPU; maps None when a non-finite model broke the method.

        Unless every class is explained (:meth:`explained`), only the true (and the
        predicted) class of each image is. Up to ``explain.ALL_CLASSES_MAX`` classes the maps
        are ``[N, K, H, W]`` with the other classes zero and ``classes`` None; beyond, only
        the explained maps ``[N, T, H, W]`` and their classes ``[N, T]`` (a zero-filled
        array of 1,000 classes at 224 x 224 takes gigabytes).
        """
        options = {"layer": self.layer, **self.method_options.get(method, {})}
        mode = self.explained(num_classes)[0]
        try:
            with warnings.catch_warnings():
                # The engine warns about non-finite maps; the monitor reports them itself.
                warnings.filterwarnings("ignore", message=".*non-finite values")
                if mode == "all":
                    return explain.run(pl_module, images, method, **options).cpu(), None
                wanted = [labels] + ([preds] if mode == "predicted" else [])
                targets = torch.stack(wanted, 1)  # [N, T]: one call shares the forwards
                some = explain.run(pl_module, images, method, targets=targets, **options).cpu()
                if num_classes > explain.ALL_CLASSES_MAX:
                    return some, targets.cpu()
                n = len(images)
                maps = some.new_zeros(n, num_classes, *some.shape[-2:])
                for t in range(targets.shape[1]):
                    maps[torch.arange(n), targets[:, t].cpu()] = some[:, t]
                return maps, None
        except (RuntimeError, ValueError):
            if finite_logits:
                raise  # a real failure of the method, not a symptom of NaN weights
            return None, None  # e.g. an SVD that can not converge on NaN activations

    def _scalars(
        self,
        method: str,
        maps: torch.Tensor | None,
        classes: torch.Tensor | None,
        labels: torch.Tensor,
        batch: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """The scores of one method's maps (``classes``: see :meth:`_explain`); NaN for each
        when ``maps`` is None (non-finite), so the same keys are logged every epoch.

        Which scores exist depends on the fixed images only (a cue, object masks) and on a
        previous epoch's maps for ``drift``: a monitored score never goes missing because
        one epoch's maps were broken.
        """
        nan = float("nan")
        true_maps = records.class_maps(maps, classes, labels) if maps is not None else None

        def score(fn: Any) -> float:
            return nan if true_maps is None else map_scores.nanmean(fn(true_maps))

        out: dict[str, float] = {}
        cue = batch.get("cue_mask")
        if cue is not None:
            cue = cue.cpu()
            carries = cue.flatten(1).any(1)
            if carries.any():
                out["cue_energy/biased"] = score(
                    lambda m: map_scores.energy_in_mask(m[carries], cue[carries])
                )
                region = cue[carries].any(0)  # where the patch sits (fixed-position cues)
                clean = ~carries
                if clean.any():
                    out["cue_energy/clean"] = score(
                        lambda m: map_scores.energy_in_mask(m[clean], region.expand_as(cue[clean]))
                    )
        obj = batch.get("object_mask")
        if obj is not None and obj.any():
            obj = obj.cpu()
            out["object_energy"] = score(lambda m: map_scores.energy_in_mask(m, obj))
            out["pointing_game"] = score(lambda m: map_scores.pointing_game(m, obj))
        # Drift over every class's map, or with only some explained beyond ALL_CLASSES_MAX
        # classes over the true class's (the predicted class may change between epochs).
        now = maps if classes is None else true_maps
        prev = self._previous.get(method)
        if prev is not None and (now is None or prev.shape == now.shape):
            out["drift"] = nan if now is None else map_scores.nanmean(
                map_scores.drift(now.flatten(0, now.dim() - 3), prev.float().flatten(
                    0, prev.dim() - 3))
            )
        out["concentration"] = score(map_scores.concentration)
        if now is not None:  # drift is measured against the last finite maps
            self._previous[method] = now.half()
        return out

    @staticmethod
    def _class_names(trainer: L.Trainer, num_classes: int) -> list[str]:
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
        return names if len(names) == num_classes else [str(c) for c in range(num_classes)]

    def _grid(
        self,
        trainer: L.Trainer,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor | None,
        labels: torch.Tensor,
        preds: torch.Tensor,
        probs: torch.Tensor,
    ) -> torch.Tensor:
        """The grid image: each fixed image, then its map(s), every tile under a caption
        (:meth:`captions`)."""
        images01 = self._denormalize(trainer, images).cpu()
        labels, preds, probs = labels.cpu(), preds.cpu(), probs.cpu().float()
        ok = preds == labels
        n, k = maps.shape[:2]
        if self.classes == "all":
            # Scale by each image's peak over all classes so strong and weak classes differ.
            # (Beyond explain.ALL_CLASSES_MAX classes with only some explained, the columns
            # are the explained maps: the true, then the predicted class.)
            shown = render.normalize_maps(maps, dims=(-3, -2, -1))
            overlays = render.overlay(
                images01.repeat_interleave(k, 0), shown.flatten(0, 1)
            ).view(n, k, *images01.shape[1:])
            tiles = torch.cat([render.frame(images01, ok)[:, None], overlays], 1).flatten(0, 1)
            ncol = k + 1
            map_classes = (torch.arange(k).expand(n, k) if classes is None
                           else classes.cpu().long())
        else:
            pick = labels if self.classes == "true" else preds
            shown = render.normalize_maps(records.class_maps(maps, classes, pick))
            overlays = render.overlay(images01, shown)
            tiles = torch.stack([render.frame(images01, ok), overlays], 1).flatten(0, 1)
            ncol = 8
            map_classes = pick[:, None]
        tiles = render.upscale(tiles.clamp(0, 1), self.upscale)
        texts = self.captions(self._class_names(trainer, probs.shape[-1]), labels, preds,
                              probs, map_classes, render.caption_marks(
                                  render.caption_size(tiles.shape[-1])))
        colours = torch.tensor([render.CAPTION_RIGHT if right else render.CAPTION_WRONG
                                for right in ok.tolist()]).repeat_interleave(len(tiles) // n, 0)
        return render.grid(render.caption(tiles, texts, colours), ncol=ncol)

    @staticmethod
    def captions(
        names: list[str],
        labels: torch.Tensor,
        preds: torch.Tensor,
        probs: torch.Tensor,
        map_classes: torch.Tensor,
        marks: tuple[str, str] = ("ok", "x"),
    ) -> list[list[str]]:
        """Every grid tile's caption lines, in the grid's order (per image: the image, then
        one tile per ``map_classes[i]`` entry).

        The image tile: its true class, then the mark (``marks``: right, wrong) with the
        probability of the true class when predicted right (``cat`` / ``ok 0.82``), or the
        probability and name of the predicted class when wrong (``cat`` / ``x 0.61 dog``: a
        name too long for the tile loses its end, never the number). A map tile: the class
        its map explains, then the image's mark and that class's probability (``cat`` /
        ``x 0.20``).
        """
        out: list[list[str]] = []
        for i, (y, p) in enumerate(zip(labels.tolist(), preds.tolist(), strict=True)):
            right = y == p
            mark = marks[0] if right else marks[1]
            verdict = (f"{mark} {probs[i, y]:.2f}" if right
                       else f"{mark} {probs[i, p]:.2f} {names[p]}")
            out.append([names[y], verdict])
            out.extend([names[c], f"{mark} {probs[i, c]:.2f}"] for c in map_classes[i].tolist())
        return out

    # -- plumbing -----------------------------------------------------------------------
    @staticmethod
    def _denormalize(trainer: L.Trainer, images: torch.Tensor) -> torch.Tensor:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "denormalize"):
            return dm.denormalize(images).clamp(0, 1)
        lo = images.amin((1, 2, 3), keepdim=True)
        hi = images.amax((1, 2, 3), keepdim=True)
        return (images - lo) / (hi - lo).clamp_min(1e-12)

    def _fixed_record(self, trainer: L.Trainer, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        dm = trainer.datamodule
        return {
            "indices": torch.tensor(self.indices),
            "images": (self._denormalize(trainer, batch["image"]).cpu() * 255).round().byte(),
            "labels": batch["label"].cpu(),
            "object_mask": batch.get("object_mask", torch.zeros(0)).cpu(),
            "cue_mask": batch.get("cue_mask", torch.zeros(0)).cpu(),
            "class_names": list(getattr(dm, "class_names", []) or []),
            "methods": list(self.methods),
        }

    @staticmethod
    def _image_step(trainer: L.Trainer) -> int:
        """The step Lightning logs this validation's metrics at, for the grids.

        While fitting, Lightning logs a validation at the index of the last training batch
        that stepped the optimiser, which is ``global_step - 1`` for this project's one
        optimiser (the scalars get it from Lightning itself); ``trainer.validate`` logs at
        ``global_step``. Sharing it puts the grids on ``val/acc``'s x positions and lets a
        resumed run purge exactly the lost steps.
        """
        fitting = trainer.state.fn == "fit"
        return max(trainer.global_step - (1 if fitting else 0), 0)

    @staticmethod
    def _log_dir(trainer: L.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _tensorboard(self, trainer: L.Trainer, warn: bool = True) -> Any:
        """The first TensorBoardLogger's writer, or None (with a warning, once)."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
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
