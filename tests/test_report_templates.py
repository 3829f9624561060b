"""The report's templates: data reaches the page only as text, and a template that names
something it was not given fails instead of printing nothing.

No training: the pieces are rendered from hand-made results, as fast as a unit test.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jinja2 import UndefinedError
from markupsafe import Markup
from matplotlib.figure import Figure

from audit_report.findings import Finding
from audit_report.html import NA, environment, fmt_prop, fmt_stat, macro, signed
from audit_report.page import FigureStore, Page
from audit_report.removal import RemovalPlan
from audit_report.sections import SECTIONS, BiasResult, SanityResult, ShortcutResult
from audit_report.sections.base import Section
from audit_report.sections.bias import BiasSection
from audit_report.sections.measured import SanitySection
from audit_report.sections.removal import ShortcutRemovalSection
from audit_report.sections.shortcuts import (
    ClassSpot,
    ClusterSpot,
    ColourReliance,
    Margin,
    SelfCheck,
    Suspect,
    SuspectedShortcutsSection,
)

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["<img src=x onerror=alert(1)>", 'a & "b"', "</figcaption><script>"]
# Each hostile string as the page must show it: escaped.
SHOWN = ["&lt;img src=x onerror=alert(1)&gt;", "a &amp; &#34;b&#34;",
         "&lt;/figcaption&gt;&lt;script&gt;"]


def only_text(html: str) -> None:
    """No hostile string got through as markup, and each one that was given is shown."""
    for raw in ("<img src=x", "<script", 'a & "b"', "</figcaption><script"):
        assert raw not in html, raw
    assert any(shown in html for shown in SHOWN)


STAT = {"mean": 0.5, "ci95": [0.4, 0.6], "n": 6}
PROP = {"value": 0.5, "ci95": [0.25, 0.75], "n": 6}


def test_formatters_return_markup_and_escape_the_data_inside() -> None:
    for out in (fmt_stat(STAT), fmt_prop(PROP), signed(0.25), signed(math.nan)):
        assert isinstance(out, Markup)
    assert fmt_stat(STAT) == '0.500 \u00b1 0.100 <span class="n">n=6</span>'
    share = {"mean": 50.0, "ci95": [40.0, 61.0], "n": 6, "interval": "wilson"}
    assert fmt_stat(share, unit="%") == (
        '50.0% <span class="ci">[40%\u201361%]</span> <span class="n">n=6</span>')
    assert fmt_prop(PROP) == (
        '50.0% <span class="ci">[25%\u201375%]</span> <span class="n">n=6</span>')
    assert signed(0.25) == "+0.25" and signed(None) == signed(math.inf) == NA
    assert fmt_stat(None) == fmt_prop({"n": 0}) == NA
    # A sample size is a number; were it text, it is still printed as text.
    only_text(fmt_stat({**STAT, "n": HOSTILE[0]}) + fmt_prop({**PROP, "n": HOSTILE[2]}))


def test_the_shared_macros_print_labels_as_text() -> None:
    m = environment().get_template("macros.html.j2").module
    html = (m.method_table(["box_iou"], {name: {"box_iou": STAT} for name in HOSTILE})
            + m.measure_head("box_iou", HOSTILE[0]) + m.not_run(HOSTILE[1], HOSTILE[2])
            + m.model_heading(SimpleNamespace(label=HOSTILE[1], name=HOSTILE[0]))
            + m.badge("ok", HOSTILE[2]) + m.stat_cell(STAT) + m.prop_cell(PROP)
            + m.margin(0.4, [0.3, 0.5]) + m.margin(0.4, [math.nan, 0.5]))
    assert isinstance(html, Markup)
    only_text(html)
    for shown in SHOWN:
        assert shown in html
    assert f"<tr><td>{SHOWN[1]}</td>" in html  # a method label, in its own cell
    assert '<td class="num">0.500 \u00b1 0.100 <span class="n">n=6</span></td>' in html
    assert html.endswith('+0.40 <span class="ci">[+0.30, +0.50]</span>+0.40')


def test_a_figure_escapes_its_caption_and_alt_text(tmp_path: Path) -> None:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    store = FigureStore(tmp_path, None)
    html = store.add(HOSTILE[2], fig, caption=HOSTILE[2] + " " + HOSTILE[0], alt=HOSTILE[1])
    assert isinstance(html, Markup)
    assert re.fullmatch(
        r'<figure><img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="a &amp; &#34;b&#34;">'
        r"<figcaption><b>Figure 1\.</b> &lt;/figcaption&gt;&lt;script&gt; "
        r"&lt;img src=x onerror=alert\(1\)&gt;</figcaption></figure>", html)
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["01___figcaption__script_.png"]


class PlainText(Section):
    """A section whose body is a plain ``str``: text, not markup, to the page."""

    id = "plain"
    title = HOSTILE[0]

    def render(self, page, model, result) -> str:
        return "<b>made by hand</b>"


def _hostile_audit() -> SimpleNamespace:
    """An audited model whose class names, method names, paths and findings are hostile."""
    nan = math.nan
    shortcut = ShortcutResult(
        method=HOSTILE[0], n_images=6, window=[8, 8], z_threshold=2.5, min_lift=1.5,
        smallest_flagged_lift=nan, classes={HOSTILE[0]: ClassSpot(
            [0, 0, 8, 8], 3.0, 3.0, 0.8, 6, True, [ClusterSpot(0.5, [0, 0, 8, 8], 3.0, 0.8)])},
        suspects=[Suspect(
            class_name=HOSTILE[0], index=0, kind="box", box=[0, 0, 8, 8], size=None,
            share=1.0, lift=3.0, z=3.0, consistency=0.8, largest_cluster_share=1.0,
            flip_rate=0.9, controls={HOSTILE[2]: 0.1}, targets=6, confirmed=True,
            margins={HOSTILE[2]: Margin(0.8, 0.7, 0.9, 6)}, margin=Margin(0.8, 0.7, 0.9, 6),
            accuracy=1.0, accuracy_hotspot_covered=0.2, accuracy_random_covered=0.9)],
        colour={HOSTILE[1]: ColourReliance(0.5, {"other_class_colour": 0.1},
                                           Margin(0.4, 0.2, 0.6, 6), 6, True)},
        self_check={HOSTILE[2]: SelfCheck([0, 0, 8, 8], 0.9, None, None, 0.0)})
    sanity = SanityResult(
        steps=[HOSTILE[0]], n_images=2, target="true class", flag_threshold=0.5,
        methods={HOSTILE[1]: {"flagged": True, "uncertain": True, "spearman": [STAT]}},
        final_only=[HOSTILE[2]])
    per_class = {name: STAT for name in HOSTILE}
    bias = BiasResult(
        target="true class", border_width=3, border_area=0.3, cue=None,
        cue_description=HOSTILE[0], cue_area=0.05,
        methods={HOSTILE[1]: {"border_energy": per_class, "cue_energy": per_class,
                              "cue_region_energy_without_cue": per_class}},
        counterfactual={"n_images": 6, "threshold": 0.2, "classes": {HOSTILE[0]: {
            "cue_class": True, "accuracy_with_cue": PROP, "accuracy_without_cue": PROP,
            "accuracy_with_control": PROP, "confidence_with_cue": 0.9,
            "confidence_without_cue": 0.5, "cue_reliance_margin": 0.4,
            "cue_reliance_margin_ci95": [0.3, 0.5], "n": 6, "cue_attraction_margin": nan,
            "cue_attraction_margin_ci95": [nan, nan], "attraction_n": 0}}},
        flagged=[{"class": HOSTILE[0], "index": 0, "evidence": [HOSTILE[2], HOSTILE[1]]}])
    model = SimpleNamespace(
        label="A", name=HOSTILE[0],
        findings=[Finding(HOSTILE[2], flag=True, kind="shortcut", severity="high")],
        results={"shortcuts": shortcut, "sanity": sanity, "bias": bias, "plain": None})
    plan = RemovalPlan("A", [{"class_index": 0, "box": [0, 0, 8, 8], "class_name": HOSTILE[0]}],
                       2, HOSTILE[1], f"/tmp/{HOSTILE[2]}/remove.yaml", "/tmp/p.pt",
                       f"python train.py fit --config '/tmp/{HOSTILE[2]}'", HOSTILE[1],
                       [HOSTILE[1]], quick_command=f"python train.py fit --config "
                       f"'/tmp/{HOSTILE[2]}' --model.shortcut_removal.method refit")
    return SimpleNamespace(
        models=[model], cache=None, results={"removal_plan": plan},
        sample=SimpleNamespace(class_names=HOSTILE, indices=[0, 1, 2],
                               labels=torch.tensor([0, 1, 2]), show=3),
        settings=SimpleNamespace(split=HOSTILE[1], methods=[HOSTILE[1]], seed=0, device="cpu"),
        created=HOSTILE[2], versions={"python": HOSTILE[0], "platform": HOSTILE[1]},
        command=["audit.py", "--out", HOSTILE[2]], seconds=1.0, schema_version=7)


def test_the_page_and_its_sections_show_hostile_data_only_as_text(tmp_path: Path) -> None:
    sections = [SuspectedShortcutsSection(), SanitySection(), BiasSection(), PlainText()]
    page = Page(_hostile_audit(), tmp_path).render(sections)
    only_text(page)
    assert "<b>made by hand</b>" not in page and "&lt;b&gt;made by hand&lt;/b&gt;" in page
    # The quick alternative is printed, its path shown as text like the plan's.
    assert (f"<pre>python train.py fit --config &#39;/tmp/{SHOWN[2]}&#39; "
            "--model.shortcut_removal.method refit</pre>") in page
    # The structure the tests of whole reports read is there, with the data as text.
    assert '<section id="shortcuts"><h2><span class="num">1.</span>Suspected shortcuts</h2>' in page
    assert f'<a href="#plain">4. {SHOWN[0]}</a>' in page
    assert f"<title>Audit report: {SHOWN[0]}</title>" in page
    assert page.index('<div class="verdict bad">') < page.index("<section id=")
    assert f"<h3>{SHOWN[0]} " in page and f"<li><b>{SHOWN[0]}</b>: {SHOWN[2]}; {SHOWN[1]}</li>" in page
    assert f"<pre>python train.py fit --config &#39;/tmp/{SHOWN[2]}&#39;</pre>" in page
    assert f"<code>audit.py --out {SHOWN[2]}</code>" in page
    # The bias figure (the only one drawn) names the hostile lead method in its caption.
    (caption,) = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert caption.startswith(f"<b>Figure 1.</b> Share of the {SHOWN[1]} map") and "<" not in (
        caption.removeprefix("<b>Figure 1.</b>"))
    assert page.endswith("</main></body></html>\n")


def test_every_section_has_its_template_and_every_template_ships() -> None:
    env = environment()
    for section in [*SECTIONS, ShortcutRemovalSection()]:
        env.get_template(section.template)
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("jinja2") for d in config["project"]["dependencies"])
    folder = ROOT / "audit_report"
    shipped = {p for g in config["tool"]["setuptools"]["package-data"]["audit_report"]
               for p in folder.glob(g)}
    templates = {p for p in (folder / "templates").rglob("*") if p.is_file()}
    assert templates and templates <= shipped, templates - shipped
    for path in templates:
        # Nothing is marked safe in a template: markup comes from the project's code only.
        assert not re.search(r"\|\s*safe\b", path.read_text()), path


def test_a_name_a_template_was_not_given_raises() -> None:
    env = environment()
    assert env.from_string("{{ x }}").render(x="<b>") == "&lt;b&gt;"  # any template escapes
    with pytest.raises(UndefinedError):
        env.from_string("<p>{{ resutl }}</p>").render(result=1)
    with pytest.raises(UndefinedError):
        env.from_string("<p>{{ result.metod }}</p>").render(result=SimpleNamespace(method="x"))
    with pytest.raises(UndefinedError):
        macro("macros.html.j2", "not_run")()  # the reason not given
    with pytest.raises(UndefinedError):  # a result that lacks a field the template reads
        SanitySection().html("body", result=SimpleNamespace(steps=[], methods={}))


def test_shortcut_results_stay_typed_through_the_cache_and_keep_their_json() -> None:
    """The cache stores plain dicts (safe loading); the result is typed again on the way
    back, and metrics.json still names the class ``class``."""
    import dataclasses

    from audit_report.files import jsonable, plain

    result = _hostile_audit().models[0].results["shortcuts"]
    stored = {f.name: plain(getattr(result, f.name)) for f in dataclasses.fields(result)}
    assert isinstance(stored["suspects"][0], dict)
    back = ShortcutResult(**stored)
    assert back.suspects == result.suspects and isinstance(back.suspects[0], Suspect)
    assert isinstance(back.suspects[0].margins[HOSTILE[2]], Margin)
    assert back.classes == result.classes and isinstance(back.classes[HOSTILE[0]], ClassSpot)
    assert isinstance(back.classes[HOSTILE[0]].clusters[0], ClusterSpot)
    assert back.colour == result.colour and back.self_check == result.self_check
    record = jsonable(back)["suspects"][0]
    assert record["class"] == HOSTILE[0] and "class_name" not in record
    assert record["margin"] == {"mean": 0.8, "low": 0.7, "high": 0.9, "n": 6}
