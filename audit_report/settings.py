"""What an audit is asked to do: the settings ``audit.py`` parses and the report records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AuditSettings:
    """Every choice behind a report (recorded in ``metrics.json`` under ``settings``).

    Attributes:
        ckpt: one checkpoint, or two to compare side by side.
        train_config: the training config of each checkpoint (None: found beside it).
        methods: registered explanation methods to run.
        method_options: engine options per method, e.g. ``{"lime": {"samples": 128}}``.
        num_images: images explained (a seeded sample stratified over classes).
        split: ``test`` or ``val``.
        out: report folder (None: ``<log dir of the first checkpoint>/audit``).
        device: ``cpu`` or ``cuda`` (``auto`` is resolved by the command line).
        seed: seed of the sample, the randomisation test and stochastic methods.
        steps: deletion/insertion steps.
        threshold: share of a map's maximum kept for boxes and region IoU.
        sanity_images: images in the cascading randomisation test.
        counterfactual_images: images per class in the with/without-cue test.
        discovery_images: images per class in the label-free shortcut discovery.
        batch_size: images per model call in perturbation measures and methods.
        progress: show a progress bar.
        command: the command line, for the report's footer.
    """

    ckpt: list[str]
    train_config: list[str] | None = None
    methods: list[str] = field(default_factory=list)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_images: int = 64
    split: str = "test"
    out: str | None = None
    device: str = "cpu"
    seed: int = 0
    steps: int = 16
    threshold: float = 0.2
    sanity_images: int = 8
    counterfactual_images: int = 100
    discovery_images: int = 30
    batch_size: int = 256
    progress: bool = True
    command: list[str] = field(default_factory=list)
