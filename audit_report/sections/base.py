"""What a report section is: one object that computes, renders and judges one topic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from markupsafe import Markup

from ..html import macro

if TYPE_CHECKING:
    from ..findings import Finding
    from ..page import Page
    from ..state import AuditRun, ModelAudit

# Dataclass field metadata for tensors that only the figures need: left out of metrics.json.
VISUAL: dict[str, bool] = {"visual": True}


class Section:
    """One section of the report.

    A section computes a typed result (a dataclass; fields marked :data:`VISUAL` hold
    tensors for its figures and stay out of ``metrics.json``) for each model, renders it as
    HTML, and states its findings. Adding a section = writing one subclass and listing it in
    :data:`audit_report.sections.SECTIONS`.

    The HTML comes from the section's template, ``templates/sections/<key>.html.j2``: its
    macros (``intro``, ``body``...) are called through :meth:`html` with the typed result
    and plain values, and escape every value they print. What :meth:`intro`, :meth:`render`
    and :meth:`render_all` return is :class:`markupsafe.Markup`; the page escapes a plain
    ``str`` as text.

    Attributes:
        id: HTML anchor; with ``-`` as ``_``, the section's key in ``metrics.json``.
        title: heading on the page.
        across_models: computed once over all models (:meth:`compute_across`) instead of
            once per model (:meth:`compute`).
    """

    id: ClassVar[str]
    title: ClassVar[str]
    across_models: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """The section's key in ``metrics.json``."""
        return self.id.replace("-", "_")

    def leads(self, audit: AuditRun) -> bool:
        """Whether the page should open with this section (e.g. it found a problem)."""
        return False

    def units(self, audit: AuditRun) -> int:
        """Progress-bar units this section's computation counts for (per model)."""
        return 1

    def compute(self, audit: AuditRun, model: ModelAudit) -> Any:
        """This section's result for one model."""
        raise NotImplementedError(f"{type(self).__name__} computes across models")

    def compute_across(self, audit: AuditRun) -> Any:
        """This section's result over all models (``across_models`` sections)."""
        raise NotImplementedError(f"{type(self).__name__} computes per model")

    def findings(self, audit: AuditRun, model: ModelAudit, result: Any) -> list[Finding]:
        """Headline findings from this section's result (none by default)."""
        return []

    @property
    def template(self) -> str:
        """The section's template, named after its key."""
        return f"sections/{self.key}.html.j2"

    def html(self, part: str, **context: Any) -> Markup:
        """The macro ``part`` of the section's template, called with ``context``."""
        return macro(self.template, part)(**context)

    def intro(self, page: Page) -> Markup:
        """HTML before the per-model bodies (what the section measures and how to read it)."""
        return Markup()

    def render(self, page: Page, model: ModelAudit, result: Any) -> Markup:
        """HTML body for one model."""
        raise NotImplementedError

    def render_all(self, page: Page) -> Markup:
        """The whole section's HTML (intro, then each model's body)."""
        return self.intro(page) + page.per_model(self)
