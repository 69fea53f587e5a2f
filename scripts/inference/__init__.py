"""Inference: input scanning with failure reports, flip test-time augmentation, post-processing and the outputs."""

from .inputs import InferenceInputs, scan_inputs
from .outputs import SavePredictiond
from .postprocess import GlandPostprocessd, postprocess_mask, split_touching_objects
from .scale import ScaledInferer
from .tta import FlipTTAInferer

__all__ = ["InferenceInputs", "scan_inputs", "SavePredictiond", "FlipTTAInferer", "ScaledInferer",
           "GlandPostprocessd", "postprocess_mask", "split_touching_objects"]
