"""What Lightning and this project's train.py cost over a plain PyTorch loop.

    python bench/lightning_overhead.py [--epochs 4] [--num-train 8192] [--batch-size 128]

Both sides train the same model (``bench_small``, or ``--backbone``), on the same data
path (the fast, in-memory synthetic shapes, CIFAR-10's crop + flip), with the same batch
size, optimiser (SGD, Nesterov momentum, constant LR) and loss, from the same seed:

* ``train.py``: the real CLI (``train.main``), with a TensorBoard logger logging every
  50 steps, the model's accuracy metric and checkpointing off; no validation and no
  explanation monitor (bench/monitor_cost.py measures that);
* the plain loop: forward, loss, backward, optimiser and scheduler step, and the loss
  read back every 50 steps as a logger would.

After an untimed warm-up run, the two alternate (plain, train.py, plain, train.py) so both
see the same machine load; the first epoch of each run is a warm-up and not timed. Prints images per second of each
and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import small_model  # noqa: E402,F401  (registers bench_small)
from timing import TrainEpochClock  # noqa: E402

import train  # noqa: E402
from lit_modules.data import SyntheticShapesDataModule  # noqa: E402

LOG_EVERY = 50


def config(args: argparse.Namespace, root: str) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": args.epochs,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": LOG_EVERY,
            "enable_checkpointing": False, "enable_model_summary": False,
            "enable_progress_bar": args.progress_bar, "default_root_dir": root,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": root, "name": "overhead"}},
        },
        "model": {"backbone": args.backbone, "optimizer": "sgd", "lr": 0.05,
                  "scheduler": "none", "channels_last": True},
        "data": {"class_path": "lit_modules.data.SyntheticShapesDataModule",
                 "init_args": data_args(args)},
    }


def data_args(args: argparse.Namespace) -> dict:
    return {"num_train": args.num_train, "num_val": 64, "num_test": 64,
            "batch_size": args.batch_size, "seed": 0, "data_path": "fast"}


def run_lightning(args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as root:
        cli = train.main(["--config", _write(config(args, root), root)], run=False)
        timer = TrainEpochClock()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.times[1:]


def run_plain(args: argparse.Namespace) -> list[float]:
    """The same training as a hand-written loop (same module, optimiser and schedule)."""
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        cli = train.main(["--config", _write(config(args, root), root)], run=False)
    model, dm = cli.model, SyntheticShapesDataModule(**data_args(args))
    dm.setup("fit")
    loader = dm.train_dataloader()
    opt = model.configure_optimizers()  # scheduler "none": the bare optimiser
    model.train()
    times, step = [], 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        for batch in loader:
            logits = model(batch["image"])
            loss = model.criterion(logits, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % LOG_EVERY == 0:
                float(loss)  # what a logger does: one host read every LOG_EVERY steps
            step += 1
        times.append(time.perf_counter() - t)
    return times[1:]


def _write(cfg: dict, root: str) -> str:
    path = os.path.join(root, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--num-train", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backbone", default="bench_small")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--progress-bar", action="store_true", help="train.py with its bar")
    args = parser.parse_args()
    # Warm the process (allocator, thread pool, kernels) before anything is timed: the
    # first run in a fresh process is otherwise slower whichever side it is.
    run_plain(argparse.Namespace(**{**vars(args), "epochs": 2}))
    plain, lit = [], []
    for _ in range(args.repeats):
        plain += run_plain(args)
        lit += run_lightning(args)
    n = args.num_train
    p, q = n / statistics.median(plain), n / statistics.median(lit)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} "
          f"threads; {args.backbone}, {n} images, batch {args.batch_size}, "
          f"{args.repeats} x {args.epochs - 1} timed epochs each")
    print(f"plain loop: {p:8.0f} img/s   epochs {[round(t, 2) for t in plain]}")
    print(f"train.py:   {q:8.0f} img/s   epochs {[round(t, 2) for t in lit]}")
    print(f"ratio train.py / plain: {q / p:.3f}")


if __name__ == "__main__":
    main()
