"""Inference: input scanning with failure reports, flip test-time augmentation, post-processing, the outputs, and
``inference.json`` as one object for the MONAI Label and MONAI Deploy apps."""

from .inputs import InferenceInputs, scan_inputs
from .outputs import SavePredictiond, check_output_names, output_stem
from .pipeline import INFERENCE_CONFIG, InferencePipeline, InputError
from .postprocess import GlandPostprocessd, postprocess_mask, split_touching_objects
from .precision import autocast_dtype, cpu_computes_bfloat16
from .scale import ScaledInferer
from .tta import FlipTTAInferer

__all__ = ["InferenceInputs", "scan_inputs", "SavePredictiond", "output_stem", "check_output_names", "FlipTTAInferer",
           "ScaledInferer", "GlandPostprocessd", "postprocess_mask", "split_touching_objects", "InferencePipeline", "InputError",
           "INFERENCE_CONFIG", "autocast_dtype", "cpu_computes_bfloat16"]
