"""What a benchmark reports about the machine and the libraries it ran with."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(dist: str) -> str:
    """An installed distribution's version, or ``?`` when it is not installed."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
