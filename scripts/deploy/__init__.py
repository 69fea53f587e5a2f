"""Deployment: ONNX export with a parity check, the ONNX Runtime segmenter used by inference.json, and the checkpoint
MONAI's export commands load."""

from .checkpoint import EXPORT_COMMANDS, export_checkpoint
from .pack import BUNDLE_NAME, META_SCHEMA, pack_bundle
from .onnx import (EXTERNAL_DATA_THRESHOLD, OnnxSegmenter, check_onnx_parity, export_onnx, inference_network,
                   onnx_providers)

__all__ = ["BUNDLE_NAME", "META_SCHEMA", "pack_bundle", "OnnxSegmenter", "check_onnx_parity", "export_onnx", "inference_network",
           "onnx_providers", "EXTERNAL_DATA_THRESHOLD", "EXPORT_COMMANDS", "export_checkpoint"]
