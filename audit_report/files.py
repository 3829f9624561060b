"""What the audit writes to disk: strict JSON, the report folder swap, library versions.

Every file goes to a temporary name first and is renamed into place (one atomic writer
for the project, :func:`explain.records.atomic_write_bytes`), and the report folder itself
is built beside its final place and swapped in only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from explain.records import atomic_write_bytes


class AuditError(RuntimeError):
    """The audit can not run as asked (output folder, incompatible models)."""


def jsonable(obj: Any) -> Any:
    """Results -> JSON types: dataclasses (minus their ``visual`` fields; a field's
    ``json`` metadata renames its key, e.g. ``class_name`` -> ``class``), tensors, paths and
    tuples; NaN and infinities become null (valid JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.metadata.get("json", f.name): jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("visual")
        }
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


def plain(obj: Any) -> Any:
    """Nested dataclasses -> dicts of their fields (by field name), through lists, tuples
    and dicts; tensors and everything else as they are. What the cache can store under
    its safe loading, and what a result's own ``from_plain`` rebuilds."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    return obj


def write_metrics(path: str | Path, results: dict[str, Any]) -> None:
    """Write ``metrics.json`` (strict JSON, indented) atomically."""
    text = json.dumps(jsonable(results), indent=1, allow_nan=False)
    atomic_write_bytes(Path(path), text.encode())


def versions() -> dict[str, str]:
    """Python, platform and the versions of the libraries behind the numbers."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "matplotlib",
                 "camlight"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def umask() -> int:
    """The process's file-creation mask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier audit report."""
    if out.exists():
        if not out.is_dir():
            raise AuditError(f"--out {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (out / "metrics.json").is_file():
            raise AuditError(
                f"--out {str(out)!r} exists and does not hold an earlier audit report; "
                "choose an empty or new directory"
            )


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what a killed audit of ``out`` left beside it (``.<name>.tmp-*`` folders being
    built, ``.<name>.old-*`` reports being swapped out); return what was removed. Two audits
    writing the same ``--out`` at the same time are not supported (the last one wins)."""
    gone = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    return gone


def publish(tmp: Path, out: Path) -> None:
    """Move the finished report into place; an earlier report is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the earlier report back rather than leave nothing
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
