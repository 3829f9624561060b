"""Placeholder until the sampling module lands."""

from callbacks.monitor import dataset_labels, stratified_indices  # noqa: F401
from lit_modules.loading import sample_batch  # noqa: F401
