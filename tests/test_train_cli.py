"""train.py as a user runs it: a subprocess, its stderr, its files; fit then predict."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
from helpers import tiny_config, train_subprocess
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_modules import ImageClassifier
from lit_modules.data import SyntheticShapesDataModule

CLI_WARNING = "LightningCLI's args parameter"


def test_fit_is_quiet_and_predict_writes_the_models_argmax(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, epochs=1)
    fit = train_subprocess(["fit", "--config", str(cfg)], timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert CLI_WARNING not in fit.stderr
    run = tmp_path / "runs" / "tiny" / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "val/acc" in scalars and "explain/gradcam/concentration" in scalars
    assert [t for t in scalars if "hp_metric" in t] == []  # no -1 placeholder

    ckpt = run / "checkpoints" / "last.ckpt"
    pred = train_subprocess(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)],
                            timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert CLI_WARNING not in pred.stderr
    match = re.search(r"Predictions of (\d+) images: (\S+)", pred.stdout)
    assert match and int(match.group(1)) == 40, pred.stdout[-2000:]
    out = Path(match.group(2))
    assert out.parent == tmp_path / "runs" / "tiny" / "version_1"  # the predict run's log dir
    saved = torch.load(out, weights_only=True)

    # The same images through the checkpoint's model, here: the test split, in order.
    model = ImageClassifier(backbone="resnet18_cifar")
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    dm = SyntheticShapesDataModule(num_train=64, num_val=40, num_test=40, batch_size=16, seed=0,
                                   cue={"classes": [0, 1], "p_train": 1.0, "p_eval": 1.0})
    test = dm.dataset("test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        probs = model(images).softmax(-1)
    assert saved["index"].tolist() == list(range(40))
    assert saved["label"].tolist() == [int(test[i]["label"]) for i in range(40)]
    assert torch.equal(saved["pred"], probs.argmax(-1))
    torch.testing.assert_close(saved["probs"], probs, rtol=1e-4, atol=1e-6)
    assert saved["class_names"] == dm.class_names

    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["pred"]) for r in rows] == saved["pred"].tolist()
    assert [float(r["confidence"]) for r in rows] == [
        float(f"{p:.6g}") for p in probs.max(-1).values.tolist()]
    assert list(rows[0])[4:] == [f"p_{n}" for n in dm.class_names]


def test_predict_split_val_predicts_the_validation_images(tmp_path: Path) -> None:
    from helpers import register_tiny_backbone, run_train

    cfg = tiny_config(tmp_path, epochs=1, backbone=register_tiny_backbone(),
                      data={"num_val": 24, "num_test": 40})
    run_train(["fit", "--config", str(cfg)])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    run_train(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt),
               "--data.init_args.predict_split", "val"])
    out = next((tmp_path / "runs").rglob("predictions.pt"))
    saved = torch.load(out, weights_only=True)
    dm = SyntheticShapesDataModule(num_train=64, num_val=24, num_test=40, seed=0)
    val = dm.dataset("val")
    assert saved["index"].tolist() == list(range(24))
    assert saved["label"].tolist() == [int(val[i]["label"]) for i in range(24)]
    try:
        SyntheticShapesDataModule(predict_split="train")
    except ValueError as exc:
        assert "'val' or 'test'" in str(exc)
    else:
        raise AssertionError("predict_split='train' was accepted")
