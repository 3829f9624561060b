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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explain.records import atomic_save, atomic_write_bytes

CACHE_DIR = "cache"
# Part of every key: bump it when a cached computation changes, so that a report made by
# an earlier version of the audit is recomputed rather than reused. 2: the second speed
# round (true/predicted-class maps, the quadratic curves, the map-free results).
CACHE_VERSION = 3  # 3: entries wrapped with their own name, files with a digest beside them


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
    def key(kind: str, parts: dict[str, Any], suffix: str = ".pt") -> str:
        """A file name for ``parts``: the kind and a hash of their canonical JSON."""
        text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True,
                          default=str)
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}{suffix}"

    def has(self, kind: str, parts: dict[str, Any]) -> bool:
        """Whether a value for ``parts`` is stored (no loading, no hit counted)."""
        name = self.key(kind, parts)
        return any(folder is not None and (folder / name).is_file()
                   for folder in (self.write_dir, self.read_dir))

    def _read(self, name: str, load: Callable[[Path], Any]) -> Any | None:
        """``load`` of the stored file ``name`` (this report's, else the earlier one's,
        which is then carried into this report's cache), or None if absent or unreadable."""
        for folder in (self.write_dir, self.read_dir):
            if folder is None or not (folder / name).is_file():
                continue
            try:
                value = load(folder / name)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, _Invalid) as exc:
                # Unreadable or not what was stored: recompute rather than fail or trust it.
                warnings.warn(f"audit cache: ignoring {str(folder / name)!r} "
                              f"({'not the entry stored under this name' if isinstance(exc, _Invalid) else type(exc).__name__}); "
                              "recomputing it", UserWarning, stacklevel=3)
                continue
            if folder is self.read_dir and self.write_dir is not None:
                shutil.copyfile(folder / name, self.write_dir / name)
            return value
        return None

    def get(self, kind: str, parts: dict[str, Any],
            check: Callable[[Any], bool] | None = None) -> Any | None:
        """The stored value for ``parts``, or None (a miss).

        An entry is trusted only if it holds its own name (what :meth:`put` wraps it in)
        and passes ``check``; anything else is a miss, with one warning naming the file.
        """
        name = self.key(kind, parts)

        def load(path: Path) -> Any:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(entry, dict) and entry.get("cache_entry") == name
                    and "value" in entry and (check is None or check(entry["value"]))):
                raise _Invalid(path)
            return entry["value"]

        value = self._read(name, load)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, kind: str, parts: dict[str, Any], value: Any) -> None:
        """Store ``value`` (tensors, numbers, strings, lists and dicts of them)."""
        if self.write_dir is not None:
            name = self.key(kind, parts)
            atomic_save({"cache_entry": name, "value": value}, self.write_dir / name)

    def get_bytes(self, kind: str, parts: dict[str, Any], suffix: str) -> bytes | None:
        """A stored file's bytes (a figure's PNG), or None; not counted as a result hit.
        The bytes must match the SHA-256 stored beside them when they were written."""
        def load(path: Path) -> bytes:
            data = path.read_bytes()
            side = path.with_name(path.name + ".sha256")
            if not side.is_file() or side.read_text().strip() != hashlib.sha256(data).hexdigest():
                raise _Invalid(path)
            return data

        name = self.key(kind, parts, suffix)
        data = self._read(name, load)
        if data is not None and self.write_dir is not None:
            self._write_digest(self.write_dir / name, data)
        return data

    def put_bytes(self, kind: str, parts: dict[str, Any], suffix: str, data: bytes) -> None:
        """Store a file's bytes under the key of ``parts``, with their SHA-256 beside them."""
        if self.write_dir is not None:
            path = self.write_dir / self.key(kind, parts, suffix)
            atomic_write_bytes(path, data)
            self._write_digest(path, data)

    @staticmethod
    def _write_digest(path: Path, data: bytes) -> None:
        atomic_write_bytes(path.with_name(path.name + ".sha256"),
                           hashlib.sha256(data).hexdigest().encode())


class _Invalid(Exception):
    """A cache file that loads but is not what was stored under its name."""


def digest(value: Any) -> str:
    """A SHA-256 of ``value``'s content: tensors and arrays by dtype, shape and bytes;
    numbers, strings, None and containers of them (sets sorted) by their canonical text.

    Raises TypeError for anything else, so that nothing unhashable is keyed by accident.
    """
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"array{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (set, frozenset)):
        h.update(b"<")
        for item in sorted(value, key=repr):
            _feed(h, item)
        h.update(b">")
    elif isinstance(value, (list, tuple)):
        h.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"no content digest for {type(value).__name__}")
