"""Write the README's pictures from a real quickstart run and its audit (nothing drawn by hand).

    python docs/make_pictures.py --run runs/quickstart/version_0 [--audit DIR] [--out docs]

From the run's TensorBoard events it takes the last epoch's images exactly as TensorBoard
shows them: the saliency grid (``explain/saliency/grid``, captions on every tile) and the
class-mean hotspot maps (``explain/saliency/hotspots``), and the last epoch's shortcut
summary text. From the audit folder (default ``<run>/audit``) it copies the transplant
figure of the first confirmed shortcut. Writes ``quickstart_grid.png``,
``quickstart_hotspots.png``, ``quickstart_transplant.png`` and ``quickstart_summary.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def last_image(events: EventAccumulator, tag: str) -> bytes | None:
    """The PNG bytes of the last step of an image tag, or None when the run has none."""
    if tag not in events.Tags().get("images", []):
        return None
    return events.Images(tag)[-1].encoded_image_string


def last_text(events: EventAccumulator, tag: str) -> str | None:
    if tag not in events.Tags().get("tensors", []):
        return None
    return events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run's log folder (version_N)")
    parser.add_argument("--audit", default=None, help="its audit folder (default <run>/audit)")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(run.glob("events.out.tfevents.*"))
    if not files:
        parser.error(f"no TensorBoard events in {run}")
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    written = []
    for tag, name in (("explain/saliency/grid", "quickstart_grid.png"),
                      ("explain/saliency/hotspots", "quickstart_hotspots.png")):
        png = last_image(events, tag)
        if png is not None:
            (out / name).write_bytes(png)
            written.append(name)
    text = last_text(events, "explain/shortcuts/summary/text_summary")
    if text is not None:
        (out / "quickstart_summary.md").write_text(text + "\n")
        written.append("quickstart_summary.md")
    audit = Path(args.audit) if args.audit else run / "audit"
    figures = sorted((audit / "figures").glob("*transplant_*.png"))
    if figures:
        shutil.copyfile(figures[0], out / "quickstart_transplant.png")
        written.append("quickstart_transplant.png")
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
