"""Side-by-side figure at 224x224: ResNet-50, VGG16-GAP and ViT-B/16 on the same 4 images.

Random weights (no pretrained weights on the development machine, and no network): the
figure checks that every model's default layer, token layout and upsampling reach the
image at 224, not what a trained model looks at. Two methods a model: Grad-CAM at the
declared default layer, and saliency (input gradient), which goes through the whole
network. Each image is explained for the class the model predicts.

    python bench/figure_224.py                         # writes docs/side_by_side_224.png
    python bench/figure_224.py --out /tmp/side.png
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import explain  # noqa: E402
from audit_report.figures import fig_side_by_side  # noqa: E402
from lit_modules.backbones import build_backbone  # noqa: E402
from lit_modules.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lit_modules.data.shapes import SHAPE_CLASSES, generate_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (label, backbone name): VGG16-GAP is the project's own (pool4 and pool5 removed, so its
# last map is 28x28 at 224); torchvision's VGG16 ends in an MLP, where CAM does not apply.
MODELS = [("ResNet-50", "tv:resnet50"), ("VGG16-GAP", "vgg16_gap"), ("ViT-B/16", "tv:vit_b_16")]
METHODS = ["gradcam", "saliency"]
TITLE = "random weights: this figure checks the plumbing, not what a trained model looks at"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "side_by_side_224.png")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    images, _, labels = generate_shapes(args.images, image_size=224, seed=0, split="figure")
    images01 = images.float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (images01 - mean) / std  # what a torchvision model expects, trained or not

    maps: list[dict[str, torch.Tensor]] = []
    for label, name in MODELS:
        torch.manual_seed(0)
        # Ten classes, one a shape: the new head gets PyTorch's default init (ViT's own
        # torchvision head is zero-initialised and would give all-zero gradients).
        model = build_backbone(name, num_classes=len(SHAPE_CLASSES)).eval()
        with torch.no_grad():
            predicted = model(x).argmax(1)
        maps.append({m: explain.run(model, x, m, targets=predicted) for m in METHODS})
        print(f"[{time.perf_counter() - started:5.1f}s] {label}: predicted {predicted.tolist()}",
              flush=True)

    col_labels = [f"image {i}: {SHAPE_CLASSES[int(c)]}" for i, c in enumerate(labels)]
    fig = fig_side_by_side(images01, maps, [label for label, _ in MODELS], METHODS, col_labels)
    height = fig.get_size_inches()[1]
    # The tile grid fills the whole figure and its column labels sit just above it, so the
    # title goes above those; savefig's tight box takes it in.
    fig.text(0.5, 1 + 0.3 / height, TITLE, ha="center", va="bottom", fontsize=8)
    fig.text(0.5, 1 + 0.15 / height,
             "224x224 synthetic shapes; each map for the class the model predicts; "
             "colour: share of the map's maximum", ha="center", va="bottom", fontsize=6.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    # A palette PNG keeps the file small enough to commit (the overlays have few distinct
    # colours at this size); the figure is for a quick look, not for measuring colours.
    buf.seek(0)
    picture = Image.open(buf).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, optimize=True)
    print(f"[{time.perf_counter() - started:5.1f}s] wrote {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
