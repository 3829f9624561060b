"""Lightning extensions: the explanation monitor, the interrupt checkpoint, atomic
checkpoints and the prediction writer."""

from .atomic import AtomicCheckpointIO
from .interrupt import InterruptCheckpoint
from .monitor import ExplanationMonitor
from .predictions import PredictionWriter

__all__ = [
    "AtomicCheckpointIO",
    "ExplanationMonitor",
    "InterruptCheckpoint",
    "PredictionWriter",
]
