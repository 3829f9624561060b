"""Lightning extensions: the explanation monitor, the interrupt checkpoint, atomic writes."""

from .atomic import AtomicCheckpointIO, atomic_save
from .interrupt import InterruptCheckpoint
from .monitor import ExplanationMonitor, stratified_indices

__all__ = [
    "AtomicCheckpointIO",
    "ExplanationMonitor",
    "InterruptCheckpoint",
    "atomic_save",
    "stratified_indices",
]
