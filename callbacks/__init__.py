"""Lightning callbacks: the explanation monitor."""

from .monitor import ExplanationMonitor, atomic_save, stratified_indices

__all__ = ["ExplanationMonitor", "atomic_save", "stratified_indices"]
