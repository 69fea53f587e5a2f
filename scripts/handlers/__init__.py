"""Ignite handlers: atomic checkpoints, resume, and the end-of-training summary."""

from .checkpoint import BestMetricSaver, ResumeFromCheckpoint, TrainingStateSaver, save_atomically
from .prototypes import PrototypeBankUpdater, RandomState
from .report import ProgressLogger, TrainingSummary, require_checkpoint

__all__ = [
    "PrototypeBankUpdater",
    "RandomState",
   "BestMetricSaver", "ResumeFromCheckpoint", "TrainingStateSaver", "TrainingSummary", "ProgressLogger",
           "require_checkpoint", "save_atomically"]
