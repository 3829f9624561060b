"""The monitor's per-method scores of one epoch's maps (``explain/<method>/<score>``).

Which scores exist depends on the fixed images only (a cue, object masks) and on a
previous epoch's maps for ``drift``: a monitored score never goes missing because one
epoch's maps were broken (its value is NaN then).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from explain import records
from explain.measures import map_scores


def scores(
    maps: Tensor | None,
    classes: Tensor | None,
    labels: Tensor,
    batch: dict[str, Tensor],
    previous: Tensor | None,
) -> tuple[dict[str, float], Tensor | None]:
    """The scores of one method's maps, and the maps the next epoch's ``drift`` compares with.

    ``maps``/``classes``: see :func:`callbacks.monitor_explain.class_maps`; ``maps`` None
    (non-finite) gives NaN for each score. ``previous``: what this function returned for
    the method last time (None: no drift yet). The second value is the maps to keep (half
    precision), or ``previous`` itself when ``maps`` is None: drift is measured against
    the last finite maps.
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
    if previous is not None and (now is None or previous.shape == now.shape):
        out["drift"] = nan if now is None else map_scores.nanmean(
            map_scores.drift(now.flatten(0, now.dim() - 3), previous.float().flatten(
                0, previous.dim() - 3))
        )
    out["concentration"] = score(map_scores.concentration)
    return out, (previous if now is None else now.half())
