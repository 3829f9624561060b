"""What an audit holds while it runs: per model its maps, results and findings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_modules.loading import LoadedRun

from . import files
from .cache import ResultCache
from .findings import Finding
from .sample import Sample
from .settings import AuditSettings, method_options

SCHEMA_VERSION = 3  # 2: sections as typed results; the counterfactual test has a control;
# 3: a verdict and findings as records (audit_report/metrics.schema.json); shortcuts by test


@dataclass
class MethodMaps:
    """One method's explanation of the sample, computed once and shared by every section."""

    method: str
    family: str
    class_specific: bool
    status: str = "ok"  # or "error"
    error: str | None = None
    seconds: float | None = None
    cached: bool = False  # taken from an earlier audit's cache
    true_maps: Tensor | None = None  # [N, H, W], true class
    pred_maps: Tensor | None = None  # [N, H, W], predicted class
    # [show, K, H, W], every class of the shown images; None when the data has more than
    # explain.ALL_CLASSES_MAX classes (then only the true and predicted class are explained)
    shown_all: Tensor | None = None


@dataclass
class ModelAudit:
    """One checkpoint under audit: its model, predictions, maps and section results."""

    label: str  # "A" or "B"
    run: LoadedRun
    probs: Tensor  # [N, K] on the sample
    methods: dict[str, MethodMaps] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # section id -> typed result
    findings: list[Finding] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    @property
    def preds(self) -> Tensor:
        return self.probs.argmax(1)

    def ok_maps(self) -> dict[str, MethodMaps]:
        """The methods whose maps were computed and finite."""
        return {m: mm for m, mm in self.methods.items() if mm.status == "ok"}


@dataclass
class AuditRun:
    """Everything one audit knows: settings, the shared sample, the models, the results."""

    settings: AuditSettings
    sample: Sample
    data_run: LoadedRun
    models: list[ModelAudit]
    progress: Any  # a tqdm bar (disabled when quiet)
    created: str = ""
    command: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # cross-model sections
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION
    cache: ResultCache | None = None

    def cache_parts(self, model: ModelAudit, method: str, **extra: Any) -> dict[str, Any]:
        """What determines one method's result for one model: the cache key's parts."""
        settings = self.settings
        return {
            "checkpoint": model.run.sha256, "data": self.data_run.config.get("data"),
            "method": method, "options": method_options(method, settings),
            "split": settings.split, "indices": self.sample.indices, "seed": settings.seed,
            **extra,
        }

    def reuse(self, model: ModelAudit, kind: str, compute: Callable[[], Any],
              result_type: type | None = None, **extra: Any) -> Any:
        """A map-free result of ``model`` (accuracy, discovery, the counterfactual test)
        from an earlier audit's cache, else ``compute()``, kept for the next audit.

        Keyed by the checkpoint, the data, the split, the seed and ``extra`` (the settings
        the result depends on), not by the methods: adding a method does not recompute it.
        A dataclass ``result_type`` is stored field by field (tensors, numbers, strings and
        containers of them, as the cache's safe loading requires) and rebuilt.
        """
        parts = self.reuse_parts(model, **extra)
        names = ({f.name for f in dataclasses.fields(result_type)}
                 if result_type is not None else None)
        hit = self.cached(kind, parts, check=None if names is None else (
            lambda v: isinstance(v, dict) and set(v) == names))
        if hit is not None:
            return hit if result_type is None else result_type(**hit)
        value = compute()
        stored = value
        if result_type is not None:
            # Field by field, nested records as plain dicts (the result type rebuilds them).
            stored = {f.name: files.plain(getattr(value, f.name))
                      for f in dataclasses.fields(value)}
        self.keep(kind, parts, stored)
        return value

    def reuse_parts(self, model: ModelAudit, **extra: Any) -> dict[str, Any]:
        """The cache key's parts of a map-free result (see :meth:`reuse`)."""
        return {"checkpoint": model.run.sha256, "data": self.data_run.config.get("data"),
                "split": self.settings.split, "seed": self.settings.seed, **extra}

    def has(self, kind: str, parts: dict[str, Any]) -> bool:
        """Whether the cache holds a result (False when caching is off)."""
        return self.cache is not None and self.cache.has(kind, parts)

    def cached(self, kind: str, parts: dict[str, Any],
               check: Callable[[Any], bool] | None = None) -> Any | None:
        """A cached result that passes ``check``, or None (also when caching is off)."""
        return None if self.cache is None else self.cache.get(kind, parts, check)

    def keep(self, kind: str, parts: dict[str, Any], value: Any) -> None:
        """Store a result for the next audit (no-op when caching is off)."""
        if self.cache is not None:
            self.cache.put(kind, parts, value)

    def step(self, what: str, n: int = 1) -> None:
        """Advance the progress bar by ``n`` units, naming the work just done."""
        self.progress.set_postfix_str(what[:40], refresh=False)
        self.progress.update(n)
