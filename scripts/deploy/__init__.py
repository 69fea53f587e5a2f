"""Deployment: ONNX export with a parity check, and the ONNX Runtime segmenter used by inference.json."""

from .onnx import OnnxSegmenter, check_onnx_parity, export_onnx, inference_network, onnx_providers

__all__ = ["OnnxSegmenter", "check_onnx_parity", "export_onnx", "inference_network", "onnx_providers"]
