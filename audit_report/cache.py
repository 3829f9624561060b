"""Results of an audit kept for the next one: re-running with one more method (or another
threshold) recomputes only what changed.

Each entry is keyed by everything that determines it (the checkpoint's SHA-256, the data
config, the method and its options, the image indices, the seed and the section's own
settings) and saved with ``torch.save`` in ``<report>/cache/``; entries are read with
``weights_only=True``. A changed checkpoint has another hash, so its entries never match.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from explain.records import atomic_save

CACHE_DIR = "cache"
# Part of every key: bump it when a cached computation changes, so that a report made by
# an earlier version of the audit is recomputed rather than reused. 2: the second speed
# round (true/predicted-class maps, the quadratic curves, the map-free results).
CACHE_VERSION = 2


class ResultCache:
    """Look-ups in an earlier report's cache; writes into the report being built.

    Args:
        read_from: the earlier report's folder (its ``cache/`` is read), or None.
        write_to: the new report's folder (its ``cache/`` receives every entry used, so
            the next run finds them), or None to keep nothing.
    """

    def __init__(self, read_from: Path | None, write_to: Path | None) -> None:
        self.read_dir = read_from / CACHE_DIR if read_from is not None else None
        self.write_dir = write_to / CACHE_DIR if write_to is not None else None
        if self.write_dir is not None:
            self.write_dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, parts: dict[str, Any]) -> str:
        """A file name for ``parts``: the kind and a hash of their canonical JSON."""
        text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True,
                          default=str)
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"

    def has(self, kind: str, parts: dict[str, Any]) -> bool:
        """Whether a value for ``parts`` is stored (no loading, no hit counted)."""
        name = self.key(kind, parts)
        return any(folder is not None and (folder / name).is_file()
                   for folder in (self.write_dir, self.read_dir))

    def get(self, kind: str, parts: dict[str, Any]) -> Any | None:
        """The stored value for ``parts``, or None (a miss)."""
        name = self.key(kind, parts)
        for folder in (self.write_dir, self.read_dir):
            if folder is None or not (folder / name).is_file():
                continue
            try:
                value = torch.load(folder / name, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
                continue  # unreadable: recompute rather than fail the audit
            if folder is self.read_dir and self.write_dir is not None:
                shutil.copyfile(folder / name, self.write_dir / name)
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, kind: str, parts: dict[str, Any], value: Any) -> None:
        """Store ``value`` (tensors, numbers, strings, lists and dicts of them)."""
        if self.write_dir is not None:
            atomic_save(value, self.write_dir / self.key(kind, parts))
