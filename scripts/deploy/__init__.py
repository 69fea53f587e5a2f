"""Deployment: ONNX export with a parity check, and the ONNX Runtime segmenter used by inference.json."""

from .pack import BUNDLE_NAME, META_SCHEMA, pack_bundle
from .onnx import OnnxSegmenter, check_onnx_parity, export_onnx, inference_network, onnx_providers

__all__ = ["BUNDLE_NAME", "META_SCHEMA", "pack_bundle", "OnnxSegmenter", "check_onnx_parity", "export_onnx", "inference_network", "onnx_providers"]
