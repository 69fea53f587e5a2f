"""Ignite handlers: atomic checkpoints, resume, the run lock, progress, overlays and the end-of-training summary."""

from .checkpoint import (BestMetricSaver, RandomState, ResumeFromCheckpoint, TrainedWeightsLoader, TrainingStateSaver,
                         save_atomically)
from .evaluation import EvaluationReport, TensorBoardOverlays
from .lock import LOCK_NAME, acquire_run_lock
from .prototypes import PrototypeBankLogger
from .report import ProgressLogger, TerminalProgressBar, TrainingSummary, require_checkpoint

__all__ = [
    "BestMetricSaver", "ResumeFromCheckpoint", "TrainedWeightsLoader", "TrainingStateSaver", "save_atomically",
    "EvaluationReport", "LOCK_NAME", "acquire_run_lock", "PrototypeBankLogger", "RandomState",
    "ProgressLogger", "TerminalProgressBar", "TrainingSummary", "require_checkpoint", "TensorBoardOverlays",
]
