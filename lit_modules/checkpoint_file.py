"""Reading a checkpoint file safely: ``weights_only`` and errors that name the file.

Kept apart from ``loading.py`` (which rebuilds whole runs and needs the LightningModule) so
that the module itself can read a checkpoint's weights (``init_weights``) without an
import cycle.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or its config can not be used (missing, unsafe, or inconsistent)."""


# What a file torch.save wrote starts with: a zip archive (torch >= 1.6) or a pickle
# (protocol 2 and later start with 0x80; the legacy tar format is not written since 1.6).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_format(path: Path) -> None:
    """Name what is wrong with a file that is no checkpoint before torch tries to read it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): an unfinished "
                              "copy or download, or a save that was interrupted?")
    if not head.startswith(_CHECKPOINT_MAGIC):
        shown = head.decode("ascii", "replace").encode("unicode_escape").decode()
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint: it starts with {shown!r}, where a "
            "file written by torch.save starts with a zip or pickle header (is it a text, "
            "YAML or log file?)")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    ``mmap=True`` maps the tensors instead of reading them, for callers that only need the
    metadata (a resume reads the step before Lightning loads the file itself).

    Raises:
        CheckpointError: the file is missing or unreadable, or it needs arbitrary pickled
            objects; in that case nothing in it was executed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    _check_format(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to suggest weights_only=False: the one thing not to do with
        # a file from elsewhere. Keep only what it refused.
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+",
                            str(exc))
        what = f" ({refused.group(0)})" if refused else ""
        raise CheckpointError(
            f"refused to load {str(path)!r}: it contains pickled objects that are not plain "
            f"tensors and containers{what}. It was opened with weights_only=True, so "
            "nothing in it was executed. Only load checkpoints you trust, and re-save them as "
            "plain state dicts if they came from elsewhere."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict of tensors"
        )
    return obj


def load_weights(module: torch.nn.Module, checkpoint: dict[str, Any], source: str,
                 target: str) -> None:
    """Copy ``checkpoint``'s ``state_dict`` (or the checkpoint itself when it is a bare
    state dict) into ``module``, strictly.

    ``source`` names the file in errors ("checkpoint 'x.ckpt'"), ``target`` the model it
    should fit ("the model built from 'config.yaml'"). Raises :class:`CheckpointError` when
    there are no tensors to load or they do not fit.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} has no 'state_dict' of tensors")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit {target}: {exc}") from exc
