"""Inference: input scanning with failure reports, flip test-time augmentation, and the outputs written."""

from .inputs import InferenceInputs, scan_inputs
from .outputs import SavePredictiond
from .tta import FlipTTAInferer

__all__ = ["InferenceInputs", "scan_inputs", "SavePredictiond", "FlipTTAInferer"]
