"""Lightning extensions: the explanation monitor, the interrupt checkpoint, atomic
checkpoints, the prediction writer and the HParams summary."""

from .atomic import AtomicCheckpointIO
from .hparams import HParamsSummary
from .interrupt import InterruptCheckpoint
from .monitor import ExplanationMonitor
from .predictions import PredictionWriter

__all__ = [
    "AtomicCheckpointIO",
    "ExplanationMonitor",
    "HParamsSummary",
    "InterruptCheckpoint",
    "PredictionWriter",
]
