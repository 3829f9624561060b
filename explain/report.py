"""The audit report: matplotlib figures and one self-contained HTML page.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no
global backend switch), saved to ``figures/*.png`` and inlined in ``report.html`` as base64
data URIs, so the page opens from disk in any browser without network or sibling files.
This module is only imported by ``audit.py``: matplotlib never enters the training loop.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from . import render
from .measures import get_measure

SECTIONS = [
    ("summary", "Summary"),
    ("images-classes", "Images \u00d7 classes"),
    ("methods-classes", "Methods \u00d7 classes"),
    ("side-by-side", "Models side by side"),
    ("cam-vs-gradcam", "CAM vs Grad-CAM"),
    ("localisation", "Weakly-supervised localisation"),
    ("faithfulness", "Faithfulness"),
    ("sanity", "Sanity check"),
    ("bias", "Bias and shortcuts"),
    ("evolution", "Evolution over training"),
]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


# -- JSON -------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Tensors, paths and tuples -> JSON types; NaN and infinities -> null (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics(path: str | Path, results: dict[str, Any]) -> None:
    """Write ``metrics.json`` (strict JSON, indented) atomically."""
    text = json.dumps(jsonable(results), indent=1, allow_nan=False)
    _atomic_write(Path(path), text.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- number formatting ------------------------------------------------------------------


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def fmt_stat(stat: dict[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    """``mean ± 95% half-width`` with the sample size, as HTML."""
    if not stat or not stat.get("n") or not _finite(stat.get("mean")):
        return '<span class="na">n/a</span>'
    mean = stat["mean"]
    lo, hi = stat.get("ci95", [None, None])
    pct = unit == "%"
    text = f"{mean:.1f}%" if pct else f"{mean:.{digits}f}"
    if stat.get("interval") == "wilson" and _finite(lo) and _finite(hi):
        # Asymmetric (a share near 0 or 1): show the interval itself.
        lo_t, hi_t = (f"{lo:.0f}%", f"{hi:.0f}%") if pct else (f"{lo:.2f}", f"{hi:.2f}")
        text += f' <span class="ci">[{lo_t}\u2013{hi_t}]</span>'
    elif _finite(lo) and _finite(hi):
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


def _method_table(names: list[str], per_method: dict[str, dict[str, Any]]) -> str:
    """A table with a row per method and a column per measure in ``names``."""
    head = "<tr><th>method</th>" + "".join(_head(n) for n in names) + "</tr>"
    rows = "".join(
        f"<tr><td>{_e(m)}</td>"
        + "".join(
            f'<td class="num">{fmt_stat(st.get(n), get_measure(n).unit)}</td>' for n in names
        )
        + "</tr>"
        for m, st in per_method.items()
    )
    return f"<table>{head}{rows}</table>"


def _head(measure: str, label: str | None = None) -> str:
    info = get_measure(measure)
    title = html.escape(f"{info.description} ({info.direction})")
    text = html.escape(label or info.label)
    unit = f" ({info.unit})" if info.unit else ""
    return f'<th title="{title}">{text}{unit} <span class="dir">{info.arrow}</span></th>'


def _e(text: Any) -> str:
    return html.escape(str(text))


# -- figure helpers ---------------------------------------------------------------------


def _np_image(t: Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _overlays(images01: Tensor, maps: Tensor, joint: bool = False) -> list[np.ndarray]:
    """Overlay tiles; ``joint`` scales all maps of an image together (``maps [N, K, H, W]``)."""
    if joint:
        n, k = maps.shape[:2]
        scaled = render.normalize_maps(maps.float(), dims=(-3, -2, -1))
        tiles = render.overlay(images01.repeat_interleave(k, 0), scaled.flatten(0, 1))
        return [_np_image(t) for t in tiles.view(n, k, *tiles.shape[1:]).flatten(0, 1)]
    scaled = render.normalize_maps(maps.float())
    return [_np_image(t) for t in render.overlay(images01.float(), scaled)]


def _grid_figure(
    tiles: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    titles: Sequence[Sequence[str]] | None = None,
    frames: Sequence[Sequence[str | None]] | None = None,
    size: float = 1.0,
) -> tuple[Figure, Any, list[list[tuple[int, int]]]]:
    """A grid of image tiles drawn as one image, with row labels left and column labels on top.

    All tiles are pasted into a single canvas shown by one ``imshow`` (a hundred small axes
    cost matplotlib seconds to lay out and save). Returns the figure, its axes and the
    top-left pixel ``(y, x)`` of every tile, so callers can draw boxes on a tile.
    """
    rows, cols = len(tiles), max(len(r) for r in tiles)
    first = next(t for r in tiles for t in r if t is not None)
    h, w = first.shape[:2]
    pad = max(2, h // 10)
    gap = h // 2 if titles else 0  # room for a title line above each tile
    height = rows * (h + pad + gap) + pad
    width = cols * (w + pad) + pad
    canvas = np.ones((height, width, 3))
    where: list[list[tuple[int, int]]] = []
    for r in range(rows):
        where.append([])
        for c in range(cols):
            y, x = pad + gap + r * (h + pad + gap), pad + c * (w + pad)
            where[r].append((y, x))
            tile = tiles[r][c] if c < len(tiles[r]) else None
            if tile is not None:
                canvas[y : y + h, x : x + w] = tile
    scale = size / w  # inches per tile pixel
    fig = Figure(figsize=(width * scale, height * scale), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r in range(rows):
        y, x = where[r][0]
        if r < len(row_labels):
            ax.text(x - pad, y + h / 2, row_labels[r], ha="right", va="center", fontsize=8)
        for c in range(cols):
            y, x = where[r][c]
            if c >= len(tiles[r]) or tiles[r][c] is None:
                continue
            if titles and titles[r][c]:
                ax.text(x + w / 2, y - 2.2, titles[r][c], ha="center", va="bottom", fontsize=6.5)
            colour = frames[r][c] if frames else None
            if colour:
                ax.add_patch(Rectangle((x - 1.5, y - 1.5), w + 2, h + 2, fill=False,
                                       edgecolor=colour, linewidth=2))
    for c, label in enumerate(col_labels[:cols]):
        y, x = where[0][c]
        ax.text(x + w / 2, y - gap - pad, label, ha="center", va="bottom", fontsize=7.5)
    return fig, ax, where


def _draw_box(
    ax: Any, box: Tensor | None, colour: str, at: tuple[int, int], style: str = "-"
) -> None:
    if box is None or not bool(torch.isfinite(box).all()):
        return
    x0, y0, x1, y1 = (float(v) for v in box)
    top, left = at
    # Boxes are pixel edges with exclusive ends; imshow puts pixel centres on integers.
    ax.add_patch(Rectangle((left + x0 - 0.5, top + y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=colour, linewidth=1.6, linestyle=style))


class _Figures:
    """Saves figures to ``figures/`` and returns their inline ``<figure>`` HTML."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def add(self, name: str, fig: Figure, caption: str, alt: str) -> str:
        self.count += 1
        path = self.dir / f"{self.count:02d}_{name}.png"
        fig.savefig(path, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption><b>Figure {self.count}.</b> {caption}</figcaption></figure>"
        )


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
figcaption { color: var(--muted); font-size: 13.5px; max-width: 1000px; margin-top: 4px; }
.note { border-left: 4px solid var(--accent); background: var(--soft); padding: 6px 12px;
        margin: 10px 0; font-size: 14px; }
.error { color: var(--bad); }
.pair { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
.pair > div:last-child { flex: 1; min-width: 360px; }
footer { margin-top: 50px; color: var(--muted); font-size: 12.5px; }
"""


def write_report(out_dir: str | Path, results: dict[str, Any], visuals: dict[str, Any]) -> Path:
    """Draw every figure into ``out_dir/figures`` and write ``out_dir/report.html``.

    ``results`` is the ``metrics.json`` content; ``visuals`` holds the tensors the figures
    need (``sample``: the audit's Sample; ``models``: one dict of maps per model).
    """
    out_dir = Path(out_dir)
    figs = _Figures(out_dir)
    page = _Page(results, visuals, figs)
    text = page.render()
    path = out_dir / "report.html"
    _atomic_write(path, text.encode("utf-8"))
    return path


class _Page:
    def __init__(self, results: dict[str, Any], visuals: dict[str, Any], figs: _Figures) -> None:
        self.r = results
        self.v = visuals
        self.figs = figs
        self.sample = visuals["sample"]
        self.names = list(self.sample.class_names)
        self.models = results["models"]
        self.mvis = visuals["models"]
        self.multi = len(self.models) > 1

    # -- helpers ----------------------------------------------------------------------------

    def _per_model(self, fn: Any) -> str:
        """Run a section body once per model, with a sub-heading when there are two."""
        parts = []
        for res, vis in zip(self.models, self.mvis, strict=True):
            body = fn(res, vis)
            if self.multi:
                body = f"<h3>Model {_e(res['label'])}: {_e(res['name'])}</h3>" + body
            parts.append(body)
        return "".join(parts)

    def _tag(self, res: dict[str, Any]) -> str:
        return f"_{res['label']}" if self.multi else ""

    def _show(self) -> int:
        return self.sample.show

    def _col_labels(self, n: int) -> list[str]:
        return [self.names[int(c)] for c in self.sample.labels[:n]]

    # -- page -------------------------------------------------------------------------------

    def render(self) -> str:
        sections = [
            self.summary(), self.images_classes(), self.methods_classes(), self.side_by_side(),
            self.cam_vs_gradcam(), self.localisation(), self.faithfulness(), self.sanity(),
            self.bias(), self.evolution(),
        ]
        body = []
        for (sid, title), content in zip(SECTIONS, sections, strict=True):
            num = SECTIONS.index((sid, title)) + 1
            body.append(
                f'<section id="{sid}"><h2><span class="num">{num}.</span>{_e(title)}</h2>'
                f"{content}</section>"
            )
        toc = "".join(
            f'<a href="#{sid}">{i}. {_e(title)}</a>' for i, (sid, title) in enumerate(SECTIONS, 1)
        )
        models = " vs ".join(_e(m["name"]) for m in self.models)
        s = self.r["settings"]
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Audit report: {models}</title><style>{CSS}</style></head><body><main>"
            '<header class="top"><h1>Audit report</h1>'
            f'<p class="lead">{models} &middot; {len(self.sample.indices)} {_e(s["split"])} '
            f"images &middot; {len(s['methods'])} explanation methods &middot; seed "
            f"{self.r['seed']} &middot; {_e(self.r['created'])}</p></header>"
            '<p class="note">How to read the numbers: <span class="dir">\u2191</span> higher is '
            'better, <span class="dir">\u2193</span> lower is better, <span class="dir">'
            "\u2195</span> no better direction (compare with the stated baseline). "
            "<i>a \u00b1 b</i> is a mean with the half-width of its normal 95% interval; "
            "[lo\u2013hi] is a Wilson 95% interval of a share; <i>n</i> is the number of images "
            "behind the number. Hover over a column header for the measure's definition.</p>"
            f'<nav class="toc">{toc}</nav>' + "".join(body) + self.footer()
            + "</main></body></html>\n"
        )

    def footer(self) -> str:
        v = self.r["versions"]
        vers = ", ".join(f"{k} {_e(val)}" for k, val in v.items() if k != "platform")
        cmd = " ".join(_e(c) for c in self.r["command"])
        return (
            "<footer><h3>Reproducibility</h3>"
            f"<p>Command: <code>{cmd}</code><br>Versions: {vers}<br>Platform: "
            f"{_e(v.get('platform', ''))}; device {_e(self.r['device'])}; seed "
            f"{self.r['seed']}; audit time {self.r.get('audit_seconds', 0):.0f} s; "
            f"metrics.json schema version {self.r['schema_version']}. Every number on this "
            "page is in metrics.json, with the checkpoints' SHA-256 and configs.</p></footer>"
        )

    # -- 1 summary --------------------------------------------------------------------------

    def summary(self) -> str:
        data = self.r["data"]
        init = data["config"].get("init_args", {})
        keys = ", ".join(f"{k}={v}" for k, v in init.items() if not k.startswith("cue"))
        cue = self.models[0]["bias"].get("cue_description") or "none declared"
        parts = [
            '<table class="facts">'
            f"<tr><td>data</td><td><code>{_e(data['config'].get('class_path'))}</code> "
            f'<span class="muted">{_e(keys)}</span></td></tr>'
            f"<tr><td>classes</td><td>{_e(', '.join(self.names))}</td></tr>"
            f"<tr><td>spurious cue</td><td>{_e(cue)}</td></tr>"
            f"<tr><td>split audited</td><td>{_e(self.r['settings']['split'])} "
            f"({len(self.sample.indices)} images explained, stratified over classes, seed "
            f"{self.r['seed']})</td></tr>"
            "<tr><td>ground-truth masks</td><td>"
            f"{'yes' if data['object_masks'] else 'no'}</td></tr>"
            "</table>"
        ]
        if not data["same_for_all_models"]:
            parts.append(
                '<p class="note">The models were trained on different data configs; both are '
                "audited on model A's data so they see the same images.</p>"
            )

        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            hp = res["config"].get("model", {})
            hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
            meta = res.get("meta", {})
            out = [
                '<table class="facts">'
                f"<tr><td>model</td><td>{_e(res['name'])}<br><span class=\"muted\">"
                f"{_e(hp_text)}</span></td></tr>"
                f"<tr><td>checkpoint</td><td><code>{_e(res['checkpoint'])}</code> (epoch "
                f"{_e(meta.get('epoch', '?'))}, step {_e(meta.get('global_step', '?'))})</td></tr>"
                f"<tr><td>SHA-256</td><td><code>{_e(res['sha256'])}</code></td></tr>"
                f"<tr><td>config</td><td><code>{_e(res['config_path'])}</code></td></tr>"
                f"<tr><td>accuracy ({_e(self.r['settings']['split'])}) "
                '<span class="dir">\u2191</span></td>'
                f"<td>{fmt_prop(res['summary']['accuracy'])}</td></tr></table>"
            ]
            items = []
            flagged = {f["class"] for f in res["bias"]["flagged"]}
            for text in res["findings"]:
                cls = ' class="flag"' if any(text.startswith(f"class {c}:") for c in flagged) \
                    or text.startswith("Sanity check failed") else ""
                items.append(f"<li{cls}>{_e(text)}</li>")
            out.append('<div class="findings"><b>Headline findings</b><ul>'
                       + "".join(items) + "</ul></div>")
            rows = "".join(
                f"<tr><td>{_e(name)}</td><td class=\"num\">{fmt_prop(p)}</td></tr>"
                for name, p in res["summary"]["per_class"].items()
            )
            out.append(
                '<div class="pair"><div><h3>Accuracy per class <span class="dir">\u2191</span>'
                f"</h3><table><tr><th>class</th><th class=\"num\">accuracy (recall)</th></tr>"
                f"{rows}</table></div><div>"
            )
            out.append(self.figs.add(
                f"confusion{self._tag(res)}", fig_confusion(vis["confusion"], self.names),
                "Confusion matrix on the whole split (torchmetrics). Rows are the true class, "
                "columns the predicted class; each cell shows the count, and its colour the "
                "share of the row, so a dark diagonal is good and a dark off-diagonal cell is "
                "a frequent confusion.",
                "confusion matrix",
            ))
            out.append("</div></div>")
            return "".join(out)

        return "".join(parts) + self._per_model(body)

    # -- 2 images x classes -----------------------------------------------------------------

    def images_classes(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            n = self._show()
            fig = fig_images_classes(self.sample.images01[:n], vis["gradcam_all"][:n],
                                     vis["probs"][:n], self.sample.labels[:n], self.names)
            return self.figs.add(
                f"images_classes{self._tag(res)}", fig,
                "Grad-CAM map of every class (columns) for one image of each class (rows), "
                "with the model's probability for that class above each tile. The framed "
                "diagonal is the true class. Maps are scaled by each image's largest value "
                "over all classes, so a faint map means weak evidence for that class, not a "
                f"rendering choice. n={n} images.",
                "Grad-CAM per class",
            )

        return (
            "<p>What the model sees for each class it could predict. A trustworthy model "
            "shows strong maps on the object in the true-class column and weak maps "
            "elsewhere.</p>" + self._per_model(body)
        )

    # -- 3 methods x classes ----------------------------------------------------------------

    def methods_classes(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            out = []
            rows = []
            for m, entry in res["methods_classes"].items():
                status = (
                    '<span class="badge ok">ok</span>' if entry.get("status") == "ok"
                    else f'<span class="badge bad">failed</span> <span class="error">'
                    f"{_e(entry.get('error', ''))}</span>"
                )
                secs = entry.get("seconds")
                rows.append(
                    f"<tr><td>{_e(m)}</td><td>{_e(entry['family'])}</td><td>{status}</td>"
                    f'<td class="num">{f"{secs:.2f} s" if secs is not None else "-"}</td></tr>'
                )
            if vis["maps_true"]:
                n = self._show()
                fig = fig_methods(self.sample.images01[:n],
                                  {m: t[:n] for m, t in vis["maps_true"].items()},
                                  self._col_labels(n))
                out.append(self.figs.add(
                    f"methods_classes{self._tag(res)}", fig,
                    "Every method (rows) on the same images (columns, one per class, true class "
                    "named on top), explaining the true class. Each map is scaled to its own "
                    "maximum: compare where the evidence lies, not how strong it is. Warm = "
                    f"more evidence. n={n} images.",
                    "methods by image",
                ))
            out.append(
                "<table><tr><th>method</th><th>family</th><th>status</th><th class=\"num\">"
                f"time for {len(self.sample.indices)} images, all classes</th></tr>"
                + "".join(rows) + "</table>"
            )
            return "".join(out)

        return self._per_model(body)

    # -- 4 side by side ---------------------------------------------------------------------

    def side_by_side(self) -> str:
        sbs = self.r["side_by_side"]
        if "skipped" in sbs:
            return f'<p class="muted">Not run: {_e(sbs["skipped"])}.</p>'
        methods = [m for m in self.r["settings"]["methods"]
                   if all(m in v["maps_true"] for v in self.mvis)]
        out = []
        acc = " vs ".join(
            f"{_e(lbl)} {a:.1%}" for lbl, a in zip(sbs["models"], sbs["accuracy"], strict=True)
        )
        out.append(f"<p>Accuracy: {acc} (n={self.models[0]['summary']['accuracy']['n']}).</p>")
        if methods:
            n = self._show()
            fig = fig_side_by_side(self.sample.images01[:n],
                                   [{m: v["maps_true"][m][:n] for m in methods} for v in self.mvis],
                                   [m["label"] for m in self.models], methods, self._col_labels(n))
            out.append(self.figs.add(
                "side_by_side", fig,
                "The same images (columns) explained by each method for model A and model B "
                "(alternating rows), true class, each map scaled to its own maximum. Where the "
                f"two rows differ, the models use different evidence. n={n} images.",
                "side by side",
            ))
        head = "".join(f"<th class=\"num\">model {_e(lbl)}</th>" for lbl in sbs["models"])
        rows = []
        for method, measures in sbs["methods"].items():
            for name, cmp in measures.items():
                info = get_measure(name)
                cells = []
                for i, mean in enumerate(cmp["means"]):
                    txt = "n/a" if not _finite(mean) else (
                        f"{mean:.1f}%" if info.unit == "%" else f"{mean:.3f}")
                    b = cmp["better"] == i
                    cells.append(f'<td class="num">{"<b>" if b else ""}{txt}{"</b>" if b else ""} '
                                 f'<span class="n">n={cmp["n"][i]}</span></td>')
                rows.append(f"<tr><td>{_e(method)}</td><td>{_e(info.label)} "
                            f'<span class="dir">{info.arrow}</span></td>{"".join(cells)}</tr>')
        out.append(
            "<p>Means per method and measure; the better value in the measure's direction is "
            "bold (no significance test: read the intervals in the sections below).</p>"
            f"<table><tr><th>method</th><th>measure</th>{head}</tr>{''.join(rows)}</table>"
        )
        return "".join(out)

    # -- 5 CAM vs Grad-CAM --------------------------------------------------------------------

    def cam_vs_gradcam(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            cg = res["cam_vs_gradcam"]
            if "skipped" in cg:
                return f'<p class="muted">Not run: {_e(cg["skipped"])}.</p>'
            out = [
                "<table><tr>" + _head("cam_gradcam_correlation", "Pearson correlation")
                + _head("cam_gradcam_iou", f"IoU of regions \u2265 {cg['threshold']:.0%} of max")
                + f"</tr><tr><td class=\"num\">{fmt_stat(cg['correlation'], digits=4)}</td>"
                f"<td class=\"num\">{fmt_stat(cg['iou'])}</td></tr></table>"
            ]
            if vis.get("cam_pair") is not None:
                n = self._show()
                cam, grad = vis["cam_pair"]
                fig = fig_cam_pair(self.sample.images01[:n], cam[:n], grad[:n], self._col_labels(n))
                out.append(self.figs.add(
                    f"cam_vs_gradcam{self._tag(res)}", fig,
                    "Top row: the image; middle: CAM (class weights of the linear head applied "
                    "to the last conv map); bottom: Grad-CAM, both for the true class and "
                    "scaled to their own maximum. The number above each Grad-CAM tile is the "
                    "per-image correlation. On a global-average-pooling + Linear head the two "
                    f"are equal up to a constant factor. n={n} images.",
                    "CAM vs Grad-CAM",
                ))
            return "".join(out)

        return (
            "<p>Both backbones end in global average pooling and one linear layer, the "
            "architecture CAM needs. For such heads Grad-CAM's channel weights are the class "
            "weights divided by the map's area, so the two should agree exactly (correlation 1, "
            "IoU 1); a lower agreement points to a wrong layer or a bug.</p>"
            + self._per_model(body)
        )

    # -- 6 localisation ---------------------------------------------------------------------

    def localisation(self) -> str:
        names = ["box_iou", "localisation_accuracy", "pointing_game", "energy_pointing_game"]

        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            loc = res["localisation"]
            out = []
            if loc["ground_truth"]:
                out.append(_method_table(names, loc["methods"]))
            else:
                out.append('<p class="note">This data has no object masks, so boxes are drawn '
                           "but not scored.</p>")
            if vis["boxes"]:
                n = self._show()
                fig = fig_localisation(
                    self.sample.images01[:n], {m: vis["maps_true"][m][:n] for m in vis["boxes"]},
                    {m: b[:n] for m, b in vis["boxes"].items()},
                    None if vis["gt_boxes"] is None else vis["gt_boxes"][:n],
                    self._col_labels(n),
                )
                out.append(self.figs.add(
                    f"localisation{self._tag(res)}", fig,
                    f"Localisation boxes: each map (true class) is thresholded at "
                    f"{loc['threshold']:.0%} of its maximum and the box around the largest "
                    "connected region is drawn in red; the object's ground-truth box is "
                    "dashed green where known. A good box hugs the green one. "
                    f"n={n} images shown of {loc['n_images']}.",
                    "localisation boxes",
                ))
            return "".join(out)

        return (
            "<p>Weakly-supervised localisation (Zhou et al. 2016) asks whether a map, made for "
            "classification, also finds the object. Box IoU is scored against the bounding box "
            "of the object mask; localisation accuracy counts IoU \u2265 0.5 (ground-truth "
            "class known); the pointing game (Zhang et al. 2016) checks whether the map's peak "
            "is on the object; the energy-based pointing game (Wang et al. 2020) takes the "
            "share of positive map mass on the object. All four: higher is better.</p>"
            + self._per_model(body)
        )

    # -- 7 faithfulness ---------------------------------------------------------------------

    def faithfulness(self) -> str:
        names = ["deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"]

        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            fa = res["faithfulness"]
            out = [_method_table(names, fa["methods"])]
            if vis["curves"]:
                fig = fig_faithfulness(vis["curves"])
                out.append(self.figs.add(
                    f"faithfulness{self._tag(res)}", fig,
                    "Mean probability of the predicted class while the pixels a method ranks "
                    "highest are deleted (left: a steep fall is faithful, lower area is better) "
                    "or inserted into a blurred image (right: a steep rise is faithful, higher "
                    f"area is better). x: fraction of pixels changed. n={fa['n_images']} images "
                    "per curve.",
                    "deletion and insertion curves",
                ))
            return "".join(out)

        s = self.r["settings"]
        return (
            "<p>Does the map point at what the model actually uses? Deletion and insertion "
            f"(Petsiuk et al. 2018) change the image in {s['steps']} steps of "
            f"{1 / s['steps']:.1%} of the pixels, most important first; deleted pixels take "
            "the dataset's mean colour, insertion starts from a Gaussian-blurred image. Average "
            "Drop and Increase in Confidence (Chattopadhay et al. 2018) keep only the explained "
            "evidence (the image multiplied by the max-scaled map). All four explain the "
            "predicted class and use its softmax probability. Directions: deletion AUC "
            "\u2193, insertion AUC \u2191, Average Drop \u2193, Increase in Confidence \u2191."
            "</p>" + self._per_model(body)
        )

    # -- 8 sanity ---------------------------------------------------------------------------

    def sanity(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            sa = res["sanity"]
            steps = sa["steps"]
            head = ("<tr><th>method</th>" + "".join(f'<th class="num">{_e(s)}</th>' for s in steps)
                    + "<th>verdict</th></tr>")
            rows = []
            for m, st in sa["methods"].items():
                verdict = ('<span class="badge bad">does not reflect the model</span>'
                           if st["flagged"] else '<span class="badge ok">passes</span>')
                if st.get("uncertain"):
                    verdict += ' <span class="n">(borderline: the interval spans '
                    verdict += f'{sa["flag_threshold"]})</span>'

                cells = "".join(f'<td class="num">{fmt_stat(x, digits=2)}</td>'
                                for x in st["spearman"])
                rows.append(f'<tr{" class=flag" if st["flagged"] else ""}><td>{_e(m)}</td>'
                            f"{cells}<td>{verdict}</td></tr>")
            out = [
                f"<p>Columns: the cascade, left to right; each column re-initialises one more "
                f"block. Cells: Spearman rank correlation with the trained model's maps "
                f"<span class=\"dir\">\u2193</span> (n={sa['n_images']} images, true class).</p>"
                f"<table>{head}{''.join(rows)}</table>"
            ]
            rnd = vis.get("sanity")
            if rnd and rnd["spearman"]:
                out.append(self.figs.add(
                    f"sanity_curves{self._tag(res)}", fig_sanity_curves(steps, rnd["spearman"]),
                    "Mean Spearman rank correlation (with 95% interval) between the maps of the "
                    "trained model and of the progressively randomised model, as the cascade "
                    "re-initialises blocks from the head (left) down to the input (right). A "
                    "method that reflects the model drops towards 0; a curve that stays high "
                    f"(dashed line: {sa['flag_threshold']}) is flagged. n={sa['n_images']} images.",
                    "sanity curves",
                ))
                out.append(self.figs.add(
                    f"sanity_maps{self._tag(res)}",
                    fig_sanity_maps(self.sample.images01[0], rnd["maps"], ["trained", *steps]),
                    "The first image's true-class map for each method (rows) on the trained "
                    "model (first column) and after each step of the cascade (next columns), "
                    "each map scaled to its own maximum. Maps should degrade into noise or "
                    "nothing; a map that keeps the object's outline after the whole network "
                    "is random shows the input, not the model. n=1 image.",
                    "sanity maps",
                ))
            return "".join(out)

        return (
            "<p>Model-parameter randomisation (Adebayo et al. 2018): the layers are re-"
            "initialised cascading from the classifier down to the first convolution, and each "
            "method's maps are compared with those of the trained model by the Spearman rank "
            "correlation of their absolute values. A method whose maps barely change when the "
            "weights are destroyed does not reflect what the model learned. A randomised map "
            "that turns flat counts as correlation 0.</p>" + self._per_model(body)
        )

    # -- 9 bias -----------------------------------------------------------------------------

    def bias(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            b = res["bias"]
            out = []
            if b["flagged"]:
                items = "".join(
                    f"<li><b>{_e(f['class'])}</b>: {_e('; '.join(f['evidence']))}</li>"
                    for f in b["flagged"]
                )
                out.append(f'<div class="findings"><b>Flagged classes</b><ul>{items}</ul></div>')
            elif b["counterfactual"] is not None:
                out.append('<p><span class="badge ok">no class flagged</span> by the '
                           "counterfactual test.</p>")
            cf = b["counterfactual"]
            if cf is not None:
                rows = []
                flagged = {f["class"] for f in b["flagged"]}
                for name, row in cf["classes"].items():
                    rows.append(
                        f'<tr{" class=flag" if name in flagged else ""}><td>{_e(name)}'
                        f"{' (cue class)' if row['cue_class'] else ''}</td>"
                        f'<td class="num">{fmt_prop(row["accuracy_with_cue"])}</td>'
                        f'<td class="num">{fmt_prop(row["accuracy_without_cue"])}</td>'
                        f'<td class="num">{row["confidence_with_cue"]:.2f} / '
                        f'{row["confidence_without_cue"]:.2f}</td>'
                        f'<td class="num">{row["cue_reliance"]:+.2f} <span class="n">'
                        f'n={row["n"]}</span></td>'
                        f'<td class="num">{_signed(row["cue_attraction"])} <span class="n">'
                        f'n={row["attraction_n"]}</span></td></tr>'
                    )
                out.append(
                    "<h3>Counterfactual: the same images with and without the cue</h3>"
                    f"<p>{cf['n_images']} {_e(self.r['settings']['split'])} images, stratified "
                    "over classes; every image is scored once clean and once with the cue "
                    "stamped on it. A class is flagged when its accuracy with the cue exceeds "
                    f"its accuracy without it by at least {cf['threshold']:.0%} points "
                    "(reliance), or when stamping the cue on other classes' images makes at "
                    f"least {cf['threshold']:.0%} more of them predicted as this class "
                    "(attraction).</p>"
                    "<table><tr><th>class</th><th class=\"num\">accuracy with cue \u2191</th>"
                    "<th class=\"num\">accuracy without cue \u2191</th>"
                    "<th class=\"num\">true-class "
                    "confidence with / without</th>" + _head("cue_reliance", "reliance")
                    + _head("cue_attraction", "attraction") + "</tr>" + "".join(rows) + "</table>"
                )
            else:
                out.append(f'<p class="muted">Counterfactual test not run: '
                           f"{_e(b.get('counterfactual_skipped', ''))}.</p>")
            lead = "gradcam" if "gradcam" in b["methods"] else next(iter(b["methods"]), None)
            out.append(self._energy_table(b))
            if lead is not None:
                out.append(self.figs.add(
                    f"bias{self._tag(res)}", fig_bias(b, lead, self.names),
                    f"Share of the {lead} map's energy (true class) in the image border (left) "
                    "and in the cue patch (right, on images that carry it; hatched: the same "
                    "region on images without the cue), per class. Dashed lines: the region's "
                    "share of the image area, what a map spread evenly would put there. Bars "
                    "far above the line mean the class's evidence sits in that region. Sample "
                    "sizes are in the tables.",
                    "bias energy",
                ))
            return "".join(out)

        return (
            "<p>Does a class lean on something other than the object? Border energy shows "
            "evidence in the image frame; cue energy shows evidence on a known spurious patch; "
            "the counterfactual test measures what happens to predictions when the patch is "
            "added or removed on the same images.</p>" + self._per_model(body)
        )

    def _energy_table(self, b: dict[str, Any]) -> str:
        has_cue = any("cue_energy" in m for m in b["methods"].values())
        head = (f"<tr><th>method</th><th>class</th>{_head('border_energy')}"
                + (_head("cue_energy") + '<th class="num">same region, no cue</th>' if has_cue
                   else "") + "</tr>")
        rows = []
        for m, st in b["methods"].items():
            for name in self.names:
                border = st["border_energy"].get(name)
                cells = f'<td class="num">{fmt_stat(border)}</td>'
                if has_cue:
                    cells += (f'<td class="num">{fmt_stat(st.get("cue_energy", {}).get(name))}</td>'
                              f'<td class="num">'
                              f'{fmt_stat(st.get("cue_region_energy_without_cue", {}).get(name))}'
                              "</td>")
                rows.append(f"<tr><td>{_e(m)}</td><td>{_e(name)}</td>{cells}</tr>")
        area = f"The border ({b['border_width']} px) is {b['border_area']:.0%} of the image"
        if b.get("cue_area") is not None:
            area += f"; the cue patch is {b['cue_area']:.1%}"
        return (f"<h3>Where the evidence sits, per method and class</h3><p>{area} (the "
                "baselines for a map spread evenly).</p>"
                f"<details><summary>Table for every method ({len(rows)} rows)</summary>"
                f"<table>{head}{''.join(rows)}</table></details>")

    # -- 10 evolution -----------------------------------------------------------------------

    def evolution(self) -> str:
        def body(res: dict[str, Any], vis: dict[str, Any]) -> str:
            ev = res["evolution"]
            if "skipped" in ev:
                return f'<p class="muted">Not available: {_e(ev["skipped"])}.</p>'
            out = []
            evis = vis.get("evolution")
            if evis is not None:
                out.append(self.figs.add(
                    f"evolution_maps{self._tag(res)}", fig_evolution_maps(evis),
                    f"Filmstrip: the monitor's {evis['method']} map (true class) of each fixed "
                    "validation image (rows) at the end of each epoch (columns). Each row is "
                    "scaled by its largest value over all epochs, so growing or fading evidence "
                    "stays visible. A shortcut shows up as evidence moving to the same place "
                    f"(e.g. a corner) across images. n={ev['n_images']} images, "
                    f"{len(ev['epochs'])} epochs.",
                    "evolution filmstrip",
                ))
            if ev["scalars"]:
                out.append(self.figs.add(
                    f"evolution_curves{self._tag(res)}", fig_evolution_curves(ev),
                    "The monitor's numbers per epoch, one panel per quantity, one line per "
                    "method: cue energy on biased images (rising = a shortcut forming) and on "
                    "clean ones, object energy and pointing game (higher = on the object), drift "
                    "(1 \u2212 cosine with the previous epoch) and concentration. "
                    f"n={ev['n_images']} fixed validation images.",
                    "evolution curves",
                ))
            return "".join(out)

        return ("<p>From the maps the training monitor saved every epoch (the same fixed "
                "validation images throughout).</p>" + self._per_model(body))


def _signed(v: Any) -> str:
    return f"{v:+.2f}" if _finite(v) else '<span class="na">n/a</span>'


# -- figures ----------------------------------------------------------------------------


def fig_confusion(confusion: Tensor, names: list[str]) -> Figure:
    """Counts with row-normalised colour."""
    c = confusion.float()
    share = c / c.sum(1, keepdim=True).clamp_min(1)
    k = len(names)
    side = max(3.5, 0.42 * k + 1.4)
    fig = Figure(figsize=(side + 0.8, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.55 else "#1d232b")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def fig_images_classes(images01: Tensor, maps: Tensor, probs: Tensor, labels: Tensor,
                       names: list[str]) -> Figure:
    n, k = maps.shape[:2]
    tiles = _overlays(images01, maps, joint=True)
    grid = [[tiles[i * k + j] for j in range(k)] for i in range(n)]
    titles = [[f"p={float(probs[i, j]):.2f}" for j in range(k)] for i in range(n)]
    frames = [["#1e7d34" if j == int(labels[i]) else None for j in range(k)] for i in range(n)]
    row_labels = [f"{names[int(labels[i])]}" for i in range(n)]
    fig, _, _ = _grid_figure(grid, row_labels, [f"map: {c}" for c in names[:k]], titles, frames)
    return fig


def fig_methods(images01: Tensor, maps: dict[str, Tensor], col_labels: list[str]) -> Figure:
    rows = [[_np_image(t) for t in images01]]
    rows += [_overlays(images01, m) for m in maps.values()]
    fig, _, _ = _grid_figure(rows, ["image", *maps], col_labels)
    return fig


def fig_side_by_side(images01: Tensor, maps: list[dict[str, Tensor]], labels: list[str],
                     methods: list[str], col_labels: list[str]) -> Figure:
    rows = [[_np_image(t) for t in images01]]
    row_labels = ["image"]
    for m in methods:
        for label, per_model in zip(labels, maps, strict=True):
            rows.append(_overlays(images01, per_model[m]))
            row_labels.append(f"{m} [{label}]")
    fig, _, _ = _grid_figure(rows, row_labels, col_labels)
    return fig


def fig_cam_pair(images01: Tensor, cam: Tensor, grad: Tensor, col_labels: list[str]) -> Figure:
    from .measures import pearson

    r = pearson(cam, grad)
    rows = [[_np_image(t) for t in images01], _overlays(images01, cam), _overlays(images01, grad)]
    titles = [[""] * len(cam), [""] * len(cam), [f"r={float(v):.3f}" for v in r]]
    fig, _, _ = _grid_figure(rows, ["image", "CAM", "Grad-CAM"], col_labels, titles)
    return fig


def fig_localisation(images01: Tensor, maps: dict[str, Tensor], boxes: dict[str, Tensor],
                     gt: Tensor | None, col_labels: list[str]) -> Figure:
    rows = [_overlays(images01, m) for m in maps.values()]
    fig, ax, where = _grid_figure(rows, list(maps), col_labels)
    for r, m in enumerate(maps):
        for c in range(len(images01)):
            if gt is not None:
                _draw_box(ax, gt[c], "#2ca02c", where[r][c], "--")
            _draw_box(ax, boxes[m][c], "#d62728", where[r][c])
    return fig


def fig_faithfulness(curves: dict[str, dict[str, Tensor]]) -> Figure:
    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = fig.subplots(1, 2)
    for i, (m, c) in enumerate(curves.items()):
        x = c["fractions"].numpy()
        style = "-" if i < 10 else "--"
        colour = PALETTE[i % len(PALETTE)]
        for ax, key in zip(axes, ("deletion", "insertion"), strict=True):
            y = c[f"{key}_curve"].mean(0).numpy()
            auc = float(c[f"{key}_auc"].mean())
            ax.plot(x, y, style, color=colour, label=f"{m} ({auc:.3f})", linewidth=1.5)
    for ax, title in zip(axes, ("Deletion (lower area is better)",
                                "Insertion (higher area is better)"), strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("fraction of pixels deleted / inserted")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, title="method (mean AUC)", title_fontsize=7)
    fig.tight_layout()
    return fig


def fig_sanity_curves(steps: list[str], spearman: dict[str, Tensor]) -> Figure:
    fig = Figure(figsize=(10, 4.2), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(1, len(steps) + 1)
    for i, (m, rho) in enumerate(spearman.items()):
        vals = rho.float()
        mean = torch.nanmean(vals, 1).numpy()
        ok = torch.isfinite(vals)
        cnt = ok.sum(1).clamp_min(1).float()
        centred = torch.where(ok, vals - torch.nanmean(vals, 1, keepdim=True),
                              torch.zeros_like(vals))
        sd = (centred.pow(2).sum(1) / (cnt - 1).clamp_min(1)).sqrt()
        half = (1.96 * sd / cnt.sqrt()).numpy()
        colour = PALETTE[i % len(PALETTE)]
        style = "-o" if i < 10 else "--s"
        ax.plot(x, mean, style, color=colour, label=m, markersize=4, linewidth=1.5)
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.12)
    ax.axhline(0.5, color="#b3261e", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="#888888", linewidth=0.6)
    ax.set_xticks(x, [f"+{s}" for s in steps], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman rank correlation with trained maps")
    ax.set_xlabel("cascading randomisation: blocks re-initialised so far (head first)")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def fig_sanity_maps(image01: Tensor, maps: dict[str, Tensor], columns: list[str]) -> Figure:
    rows = []
    for stack in maps.values():
        rows.append(_overlays(image01.expand(stack.shape[0], *image01.shape), stack[:, 0]))
    fig, _, _ = _grid_figure(rows, list(maps), columns, size=0.9)
    return fig


def fig_bias(b: dict[str, Any], method: str, names: list[str]) -> Figure:
    st = b["methods"][method]
    has_cue = "cue_energy" in st
    fig = Figure(figsize=(11 if has_cue else 6, 3.8), dpi=100)
    axes = fig.subplots(1, 2 if has_cue else 1, squeeze=False)[0]
    x = np.arange(len(names))

    def means(d: dict[str, Any]) -> np.ndarray:
        return np.array([
            (d.get(n) or {}).get("mean") if _finite((d.get(n) or {}).get("mean")) else np.nan
            for n in names
        ], dtype=float)

    ax = axes[0]
    ax.bar(x, means(st["border_energy"]), color="#1f77b4")
    ax.axhline(b["border_area"], color="#b3261e", linestyle="--", linewidth=1,
               label="border share of the area")
    ax.set_title(f"{method} energy in the {b['border_width']}-px border", fontsize=10)
    if has_cue:
        ax = axes[1]
        ax.bar(x - 0.2, means(st["cue_energy"]), width=0.4, color="#d62728", label="with cue")
        ax.bar(x + 0.2, means(st["cue_region_energy_without_cue"]), width=0.4, color="#d62728",
               alpha=0.35, hatch="//", label="same region, no cue")
        ax.axhline(b["cue_area"], color="#444444", linestyle="--", linewidth=1,
                   label="patch share of the area")
        ax.set_title(f"{method} energy in the cue patch", fontsize=10)
    for i, ax in enumerate(axes):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        # The cue panel zooms in: a 4x4 patch is ~2% of a 32x32 image, invisible on 0..1.
        top = 1.0 if i == 0 else min(1.0, max(0.1, 1.3 * max(
            [b["cue_area"]] + [v for v in (*means(st["cue_energy"]),
                                           *means(st["cue_region_energy_without_cue"]))
                               if np.isfinite(v)])))
        ax.set_ylim(0, top)
        ax.set_ylabel("share of positive map mass")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_evolution_maps(evis: dict[str, Any], max_epochs: int = 12, max_images: int = 10) -> Figure:
    maps = evis["maps"]  # [E, N, H, W]
    e, n = maps.shape[:2]
    cols = np.unique(np.linspace(0, e - 1, min(e, max_epochs)).round().astype(int)).tolist()
    n = min(n, max_images)
    images01 = evis["images01"][:n]
    sel = torch.nan_to_num(maps[cols, :n].float(), nan=0.0).clamp_min(0)  # [E', N, H, W]
    peak = sel.amax(dim=(0, 2, 3), keepdim=True)
    scaled = torch.where(peak > 0, sel / peak.clamp_min(1e-12), torch.zeros_like(sel))
    rows = []
    for i in range(n):
        row = [_np_image(images01[i])]
        row += [_np_image(render.overlay(images01[i : i + 1], scaled[j, i : i + 1])[0])
                for j in range(len(cols))]
        rows.append(row)
    names = evis["class_names"]
    labels = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in evis["labels"][:n]]
    fig, _, _ = _grid_figure(rows, labels, ["image", *[f"epoch {evis['epochs'][j]}" for j in cols]],
                          size=0.9)
    return fig


def fig_evolution_curves(ev: dict[str, Any]) -> Figure:
    scalars = ev["scalars"]
    quantities = sorted({q for per in scalars.values() for q in per})
    cols = min(3, len(quantities))
    rows = -(-len(quantities) // cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    epochs = ev["epochs"]
    for qi, q in enumerate(quantities):
        ax = axes[qi // cols, qi % cols]
        for mi, (m, per) in enumerate(scalars.items()):
            ys = [np.nan if v is None else v for v in per.get(q, [])]
            if ys:
                ax.plot(epochs[: len(ys)], ys, "-o", markersize=3,
                        color=PALETTE[mi % len(PALETTE)], label=m)
        ax.set_title(q, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if qi == 0:
            ax.legend(fontsize=7)
    for qi in range(len(quantities), rows * cols):
        axes[qi // cols, qi % cols].axis("off")
    fig.tight_layout()
    return fig


# -- words and data for the page --------------------------------------------------------


def _mean(stat: dict[str, Any] | None) -> float:
    v = (stat or {}).get("mean")
    return float(v) if _finite(v) else float("-inf")


def flag_evidence(
    name: str, row: dict[str, Any], energy: dict[str, Any] | None, method: str,
    cue_area: float, threshold: float,
) -> list[str]:
    """Plain-words evidence for a class flagged by the counterfactual test."""
    out = []
    if energy and energy.get("n"):
        out.append(
            f"{energy['mean']:.0%} of {method} energy on the cue patch, which covers "
            f"{cue_area:.1%} of the image (n={energy['n']})"
        )
    if row["cue_reliance"] >= threshold:
        out.append(
            f"accuracy falls from {row['accuracy_with_cue']['value']:.0%} with the cue to "
            f"{row['accuracy_without_cue']['value']:.0%} without it (n={row['n']})"
        )
    if _finite(row["cue_attraction"]) and row["cue_attraction"] >= threshold:
        out.append(
            f"stamping the cue on other classes' images turns {row['cue_attraction']:.0%} more "
            f"of them into {name} (n={row['attraction_n']})"
        )
    return out


def findings(result: dict[str, Any]) -> list[str]:
    """Headline findings of one model in plain words, most important first."""
    out: list[str] = []
    for flag in result["bias"]["flagged"]:
        out.append(f"class {flag['class']}: " + "; ".join(flag["evidence"]) + ".")
    summary = result["summary"]
    acc = summary["accuracy"]
    lo, hi = acc["ci95"]
    out.append(
        f"Accuracy: {acc['value']:.1%} (95% CI {lo:.1%}\u2013{hi:.1%}, n={acc['n']}, "
        f"{len(summary['class_names'])} classes)."
    )
    per = [(v["value"], k, v["n"]) for k, v in summary["per_class"].items() if v["n"]]
    if per:
        worst = min(per)
        out.append(f"Weakest class: {worst[1]} at {worst[0]:.0%} (n={worst[2]}).")
    sanity = result["sanity"]["methods"]
    bad = [m + (" (borderline)" if sanity[m].get("uncertain") else "")
           for m, v in sanity.items() if v["flagged"]]
    if bad:
        out.append(
            "Sanity check failed for " + ", ".join(bad) + ": their maps keep a mean rank "
            f"correlation of at least {result['sanity']['flag_threshold']} with a fully "
            "randomised model, so they do not reflect what the model learned."
        )
    faith = result["faithfulness"]["methods"]
    if faith:
        best = max(faith, key=lambda m: _mean(faith[m]["insertion_auc"]))
        st = faith[best]["insertion_auc"]
        out.append(
            f"Most faithful by insertion AUC (higher is better): {best}, {_mean(st):.2f} "
            f"(n={st['n']})."
        )
    loc = result["localisation"]
    if loc["ground_truth"] and loc["methods"]:
        best = max(loc["methods"], key=lambda m: _mean(loc["methods"][m]["box_iou"]))
        st = loc["methods"][best]["localisation_accuracy"]
        out.append(
            f"Best localisation: {best}, box IoU \u2265 0.5 on {_mean(st):.0%} of images "
            f"(n={st['n']})."
        )
    cam = result["cam_vs_gradcam"]
    if "correlation" in cam and _mean(cam["correlation"]) < 0.99:
        out.append(
            f"CAM and Grad-CAM correlate at only {_mean(cam['correlation']):.3f}; on a GAP + "
            "Linear head they should be equal up to scale, so check the explained layer."
        )
    bias = result["bias"]
    lead = "gradcam" if "gradcam" in bias["methods"] else next(iter(bias["methods"]), None)
    if lead is not None:
        for name, stat in bias["methods"][lead]["border_energy"].items():
            if stat["n"] >= 3 and _mean(stat) >= min(0.95, 2 * bias["border_area"]):
                out.append(
                    f"class {name}: {_mean(stat):.0%} of {lead} energy in the "
                    f"{bias['border_width']}-pixel border, which is {bias['border_area']:.0%} "
                    f"of the image (n={stat['n']})."
                )
    return out


def evolution_data(
    fixed: dict[str, Any], epochs: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The monitor's records -> the numbers (per method, per epoch) and the filmstrip maps.

    The filmstrip uses Grad-CAM when the monitor saved it, else its first method, and the
    true-class map of each fixed image.
    """
    # Every method any epoch has (an epoch whose maps were not finite has none).
    methods = list(dict.fromkeys(m for rec in epochs for m in rec.get("maps", {})))
    method = "gradcam" if "gradcam" in methods else (methods[0] if methods else None)
    names = sorted({(m, q) for rec in epochs for m, per in rec.get("scalars", {}).items()
                    for q in per})
    scalars: dict[str, dict[str, list]] = {}
    for meth, q in names:
        scalars.setdefault(meth, {})[q] = [
            rec.get("scalars", {}).get(meth, {}).get(q) for rec in epochs
        ]
    ep = [int(r["epoch"]) for r in epochs]
    result = {
        "epochs": ep,
        "methods": methods,
        "filmstrip_method": method,
        "n_images": int(fixed["labels"].numel()),
        "scalars": scalars,
    }
    if method is None:
        return result, None
    labels = fixed["labels"].long()
    n = len(labels)
    size = tuple(fixed["images"].shape[-2:])
    stacks = []
    for rec in epochs:
        maps = rec.get("maps", {}).get(method)
        stacks.append(maps.float()[torch.arange(n), labels] if maps is not None
                      else torch.full((n, *size), float("nan")))
    return result, {
        "images01": fixed["images"].float() / 255.0,
        "labels": labels,
        "class_names": list(fixed.get("class_names") or []),
        "epochs": ep,
        "maps": torch.stack(stacks),  # [E, N, H, W]
        "method": method,
    }
