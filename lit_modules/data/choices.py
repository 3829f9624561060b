"""Closed sets of datamodule option values, typed as ``Literal`` so that the CLI refuses a
wrong value when the config is parsed, naming the choices (a plain ``str`` would pass the
parser and fail later, in a traceback)."""

from __future__ import annotations

from typing import Literal

#: The datamodules' ``data_path`` (``base.DATA_PATHS``): ``classic`` (DataLoader) or
#: ``fast`` (the split on the training device).
DataPath = Literal["classic", "fast"]
# The splits ``train.py predict`` can predict (the training split is augmented: not offered).
SplitName = Literal["val", "test"]
