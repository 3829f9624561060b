"""Lightning callbacks: the explanation monitor and the interrupt checkpoint."""

from .interrupt import InterruptCheckpoint
from .monitor import ExplanationMonitor, atomic_save, stratified_indices

__all__ = ["ExplanationMonitor", "InterruptCheckpoint", "atomic_save", "stratified_indices"]
