"""Ignite handlers: atomic checkpoints, resume, and the end-of-training summary."""

from .checkpoint import BestMetricSaver, ResumeFromCheckpoint, TrainingStateSaver, save_atomically
from .evaluation import EvaluationReport, draw_overlay
from .prototypes import PrototypeBankUpdater, RandomState
from .report import ProgressLogger, TrainingSummary, require_checkpoint

__all__ = [
    "EvaluationReport",
    "draw_overlay",
    "PrototypeBankUpdater",
    "RandomState",
   "BestMetricSaver", "ResumeFromCheckpoint", "TrainingStateSaver", "TrainingSummary", "ProgressLogger",
           "require_checkpoint", "save_atomically"]
