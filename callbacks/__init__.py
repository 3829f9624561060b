"""Lightning extensions: the explanation monitor, the interrupt checkpoint, atomic
checkpoints, the prediction writer, the HParams summary and what an exact resume needs."""

from .atomic import AtomicCheckpointIO
from .exact_resume import ExactResume
from .hparams import HParamsSummary
from .interrupt import InterruptCheckpoint
from .monitor import ExplanationMonitor
from .predictions import PredictionWriter

__all__ = [
    "AtomicCheckpointIO",
    "ExactResume",
    "ExplanationMonitor",
    "HParamsSummary",
    "InterruptCheckpoint",
    "PredictionWriter",
]
