"""The measure registry: every number the audit reports, with its category and direction."""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("faithfulness", "localisation", "sanity", "bias", "agreement")


# -- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasureInfo:
    """What the report needs to know to present a measure honestly."""

    name: str
    category: str
    higher_is_better: bool | None  # None: no better direction (read it against a baseline)
    description: str
    unit: str = ""  # "" for fractions in [0, 1] or plain numbers, "%" for percentages
    reference: str = ""
    label: str = ""  # for table headers; defaults to the name
    share: bool = False  # per-image values are 0/1 (or 0/100): a Wilson interval fits

    @property
    def direction(self) -> str:
        """``higher is better``, ``lower is better`` or ``no better direction``."""
        if self.higher_is_better is None:
            return "no better direction"
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def arrow(self) -> str:
        """A one-character direction marker for tables."""
        return {True: "\u2191", False: "\u2193", None: "\u2195"}[self.higher_is_better]

    def as_dict(self) -> dict[str, object]:
        return {
            "category": self.category,
            "higher_is_better": self.higher_is_better,
            "direction": self.direction,
            "description": self.description,
            "unit": self.unit,
            "reference": self.reference,
            "label": self.label or self.name,
        }


_MEASURES: dict[str, MeasureInfo] = {}


def register_measure(
    name: str,
    *,
    category: str,
    higher_is_better: bool | None,
    description: str,
    unit: str = "",
    reference: str = "",
    label: str = "",
    share: bool = False,
) -> MeasureInfo:
    """Declare a measure; duplicate names and unknown categories are refused."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown measure category {category!r}; choose one of {CATEGORIES}")
    if name in _MEASURES:
        raise ValueError(f"measure {name!r} is already registered")
    info = MeasureInfo(
        name, category, higher_is_better, description, unit, reference, label or name, share
    )
    _MEASURES[name] = info
    return info


def get_measure(name: str) -> MeasureInfo:
    """Look up a measure; an unknown name lists the registered ones."""
    try:
        return _MEASURES[name]
    except KeyError:
        raise KeyError(
            f"unknown measure {name!r}; available: {', '.join(available_measures())}"
        ) from None


def available_measures(category: str | None = None) -> list[str]:
    """Registered measure names (of one category if given), in registration order."""
    return [n for n, m in _MEASURES.items() if category is None or m.category == category]


# name, label, category, higher_is_better, unit, share, reference, description
_DECLARED = [
    ("deletion_auc", "Deletion AUC", "faithfulness", False, "", False, "Petsiuk et al. 2018",
     "area under the target-class probability while the most important pixels are removed "
     "first (replaced by the fill); a faithful map makes it fall fast"),
    ("insertion_auc", "Insertion AUC", "faithfulness", True, "", False, "Petsiuk et al. 2018",
     "area under the target-class probability while the most important pixels are inserted "
     "first into a blurred image; a faithful map makes it rise fast"),
    ("average_drop", "Average Drop", "faithfulness", False, "%", False,
     "Chattopadhay et al. 2018",
     "mean relative drop of the target-class probability when the image is multiplied by "
     "the max-normalised map (only the explained evidence is kept)"),
    ("increase_in_confidence", "Increase in Confidence", "faithfulness", True, "%", True,
     "Chattopadhay et al. 2018",
     "share of images whose target-class probability rises when only the explained "
     "evidence is kept"),
    ("box_iou", "Box IoU", "localisation", True, "", False, "Zhou et al. 2016",
     "IoU between the box around the largest connected region above 20% of the map's "
     "maximum and the object's bounding box"),
    ("localisation_accuracy", "Loc. accuracy (IoU \u2265 0.5)", "localisation", True, "", True,
     "Zhou et al. 2016",
     "share of images whose box IoU is at least 0.5 (ground-truth class known)"),
    ("pointing_game", "Pointing game", "localisation", True, "", True, "Zhang et al. 2016",
     "share of images whose map maximum lies on the object"),
    ("energy_pointing_game", "Energy pointing game", "localisation", True, "", False,
     "Wang et al. 2020", "share of the map's positive mass that lies on the object"),
    ("sanity_spearman", "Spearman (randomised vs trained)", "sanity", False, "", False,
     "Adebayo et al. 2018",
     "Spearman rank correlation (of absolute values) between the maps of the trained model "
     "and of a model whose layers were re-initialised from the head down; a map that "
     "reflects the model changes, so the correlation should fall"),
    ("border_energy", "Border energy", "bias", None, "", False, "",
     "share of the true-class map's positive mass in the image border; compare it with the "
     "border's share of the image area"),
    ("cue_energy", "Cue energy", "bias", False, "", False, "",
     "share of the true-class map's positive mass inside the spurious cue patch, on images "
     "that carry it; compare it with the patch's share of the image area"),
    ("cue_reliance", "Reliance", "bias", False, "", False, "",
     "accuracy of a class with the cue minus its accuracy without it (both computed on the "
     "same images); large = the class leans on the cue"),
    ("cue_attraction", "Attraction", "bias", False, "", False, "",
     "rise in the share of other classes' images predicted as this class when the cue is "
     "stamped on them; large = the cue alone pulls predictions to the class"),
    ("cam_gradcam_correlation", "Pearson correlation", "agreement", None, "", False, "",
     "Pearson correlation between CAM and Grad-CAM maps of the same image and class"),
    ("cam_gradcam_iou", "Region IoU", "agreement", None, "", False, "",
     "IoU of the regions above 20% of each map's maximum (CAM vs Grad-CAM)"),
]
for _name, _label, _cat, _hib, _unit, _share, _ref, _desc in _DECLARED:
    register_measure(_name, label=_label, category=_cat, higher_is_better=_hib, unit=_unit,
                     share=_share, reference=_ref, description=_desc)
del _name, _label, _cat, _hib, _unit, _share, _ref, _desc
