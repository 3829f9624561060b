"""The HTML page: number formatting, the stylesheet, and the page around the sections.

The page is the list of sections (:data:`audit_report.sections.SECTIONS`): each renders
its own body; the page numbers them, builds the table of contents, the header and the
reproducibility footer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure

from explain.measures import get_measure
from explain.records import atomic_write_bytes

from .cache import ResultCache, digest
from .findings import verdict_of

if TYPE_CHECKING:
    from .state import AuditRun, ModelAudit


# -- number formatting ------------------------------------------------------------------


def finite(v: Any) -> bool:
    """A real, finite number (not None, not NaN)."""
    return isinstance(v, int | float) and math.isfinite(v)


def esc(text: Any) -> str:
    """HTML-escaped ``str(text)``."""
    return html.escape(str(text))


def fmt_stat(stat: dict[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    """``mean ± 95% half-width`` with the sample size, as HTML."""
    if not stat or not stat.get("n") or not finite(stat.get("mean")):
        return '<span class="na">n/a</span>'
    mean = stat["mean"]
    lo, hi = stat.get("ci95", [None, None])
    pct = unit == "%"
    text = f"{mean:.1f}%" if pct else f"{mean:.{digits}f}"
    if stat.get("interval") == "wilson" and finite(lo) and finite(hi):
        # Asymmetric (a share near 0 or 1): show the interval itself.
        lo_t, hi_t = (f"{lo:.0f}%", f"{hi:.0f}%") if pct else (f"{lo:.2f}", f"{hi:.2f}")
        text += f' <span class="ci">[{lo_t}\u2013{hi_t}]</span>'
    elif finite(lo) and finite(hi):
        half = (hi - lo) / 2
        text += f" \u00b1 {half:.1f}" if pct else f" \u00b1 {half:.{digits}f}"
    return f'{text} <span class="n">n={stat["n"]}</span>'


def fmt_prop(p: dict[str, Any] | None) -> str:
    """A share with its Wilson 95% interval and sample size, as HTML."""
    if not p or not p.get("n"):
        return '<span class="na">n/a</span>'
    lo, hi = p["ci95"]
    return (
        f'{p["value"]:.1%} <span class="ci">[{lo:.0%}\u2013{hi:.0%}]</span> '
        f'<span class="n">n={p["n"]}</span>'
    )


def signed(v: Any) -> str:
    """``+0.12`` / ``-0.05``, or n/a."""
    return f"{v:+.2f}" if finite(v) else '<span class="na">n/a</span>'


def measure_head(measure: str, label: str | None = None) -> str:
    """A table header cell naming a registered measure, its unit, direction and definition."""
    info = get_measure(measure)
    title = html.escape(f"{info.description} ({info.direction})")
    text = html.escape(label or info.label)
    unit = f" ({info.unit})" if info.unit else ""
    return f'<th title="{title}">{text}{unit} <span class="dir">{info.arrow}</span></th>'


def method_table(names: list[str], per_method: dict[str, dict[str, Any]]) -> str:
    """A table with a row per method and a column per measure in ``names``."""
    head = "<tr><th>method</th>" + "".join(measure_head(n) for n in names) + "</tr>"
    rows = "".join(
        f"<tr><td>{esc(m)}</td>"
        + "".join(
            f'<td class="num">{fmt_stat(st.get(n), get_measure(n).unit)}</td>' for n in names
        )
        + "</tr>"
        for m, st in per_method.items()
    )
    return f"<table>{head}{rows}</table>"


def not_run(reason: str, verb: str = "Not run") -> str:
    """A muted line saying why a part of a section is absent."""
    return f'<p class="muted">{verb}: {esc(reason)}.</p>'


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
    """Saves figures to ``figures/`` and returns their inline ``<figure>`` HTML.

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

    def add(self, name: str, figure: Figure | Drawing, caption: str, alt: str) -> str:
        """Save the figure as the next numbered PNG and return it inlined with its caption.

        ``caption`` and ``alt`` are plain text (they may hold class names from the data or a
        checkpoint): both are escaped here. ``name`` becomes a file name: only letters,
        digits, ``-`` and ``_`` are kept.
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
        data = base64.b64encode(png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
            f"<figcaption><b>Figure {self.count}.</b> {esc(caption)}</figcaption></figure>"
        )

    @staticmethod
    def png(fig: Figure) -> bytes:
        """``fig`` drawn as PNG bytes, cropped to what it shows."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
        return buffer.getvalue()


# -- the page ---------------------------------------------------------------------------

CSS = """
:root { --ink:#1d232b; --muted:#5b6673; --line:#e3e7ec; --bg:#ffffff; --soft:#f5f7fa;
        --accent:#2457a6; --bad:#b3261e; --badbg:#fdecea; --ok:#1e7d34; --warnbg:#fff6e0; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.55 -apple-system, "Segoe UI", "DejaVu Sans", Roboto, Helvetica,
       Arial, sans-serif; color:var(--ink); background:var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 80px; }
header.top { border-bottom: 3px solid var(--accent); margin-bottom: 18px; padding-bottom: 10px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 22px; margin: 44px 0 10px; padding-top: 10px; border-top: 1px solid var(--line); }
h2 .num { color: var(--accent); margin-right: 8px; }
h3 { font-size: 17px; margin: 26px 0 8px; }
p.lead, .muted { color: var(--muted); }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
          padding: 10px 16px; margin: 14px 0; columns: 2; font-size: 14px; }
nav.toc a { color: var(--accent); text-decoration: none; display: block; padding: 1px 0; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left;
         vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.flag td { background: var(--badbg); }
.n, .ci { color: var(--muted); font-size: 11.5px; }
.na { color: #9aa4ae; }
.dir { color: var(--accent); font-weight: 700; }
.badge { display:inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
         font-weight: 600; }
.badge.bad { background: var(--badbg); color: var(--bad); }
.badge.ok { background: #e6f4ea; color: var(--ok); }
.findings { background: var(--warnbg); border: 1px solid #f0d9a4; border-radius: 8px;
            padding: 10px 18px; }
.findings li { margin: 4px 0; }
.findings li.flag { color: var(--bad); font-weight: 600; }
.facts td:first-child { color: var(--muted); white-space: nowrap; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
              word-break: break-all; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.verdict { border: 2px solid; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.verdict.bad { border-color: #d62728; background: #fdecea; }
.verdict.ok { border-color: #2ca02c; background: #eaf6ea; }
@media print {
  nav.toc { display: none; }
  section { break-inside: auto; }
  figure, table, .verdict { break-inside: avoid; }
  body { font-size: 11pt; }
  a { color: inherit; text-decoration: none; }
}
figcaption { color: var(--muted); font-size: 13.5px; max-width: 1000px; margin-top: 4px; }
.note { border-left: 4px solid var(--accent); background: var(--soft); padding: 6px 12px;
        margin: 10px 0; font-size: 14px; }
.error { color: var(--bad); }
.pair { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
.pair > div:last-child { flex: 1; min-width: 360px; }
footer { margin-top: 50px; color: var(--muted); font-size: 12.5px; }
"""


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

    def per_model(self, section: Any) -> str:
        """A section's body once per model, with a sub-heading when there are two."""
        parts = []
        for model in self.audit.models:
            body = section.render(self, model, model.results[section.id])
            if self.multi:
                body = f"<h3>Model {esc(model.label)}: {esc(model.name)}</h3>" + body
            parts.append(body)
        return "".join(parts)

    def render(self, sections: list[Any]) -> str:
        """The whole page: header, how to read it, contents, numbered sections, footer."""
        body = []
        for num, section in enumerate(sections, 1):
            body.append(
                f'<section id="{section.id}"><h2><span class="num">{num}.</span>'
                f"{esc(section.title)}</h2>{section.render_all(self)}</section>"
            )
        toc = "".join(
            f'<a href="#{s.id}">{i}. {esc(s.title)}</a>' for i, s in enumerate(sections, 1)
        )
        audit = self.audit
        models = " vs ".join(esc(m.name) for m in audit.models)
        settings = audit.settings
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Audit report: {models}</title><style>{CSS}</style></head><body><main>"
            '<header class="top"><h1>Audit report</h1>'
            f'<p class="lead">{models} &middot; {len(self.sample.indices)} '
            f"{esc(settings.split)} images &middot; {len(settings.methods)} explanation "
            f"methods &middot; seed {settings.seed} &middot; {esc(audit.created)}</p></header>"
            + self.banner() +
            '<p class="note">How to read the numbers: <span class="dir">\u2191</span> higher is '
            'better, <span class="dir">\u2193</span> lower is better, <span class="dir">'
            "\u2195</span> no better direction (compare with the stated baseline). "
            "<i>a \u00b1 b</i> is a mean with the half-width of its 95% interval (Student's "
            "t); [lo\u2013hi] is a Wilson 95% interval of a share; <i>n</i> is the number of "
            "images behind the number. Hover over a column header for the measure's "
            "definition.</p>"
            f'<nav class="toc">{toc}</nav>' + "".join(body) + self.footer()
            + "</main></body></html>\n"
        )

    def banner(self) -> str:
        """The verdict in one box at the top: problems found, accuracy, the worst one."""
        verdict, _ = verdict_of(self.audit)
        acc = "" if verdict.accuracy is None else f" Accuracy {verdict.accuracy:.1%}."
        if verdict.status == "clean":
            return (f'<div class="verdict ok"><b>No problem found.</b> No confirmed shortcut, '
                    f"no bias finding, sanity checks passed.{acc}</div>")
        counts = (f"{verdict.confirmed_shortcuts} confirmed shortcut(s), "
                  f"{verdict.bias_findings} bias finding(s), {verdict.other_problems} other "
                  "problem(s).")
        return (f'<div class="verdict bad"><b>{esc(counts)}</b>{acc} Worst: '
                f"{esc(verdict.worst or '')}</div>")

    def footer(self) -> str:
        """Command, versions, platform, seed and timing: enough to reproduce the page."""
        audit = self.audit
        vers = ", ".join(f"{k} {esc(val)}" for k, val in audit.versions.items()
                         if k != "platform")
        cmd = " ".join(esc(c) for c in audit.command)
        return (
            "<footer><h3>Reproducibility</h3>"
            f"<p>Command: <code>{cmd}</code><br>Versions: {vers}<br>Platform: "
            f"{esc(audit.versions.get('platform', ''))}; device {esc(audit.settings.device)}; "
            f"seed {audit.settings.seed}; audit time {audit.seconds:.0f} s; metrics.json "
            f"schema version {audit.schema_version}. Every number on this page is in "
            "metrics.json, with the checkpoints' SHA-256 and configs.</p></footer>"
        )

    def write(self, sections: list[Any], path: Path) -> Path:
        """Render and write ``report.html`` atomically."""
        atomic_write_bytes(path, self.render(sections).encode("utf-8"))
        return path
