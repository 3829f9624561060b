"""Resuming a training run: which checkpoint, and which run directory to keep writing into.

Lightning's own ``ckpt_path="last"`` looks only in the *new* run's checkpoint folder (a fresh
``version_N``), so it finds nothing after a crash and silently starts from scratch. Here
``last`` means the newest resumable checkpoint of the configured run (``last.ckpt``, or
``interrupted.ckpt`` written on SIGTERM / Ctrl-C / an exception), and a resumed run keeps
logging into the directory its checkpoint came from, with TensorBoard told to drop the
steps logged after that checkpoint (``purge_step``) so no curve has duplicate steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .loading import load_checkpoint

#: Checkpoint names a resume may pick up: ModelCheckpoint's last (and its -vN copies) and
#: the InterruptCheckpoint callback's file.
RESUMABLE_NAME = re.compile(r"^(last|interrupted)(-v\d+)?\.ckpt$")


class ResumeError(RuntimeError):
    """There is nothing to resume from, or the checkpoint can not be used."""


@dataclass(frozen=True)
class ResumePlan:
    """Where a resumed run reads from and writes to.

    Attributes:
        ckpt_path: the checkpoint to load.
        version: the run directory name (``version_3``) the checkpoint lies in, if it lies
            in a ``<save_dir>/<name>/<version>/checkpoints/`` layout, else None.
        global_step: the checkpoint's optimiser step; TensorBoard purges events after it.
        epoch: the checkpoint's epoch.
    """

    ckpt_path: Path
    version: str | None
    global_step: int
    epoch: int


def resumable_checkpoints(folder: Path) -> list[Path]:
    """``last*.ckpt`` and ``interrupted*.ckpt`` files directly inside ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and RESUMABLE_NAME.match(p.name))


def newest_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The most recently written resumable checkpoint in any of ``folders``."""
    found = [p for folder in folders for p in resumable_checkpoints(folder)]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def checkpoint_folders(
    save_dir: Path | None, name: str | None, version: str | None, extra: Iterable[Path] = ()
) -> list[Path]:
    """Folders a run's checkpoints may be in: ``<save_dir>/<name>/<version>/checkpoints``
    for the pinned version, or for every version when none is pinned, plus ``extra``."""
    folders: list[Path] = []
    if save_dir is not None:
        run_root = save_dir / (name or "")
        if version is not None:
            folders.append(run_root / version / "checkpoints")
        elif run_root.is_dir():
            folders += sorted(d / "checkpoints" for d in run_root.iterdir() if d.is_dir())
    return folders + list(extra)


def run_version(ckpt: Path, save_dir: Path | None, name: str | None) -> str | None:
    """The version folder of ``ckpt`` if it sits at ``<save_dir>/<name>/<version>/checkpoints/``."""
    if save_dir is None:
        return None
    ckpt = ckpt.resolve()
    run_root = (save_dir / (name or "")).resolve()
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == run_root:
        return ckpt.parent.parent.name
    return None


def plan_resume(
    ckpt_path: str,
    save_dir: Path | None,
    name: str | None,
    version: str | None,
    extra_folders: Iterable[Path] = (),
) -> ResumePlan:
    """Resolve ``ckpt_path`` (``"last"`` or a file) into a :class:`ResumePlan`.

    The checkpoint is opened with ``weights_only=True`` here, so a crafted file is refused
    before Lightning sees it, and a truncated one is reported by name.

    Raises:
        ResumeError: ``last`` with no resumable checkpoint, or an unreadable checkpoint.
    """
    extra = list(extra_folders)
    if ckpt_path == "last":
        folders = checkpoint_folders(save_dir, name, version, extra)
        found = newest_checkpoint(folders)
        if found is None:
            places = [str(f) for f in folders]
            if save_dir is not None and version is None:
                places.insert(0, str(save_dir / (name or "") / "*" / "checkpoints"))
            looked = ", ".join(dict.fromkeys(places)) or "(no checkpoint folder configured)"
            raise ResumeError(
                "--ckpt_path last: there is no checkpoint to resume from. Looked for last.ckpt "
                f"and interrupted.ckpt in: {looked}. Run without --ckpt_path to start a new "
                "run, or pass a checkpoint file with --ckpt_path PATH."
            )
        path = found
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise ResumeError(f"--ckpt_path {ckpt_path!r}: no such checkpoint file")
    try:
        state = load_checkpoint(path, mmap=True)  # only the counters are read here
    except RuntimeError as exc:  # CheckpointError: unsafe or unreadable, nothing executed
        raise ResumeError(str(exc)) from exc
    for key in ("global_step", "epoch", "state_dict"):
        if key not in state:
            raise ResumeError(f"{str(path)!r} is not a Lightning training checkpoint (no {key!r})")
    return ResumePlan(
        ckpt_path=path.resolve(),
        version=version if version is not None else run_version(path, save_dir, name),
        global_step=int(state["global_step"]),
        epoch=int(state["epoch"]),
    )
