"""Many epochs of the monitor leave no hooks behind and do not grow memory."""

from __future__ import annotations

import gc
import os

import pytest
from helpers import CALL_HOOKS, hook_counts, register_tiny_backbone, run_train, tiny_config

from callbacks import ExplanationMonitor

EPOCHS = 50


def rss_bytes() -> int:
    """Resident set size of this process, after a full garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_fifty_epochs_leave_no_hooks_and_flat_memory(tmp_path, monkeypatch) -> None:
    samples: list[dict] = []
    original = ExplanationMonitor.on_validation_epoch_end

    def measured(self, trainer, pl_module) -> None:
        before = hook_counts(pl_module)
        original(self, trainer, pl_module)
        epoch = trainer.current_epoch
        # gc costs ~0.25 s here: only at the two epochs whose memory is compared.
        rss = rss_bytes() if epoch + 1 in (5, EPOCHS) else None
        samples.append({"epoch": epoch, "before": before, "after": hook_counts(pl_module),
                        "rss": rss, "saved": len(self._previous)})

    monkeypatch.setattr(ExplanationMonitor, "on_validation_epoch_end", measured)
    # A millisecond model with the real monitor, logger and checkpointing around it;
    # 40 fixed images so that keeping each epoch's maps (1.6 MB) would show in memory.
    cfg = tiny_config(tmp_path, epochs=EPOCHS, backbone=register_tiny_backbone(),
                      monitor={"num_images": 40, "methods": ["gradcam"]})
    cli = run_train(["fit", "--config", str(cfg)])
    assert [s["epoch"] for s in samples] == list(range(EPOCHS))
    # The monitor really ran every epoch (maps saved), so there was something to leak.
    maps_dir = os.path.join(cli.trainer.log_dir, "explanations")
    assert len([f for f in os.listdir(maps_dir) if f.startswith("epoch_")]) == EPOCHS
    baseline = samples[0]["before"]
    assert not any(k.split(".")[-1] in CALL_HOOKS for k in baseline), baseline
    for s in samples:
        assert s["after"] == baseline, f"epoch {s['epoch']}: hooks {s['after']} vs {baseline}"
        assert s["saved"] == 1  # one previous-epoch map set, not one per epoch
    at5, at50 = samples[4]["rss"], samples[EPOCHS - 1]["rss"]
    growth = (at50 - at5) / at5
    assert growth < 0.05, f"RSS {at5 / 2**20:.1f} MiB after epoch 5, {at50 / 2**20:.1f} at 50"
