"""The report's HTML: one Jinja2 environment over ``audit_report/templates``.

Every value a template prints is escaped (``autoescape``) unless it is
:class:`markupsafe.Markup`, and only the project makes Markup: the number formatters
below (which escape whatever data they wrap) and rendered templates. Class names, method
names, paths and captions are data, so they reach the page as text whatever they hold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from explain.measures import get_measure

# The muted "n/a" of a number that is missing or not finite.
NA = Markup('<span class="na">n/a</span>')


def finite(v: Any) -> bool:
    """A real, finite number (not None, not NaN)."""
    return isinstance(v, int | float) and math.isfinite(v)


def fmt_stat(stat: dict[str, Any] | None, unit: str = "", digits: int = 3) -> Markup:
    """``mean ± 95% half-width`` with the sample size, as HTML."""
    if not stat or not stat.get("n") or not finite(stat.get("mean")):
        return NA
    mean = stat["mean"]
    lo, hi = stat.get("ci95", [None, None])
    pct = unit == "%"
    out = Markup("{}").format(f"{mean:.1f}%" if pct else f"{mean:.{digits}f}")
    if stat.get("interval") == "wilson" and finite(lo) and finite(hi):
        # Asymmetric (a share near 0 or 1): show the interval itself.
        lo_t, hi_t = (f"{lo:.0f}%", f"{hi:.0f}%") if pct else (f"{lo:.2f}", f"{hi:.2f}")
        out += Markup(' <span class="ci">[{}\u2013{}]</span>').format(lo_t, hi_t)
    elif finite(lo) and finite(hi):
        half = (hi - lo) / 2
        out += Markup(" \u00b1 {}").format(f"{half:.1f}" if pct else f"{half:.{digits}f}")
    return out + Markup(' <span class="n">n={}</span>').format(stat["n"])


def fmt_prop(p: dict[str, Any] | None) -> Markup:
    """A share with its Wilson 95% interval and sample size, as HTML."""
    if not p or not p.get("n"):
        return NA
    lo, hi = p["ci95"]
    return Markup('{} <span class="ci">[{}\u2013{}]</span> <span class="n">n={}</span>').format(
        f"{p['value']:.1%}", f"{lo:.0%}", f"{hi:.0%}", p["n"])


def signed(v: Any) -> Markup:
    """``+0.12`` / ``-0.05``, or n/a."""
    return Markup("{}").format(f"{v:+.2f}") if finite(v) else NA


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``: plain text, escaped where it is printed."""
    return format(value, spec)


@functools.cache
def environment() -> Environment:
    """The report's template environment (made once)."""
    env = Environment(
        loader=PackageLoader("audit_report", "templates"),
        # Every template escapes, whatever its name: a template added under another
        # extension must not silently print data as markup.
        autoescape=True,
        # A misspelt name in a template raises instead of printing nothing.
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(stat=fmt_stat, prop=fmt_prop, signed=signed, fmt=fmt)
    env.tests["finite"] = finite
    env.globals["measure"] = get_measure
    return env


def render(template: str, **context: Any) -> Markup:
    """``template`` rendered with ``context``: the page's own (escaped) markup."""
    return Markup(environment().get_template(template).render(**context))


def macro(template: str, name: str) -> Callable[..., Markup]:
    """The macro ``name`` of ``template``, callable from Python; it returns Markup."""
    return getattr(environment().get_template(template).module, name)
