"""The audit report: checkpoints in, a self-contained HTML report and metrics.json out.

    from audit_report import AuditSettings, run_audit
    result = run_audit(AuditSettings(ckpt=["runs/.../last.ckpt"], methods=["gradcam"]))
    result.path, result.verdict.status, result.findings   # the folder, "clean"/"findings"

    from audit_report import audit          # a plain nn.Module and a torch Dataset
    out = audit(model, dataset, class_names=names, out="report", layer="features.7")

Layout: :mod:`.settings` (what is asked), :mod:`.sample` (the images), :mod:`.run` (the
orchestration and the per-method map cache), :mod:`.sections` (one object per section:
compute -> typed result -> render -> findings), :mod:`.findings` (the judgement rules and
thresholds), :mod:`.figures` (matplotlib), :mod:`.page` (the page and its figures),
:mod:`.html` and ``templates/`` (the HTML and CSS, Jinja2 with autoescaping), :mod:`.files`
(metrics.json, the report folder swap). Uses :mod:`explain` and :mod:`explain.measures`;
neither of those imports this package.
"""

from __future__ import annotations

from .api import audit
from .files import AuditError
from .findings import AuditResult, Verdict
from .overlay import show_overlay
from .run import run_audit
from .sections import SECTIONS, Section
from .settings import AuditSettings
from .state import SCHEMA_VERSION, AuditRun, ModelAudit

__all__ = [
    "SCHEMA_VERSION",
    "SECTIONS",
    "AuditError",
    "AuditResult",
    "AuditRun",
    "AuditSettings",
    "ModelAudit",
    "Verdict",
    "Section",
    "audit",
    "run_audit",
    "show_overlay",
]
