"""Shared test helpers: tiny training runs through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.nn.modules import module as module_mod

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, *, epochs: int = 2, monitor: dict | None = None,
                data: dict | None = None, logger: bool | dict | list = True,
                backbone: str = "resnet18_cifar",
                name: str = "tiny", callbacks: list[dict] | None = None,
                model: dict | None = None, trainer_args: dict | None = None) -> Path:
    """Write a seconds-long synthetic-data training config and return its path.

    ``callbacks`` are appended to the monitor and checkpoint; ``model`` and ``trainer_args``
    update those sections. ``logger``: True for a TensorBoardLogger, False for none, or
    the trainer's ``logger:`` entry (a class_path dict, or a list of them) as is.
    """
    monitor_args = {"methods": ["gradcam"], "num_images": 10, "classes": "true",
                    "discovery_per_class": 0}
    monitor_args.update(monitor or {})
    data_args = {
        "num_train": 64, "num_val": 40, "num_test": 40, "batch_size": 16, "seed": 0,
        "cue": {"classes": [0, 1], "p_train": 1.0, "p_eval": 1.0},
    }
    data_args.update(data or {})
    trainer: dict = {
        "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "limit_train_batches": 2,
        "limit_val_batches": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False,
        "default_root_dir": str(tmp_path / "runs"),
        "callbacks": [
            {"class_path": "callbacks.ExplanationMonitor", "init_args": monitor_args},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True}},
            *(callbacks or []),
        ],
    }
    trainer.update(trainer_args or {})
    if logger is True:
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                  "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}}
    trainer["logger"] = logger
    cfg = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"backbone": backbone, "lr": 0.05, "scheduler": "none", **(model or {})},
        "data": {"class_path": "lit_modules.data.SyntheticShapesDataModule", "init_args": data_args},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(args: list[str], run: bool = True):
    """Run train.py's CLI in-process from the repository root; return the CLI object.

    ``run=False`` only parses and instantiates (no subcommand in ``args`` then).
    """
    import train

    cwd = os.getcwd()
    os.chdir(ROOT if run else cwd)
    try:
        return train.main(args, run=run)
    finally:
        os.chdir(cwd)


class KillAt(Callback):
    """Send ``signal`` to this very process after training batch ``batch`` of ``epoch``.

    One-shot: it first creates ``marker`` and does nothing when the marker exists, so the
    same config can be used to resume. SIGKILL leaves no chance to save anything, which is
    the point of the resume tests. ``wait``: seconds to sleep after sending the signal.
    """

    def __init__(self, epoch: int, batch: int, marker: str, signal: str = "SIGKILL",
                 rank: int = 0, wait: float = 5.0) -> None:
        super().__init__()
        self.epoch, self.batch, self.marker, self.signal = epoch, batch, marker, signal
        self.rank = rank  # under DDP: the process that gets the signal (0: the launcher)
        self.wait = wait

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx, trainer.global_rank) != (
            self.epoch, self.batch, self.rank
        ):
            return
        if os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        os.kill(os.getpid(), getattr(signal, self.signal))
        time.sleep(self.wait)  # SIGTERM is handled at the next batch boundary; SIGKILL never returns


class PoisonAt(Callback):
    """Fill the model's first parameter with NaN at the start of training epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def train_subprocess(args: list[str], timeout: float = 300, grace: float | None = None,
                     script: str = "train.py") -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` in a child process from the repository root.

    ``script``: another entry point to run instead, e.g. ``tests/train_tiny.py`` (train.py
    with the tiny test backbone registered).

    The child gets its own process group, so DDP ranks it starts die with it. After
    ``timeout`` seconds the group is killed and ``TimeoutExpired`` raised; with ``grace``
    instead, the group is killed after ``grace`` seconds (as a scheduler does once its
    grace period after SIGTERM is over) and the result returned with status -9.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    cmd = [sys.executable, script, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=grace if grace is not None else timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if grace is None:
            raise
        return subprocess.CompletedProcess(cmd, -9, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class CreatesFile:
    """Unpickling this calls ``open(path, 'w')``: loading the pickle creates the file.

    The payload of the crafted-checkpoint tests: if the file exists, code ran.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


TINY_BACKBONE = "tiny_test_backbone"


def register_tiny_backbone() -> str:
    """Register (once per process) a millisecond-cheap backbone; return its name.

    For tests that need many epochs or only care about the pipeline around the model:
    conv, BatchNorm, in-place ReLU and max-pool like the real ones, an 8x8 map at 32x32.
    """
    import torch
    from torch import nn

    from lit_modules.backbones import BACKBONES, SplitBackbone, register_backbone

    class TinyBackbone(SplitBackbone):
        default_layer = "trunk"
        min_input_size = 4

        def __init__(self, num_classes: int = 10, pretrained: bool = False) -> None:
            trunk = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            )
            super().__init__(trunk, 16, num_classes)

    if TINY_BACKBONE not in BACKBONES:
        register_backbone(TINY_BACKBONE)(TinyBackbone)
    assert torch.is_tensor(BACKBONES[TINY_BACKBONE]().classifier.weight)
    return TINY_BACKBONE


# -- model inspection --------------------------------------------------------------------

# Every per-module hook dict PyTorch has; the call hooks are the ones an explainer adds.
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
OTHER_HOOKS = (
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """``{"<module>.<kind>": n}`` for every non-empty hook container of ``model``, its
    parameters and PyTorch's global module hooks; ``"<module>.forward replaced": 1`` where
    an instance attribute shadows a module's ``forward`` (a monkeypatch left behind).

    Equal before and after a call = the call left no hook (or patch) behind.
    """
    counts = {}
    for name, m in model.named_modules():
        for kind in CALL_HOOKS + OTHER_HOOKS:
            n = len(getattr(m, kind, None) or {})
            if n:
                counts[f"{name or '<root>'}.{kind}"] = n
        if "forward" in vars(m):
            counts[f"{name or '<root>'}.forward replaced"] = 1
    for name, p in model.named_parameters():
        for kind in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            n = len(getattr(p, kind, None) or {})
            if n:
                counts[f"{name}.{kind}"] = n
    for kind in GLOBAL_HOOKS:
        n = len(getattr(module_mod, kind, None) or {})
        if n:
            counts[f"global {kind}"] = n
    return counts


def pearson(a: Any, b: Any) -> torch.Tensor:
    """Per-map Pearson correlation of ``[N, ...]`` maps (tensors or arrays), in float64; two
    constant maps count as 1 (both say "nothing here"), one constant against a varying map
    as 0. Independent of ``explain.measures.agreement.pearson`` (NaN there), which the
    engine's tests must not lean on."""
    a = torch.as_tensor(a).detach().reshape(len(a), -1).double()
    b = torch.as_tensor(b).detach().reshape(len(b), -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    r = (a * b).sum(1) / (na * nb).clamp_min(1e-300)
    flat_a = na <= 1e-12 * (1 + na.max())
    flat_b = nb <= 1e-12 * (1 + nb.max())
    r = torch.where(flat_a & flat_b, torch.ones_like(r), r)
    return torch.where(flat_a ^ flat_b, torch.zeros_like(r), r)


# -- explanation-engine test helpers (shared by test_explain_*.py and test_fold.py) ---------


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm2d statistics and affine parameters as after some training.

    Drawn from a private generator seeded with ``seed`` (the global RNG is untouched):
    running mean and bias in [-0.2, 0.2), running variance in [0.5, 2), weight in
    [0.5, 1.5), so no BatchNorm is the identity. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(m: torch.nn.BatchNorm2d, low: float, high: float) -> torch.Tensor:
        return torch.rand(m.num_features, generator=gen) * (high - low) + low

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(draw(m, -0.2, 0.2))
                m.running_var.copy_(draw(m, 0.5, 2.0))
                m.weight.copy_(draw(m, 0.5, 1.5))
                m.bias.copy_(draw(m, -0.2, 0.2))
    return model.eval()
