"""An audit in a minute: what the audit's speed settings save, and what they change.

    python bench/audit_speed.py --ckpt /tmp/qs/.../last.ckpt                 # levers + audits
    python bench/audit_speed.py --ckpt CKPT --skip-audits --images 8         # levers only
    python bench/audit_speed.py --ckpt CKPT --skip-levers --presets all      # one audit

Levers (on the first ``--images`` images of the audit's seeded sample, every class): for
each approximation in ``audit_report.settings.FAST_OPTIONS`` and its neighbours, the
seconds per image and the Pearson correlation of its maps with the exact setting's (mean
and minimum over image x class maps); Integrated Gradients also gives its completeness
error (|sum of the map - (y(x) - y(0))|, median and max over image x class, relative to the
mean |y(x) - y(0)|); LIME and SmoothGrad give their stability, the Spearman rank
correlation of the maps of seed 0 and seed 1.

Audits: ``python audit.py --ckpt CKPT --methods PRESET --cache false`` for each preset
(default and all), its wall time and from metrics.json the seconds of each section and of
each method (explain and sanity).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import explain  # noqa: E402
from audit_report.sample import make_sample  # noqa: E402
from explain.measures.agreement import pearson  # noqa: E402
from explain.measures.sanity import spearman  # noqa: E402
from lit_modules.loading import load_run  # noqa: E402

# (method, fixed options, the option varied, its values, its exact value; None: the
# exact maps are the first lever's exact run of the same method).
LEVERS = [
    ("integrated_gradients", {}, "steps", [4, 8, 16, 50], 50),
    ("scorecam", {}, "top_k", [16, 32, 64, 128, None], None),
    ("lime", {}, "samples", [32, 64, 128, 256], 256),
    ("lime", {"cells": 4}, "samples", [32, 64, 128], None),
    ("smoothgrad", {}, "samples", [4, 8, 16], 16),
]
STOCHASTIC = ("lime", "smoothgrad")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _corr(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    r = pearson(a.flatten(0, 1), b.flatten(0, 1))
    r = r[torch.isfinite(r)]
    return float(r.mean()), float(r.min())


def levers(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        diff = (model(x) - model(torch.zeros_like(x))).double()  # [B, K]
    exact_maps = {}
    for method, fixed, option, values, exact in LEVERS:
        extra = {"batch_size": batch_size} if explain.get(method).family == "perturbation" else {}
        extra.update(fixed)
        runs = {v: _timed(lambda kw={option: v, **extra}, m=method: explain.run(model, x, m, **kw))
                for v in values}
        if exact is not None:
            exact_maps[method] = runs[exact][0]
        for v in values:
            maps, secs = runs[v]
            row = {"method": method, **fixed, option: v, "exact": v == exact,
                   "s_per_image": secs / x.shape[0]}
            row["pearson_mean"], row["pearson_min"] = _corr(maps, exact_maps[method])
            if method == "integrated_gradients":
                err = (maps.double().sum((-2, -1)) - diff).abs() / diff.abs().mean()
                row["completeness_median"] = float(err.median())
                row["completeness_max"] = float(err.max())
            if method in STOCHASTIC:
                other = explain.run(model, x, method, **{option: v}, seed=1, **extra)
                rho = spearman(maps.flatten(0, 1), other.flatten(0, 1), absolute=False)
                row["seed_spearman"] = float(rho[torch.isfinite(rho)].mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def audit_once(ckpt: str, preset: str, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "audit.py"), "--ckpt", ckpt, "--methods", preset,
           "--out", out, "--cache", "false", "--progress", "false", *extra]
    _, wall = _timed(lambda: subprocess.run(cmd, check=True, cwd=ROOT))
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["models"][0]
    methods = m["methods_classes"]["methods"]
    sanity = m["sanity"]["methods"]
    row = {
        "preset": preset, "extra": extra, "wall_s": wall, "timing": m["timing"],
        "explain_s": {k: v.get("seconds") for k, v in methods.items()},
        "sanity_s": {k: v.get("seconds") for k, v in sanity.items()},
        "sanity_final": {k: [v["final"]["mean"], v["flagged"]] for k, v in sanity.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--images", type=int, default=8, help="images for the lever comparisons")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--presets", default="default,all")
    p.add_argument("--audit-args", default="", help="extra audit.py arguments, space-separated")
    p.add_argument("--out", default="/tmp/audit_speed")
    p.add_argument("--skip-levers", action="store_true")
    p.add_argument("--skip-audits", action="store_true")
    args = p.parse_args()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "load": os.getloadavg()[0]}), flush=True)
    if not args.skip_levers:
        run = load_run(args.ckpt, None, "cpu")
        x = make_sample(run, "test", 64, 0).images[: args.images]
        levers(run.model, x, args.batch_size)
    if not args.skip_audits:
        for preset in args.presets.split(","):
            audit_once(args.ckpt, preset, os.path.join(args.out, preset),
                       args.audit_args.split())
            print(json.dumps({"load_after": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
