"""A MONAI Deploy application around the exported ONNX model (see docs/deploy.md, "MONAI Deploy application").

Only the plain compute classes are imported here, so ``scripts.deploy.app`` imports without the MONAI Deploy
App SDK; ``operators`` and ``application`` need it, ``stage`` prepares the folder a MAP is packaged from.
"""

from .compute import ImageFolderLoader, MaskWriter, TiledOnnxSegmenter, resolve_model_path

__all__ = ["ImageFolderLoader", "MaskWriter", "TiledOnnxSegmenter", "resolve_model_path"]
