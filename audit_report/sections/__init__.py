"""The report's sections, in page order: the page is this list."""

from __future__ import annotations

from .base import VISUAL, Section
from .bias import BiasResult, BiasSection
from .evolution import EvolutionResult, EvolutionSection
from .measured import (
    AgreementResult,
    CamVsGradcamSection,
    FaithfulnessResult,
    FaithfulnessSection,
    LocalisationResult,
    LocalisationSection,
    SanityResult,
    SanitySection,
)
from .overview import (
    AccuracyResult,
    ImagesClassesResult,
    ImagesClassesSection,
    MethodsClassesSection,
    MethodsResult,
    SideBySideResult,
    SideBySideSection,
    SummarySection,
)
from .shortcuts import ShortcutResult, SuspectedShortcutsSection

SECTIONS: list[Section] = [
    SummarySection(),
    SuspectedShortcutsSection(),
    ImagesClassesSection(),
    MethodsClassesSection(),
    SideBySideSection(),
    CamVsGradcamSection(),
    LocalisationSection(),
    FaithfulnessSection(),
    SanitySection(),
    BiasSection(),
    EvolutionSection(),
]

__all__ = [
    "SECTIONS",
    "VISUAL",
    "AccuracyResult",
    "AgreementResult",
    "BiasResult",
    "BiasSection",
    "CamVsGradcamSection",
    "EvolutionResult",
    "EvolutionSection",
    "FaithfulnessResult",
    "FaithfulnessSection",
    "ImagesClassesResult",
    "ImagesClassesSection",
    "LocalisationResult",
    "LocalisationSection",
    "MethodsClassesSection",
    "MethodsResult",
    "SanityResult",
    "SanitySection",
    "ShortcutResult",
    "Section",
    "SideBySideResult",
    "SideBySideSection",
    "SummarySection",
    "SuspectedShortcutsSection",
]
