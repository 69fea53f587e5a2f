"""Training engines: the semi-supervised trainer that runs every method preset, and the presets themselves."""

from .lr import PolyLR
from .presets import METHOD_PRESETS, MethodConfig, resolve_method
from .semi_supervised import (SemiSupervisedTrainer, TrainingDivergedError, epoch_seed, gather_contrast_pixels,
                              training_schedule)
from .sampling import RepeatedSampler, epoch_sampler

__all__ = ["PolyLR", "METHOD_PRESETS", "MethodConfig", "resolve_method", "SemiSupervisedTrainer", "TrainingDivergedError",
           "epoch_seed", "epoch_sampler", "RepeatedSampler", "gather_contrast_pixels", "training_schedule"]
