"""The methods the project picks by name: the one place a method name is chosen.

Everything else reads a method's properties from the registry (:class:`MethodInfo`) and
never compares names or families; a user's own choice always wins over these defaults.
"""

from __future__ import annotations

#: The method shown when the user chose none (the monitor's default, the report's lead
#: heatmaps, the overview's row every CNN has): Grad-CAM works on any conv layer.
DEFAULT_METHOD = "gradcam"

#: Shortcut discovery's maps: input gradients are per pixel (a 4-pixel patch is not blurred
#: into a 4x4-cell CAM) and cost one backward for the one class discovery reads.
DISCOVERY_METHOD = "saliency"

#: Shortcut discovery's second view of where each image peaks (a cue on part of a class,
#: :func:`explain.measures.discovery.peak_group`): a CAM's peak follows what the last conv
#: layer reads. On the benchmark's glyph on half of horse its peaks recur on the glyph in
#: all five models that use it, saliency's in four; no clean model's peaks recur.
PEAK_METHOD = "gradcam"

#: The pair whose agreement checks the CAM identity on a GAP + Linear head: CAM and
#: Grad-CAM give the same map there (Selvaraju et al. 2017, section 3.1).
CAM_IDENTITY_PAIR = ("cam", "gradcam")
