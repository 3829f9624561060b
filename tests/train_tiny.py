"""``python tests/train_tiny.py <train.py arguments>``: train.py in a child process with the
tiny test backbone (``helpers.register_tiny_backbone``) registered first.

For tests that must kill a real training process (SIGKILL) yet want a millisecond-cheap
model; the backbone registry is per process, so the child registers it itself. Everything
else is train.py's own ``__main__`` (its exit statuses included).
"""

from __future__ import annotations

import runpy
import sys

from helpers import ROOT, register_tiny_backbone

if __name__ == "__main__":
    register_tiny_backbone()
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
