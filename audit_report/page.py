"""The HTML page: the figures it inlines and the page around the sections.

The page is the list of sections (:data:`audit_report.sections.SECTIONS`): each renders
its own body; the page numbers them, builds the table of contents, the header and the
reproducibility footer. The markup comes from the templates in ``templates/``
(:mod:`audit_report.html`), which escape every value from the data.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from markupsafe import Markup
from matplotlib.figure import Figure

from explain.records import atomic_write_bytes

from .cache import ResultCache, digest
from .findings import verdict_of
from .html import macro, render

if TYPE_CHECKING:
    from .state import AuditRun, ModelAudit


# -- figures ----------------------------------------------------------------------------


class Drawing:
    """A figure not drawn yet: the function that draws it and its arguments.

    Given one, :class:`FigureStore` takes the PNG from the earlier report's cache when the
    same code drew the same inputs there (a re-run with one more method redraws only the
    figures that show it), and draws it otherwise.
    """

    def __init__(self, draw: Callable[..., Figure], *args: Any, **kwargs: Any) -> None:
        self.draw, self.args, self.kwargs = draw, args, kwargs

    def __call__(self) -> Figure:
        return self.draw(*self.args, **self.kwargs)

    def key_parts(self) -> dict[str, Any]:
        """What determines the picture: the code that draws it and the inputs' content."""
        return {
            "figure": f"{self.draw.__module__}.{self.draw.__qualname__}",
            "code": _code_digest(self.draw.__module__),
            "matplotlib": matplotlib.__version__,
            # A user's matplotlibrc (fonts, sizes, colours) changes the picture too.
            "rc": hashlib.sha256(repr(sorted(matplotlib.rcParams.items())).encode()).hexdigest(),
            "inputs": digest([list(self.args), self.kwargs]),
        }


@functools.cache
def _code_digest(module_name: str) -> str:
    """A hash of the drawing module's source and of the project modules it draws with
    (``explain.render``, this page...), so that editing any of them redraws its figures."""
    module = sys.modules[module_name]
    names = {module_name}
    for value in vars(module).values():
        used = value.__name__ if isinstance(value, type(sys)) else getattr(
            value, "__module__", None)
        if isinstance(used, str) and used.split(".")[0] in PROJECT_PACKAGES:
            names.add(used)
    h = hashlib.sha256()
    for name in sorted(names):
        source = getattr(sys.modules.get(name), "__file__", None)
        if source:
            h.update(name.encode() + Path(source).read_bytes())
    return h.hexdigest()


# The packages whose code can change a figure (see _code_digest).
PROJECT_PACKAGES = ("audit_report", "explain")


class FigureStore:
    """Saves figures to ``figures/`` and returns their inline ``<figure>`` HTML (Markup).

    Args:
        out_dir: the report's folder.
        cache: where a :class:`Drawing`'s PNG is looked up and kept, or None to draw all.
    """

    def __init__(self, out_dir: Path, cache: ResultCache | None = None) -> None:
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self.count = 0
        self.drawn: list[str] = []  # the figures drawn (the others came from the cache)

    def add(self, name: str, figure: Figure | Drawing, caption: str, alt: str) -> Markup:
        """Save the figure as the next numbered PNG and return it inlined with its caption.

        ``caption`` and ``alt`` are plain text (they may hold class names from the data or a
        checkpoint): the ``figure`` macro escapes both. ``name`` becomes a file name: only
        letters, digits, ``-`` and ``_`` are kept.
        """
        name = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        self.count += 1
        path = self.dir / f"{self.count:02d}_{name}.png"
        png = None
        parts = (figure.key_parts()
                 if isinstance(figure, Drawing) and self.cache is not None else None)
        if parts is not None:
            png = self.cache.get_bytes("figure", parts, ".png")
        if png is None:
            png = self.png(figure() if isinstance(figure, Drawing) else figure)
            self.drawn.append(name)
            if parts is not None:
                self.cache.put_bytes("figure", parts, ".png", png)
        path.write_bytes(png)
        return macro("macros.html.j2", "figure")(
            number=self.count, png_base64=base64.b64encode(png).decode("ascii"),
            caption=caption, alt=alt)

    @staticmethod
    def png(fig: Figure) -> bytes:
        """``fig`` drawn as PNG bytes, cropped to what it shows."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
        return buffer.getvalue()


# -- the page ---------------------------------------------------------------------------


class Page:
    """Renders the audit as one self-contained HTML file (figures inlined as base64)."""

    def __init__(self, audit: AuditRun, out_dir: Path) -> None:
        self.audit = audit
        self.figures = FigureStore(out_dir, audit.cache)
        self.sample = audit.sample
        self.names = list(audit.sample.class_names)
        self.multi = len(audit.models) > 1

    def tag(self, model: ModelAudit) -> str:
        """A figure-name suffix that tells two models' figures apart."""
        return f"_{model.label}" if self.multi else ""

    def column_labels(self, n: int) -> list[str]:
        """The true class of each of the first ``n`` sample images."""
        return [self.names[int(c)] for c in self.sample.labels[:n]]

    def per_model(self, section: Any) -> Markup:
        """A section's body once per model, with a sub-heading when there are two.

        A body that is not Markup (a section returning a plain ``str``) is escaped: only
        markup the templates built reaches the page as markup.
        """
        out = Markup()
        heading = macro("macros.html.j2", "model_heading")
        for model in self.audit.models:
            if self.multi:
                out += heading(model=model)
            out += section.render(self, model, model.results[section.id])
        return out

    def render(self, sections: list[Any]) -> str:
        """The whole page: header, how to read it, contents, numbered sections, footer."""
        # Bodies in page order: the figures are numbered as they are added.
        bodies = [(s.id, s.title, s.render_all(self)) for s in sections]
        verdict, _ = verdict_of(self.audit)
        return render("page.html.j2", audit=self.audit, n_images=len(self.sample.indices),
                      verdict=verdict, sections=bodies) + "\n"

    def write(self, sections: list[Any], path: Path) -> Path:
        """Render and write ``report.html`` atomically."""
        atomic_write_bytes(path, self.render(sections).encode("utf-8"))
        return path
