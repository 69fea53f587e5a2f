"""The MONAI Label infer task ``gland``: the bundle's ``inference.json`` pipeline behind MONAI Label's API.

Preprocessing, the network (rebuilt from the record in ``model.pt``), the sliding window, flip test-time
augmentation and the gland post-processing all come from ``inference.json`` (``scripts.inference.InferencePipeline``,
MONAI's ``ConfigParser``), so a suggestion in QuPath is the mask ``python -m monai.bundle run inference`` writes for
the same image. The weights are reloaded when ``model.pt`` changes (a training run publishing a better model).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from scripts.inference.pipeline import InferencePipeline, InputError
from scripts.monailabel.annotations import annotation_result, mask_polygons

__all__ = ["GlandPipeline", "GlandInferTask", "InputError"]

logger = logging.getLogger(__name__)


class GlandPipeline(InferencePipeline):
    """``inference.json``'s pipeline (``scripts.inference.InferencePipeline``) for the bundle folder of the app.

    Args:
        bundle_root: the bundle folder (holds ``configs/inference.json``; in this repository ``bundle``).
        model_path: the trained ``model.pt``.
        device: ``"cpu"``, ``"cuda"`` or None for CUDA when available.
        overrides: extra ``inference.json`` keys (e.g. ``{"sw_batch_size": 8}``).
    """

    def __init__(self, bundle_root: str | os.PathLike, model_path: str | os.PathLike, device: str | None = None,
                 overrides: dict | None = None):
        self.bundle_root = Path(bundle_root)
        config_file = self.bundle_root / "configs" / "inference.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: 'bundle_root' must be the bundle folder.")
        super().__init__(model_path, config_file, backend="pytorch", device=device, overrides=overrides)

    train_hint = "train first (POST /train/gland) or copy a model.pt there"


class GlandInferTask(InferTask):
    """MONAI Label's ``gland`` model: tiles (PNG / JPEG / TIFF) and slide regions, masks or polygons.

    Request keys besides MONAI Label's own: ``tta`` (flip test-time augmentation, default off, as in
    ``inference.json``), ``min_poly_area`` (polygons under this many pixels are left out).
    """

    def __init__(self, pipeline: GlandPipeline, description: str = "Gland segmentation (MPAMatch UNI-TransUNet)"):
        super().__init__(type=InferType.SEGMENTATION, labels={"gland": 1}, dimension=2, description=description,
                         config={"tta": False})
        self.pipeline = pipeline

    def is_valid(self) -> bool:
        return self.pipeline.available()

    def get_path(self, validate: bool = True):
        path = self.pipeline.model_path
        return str(path) if path.is_file() or not validate else None

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        start = time.time()
        image = request["image"]
        tta = str(request.get("tta", False)).lower() in ("1", "true", "yes")
        mask = self.pipeline.segment(image, tta=tta)
        infer_seconds = time.time() - start
        location = request.get("location") or [0, 0]
        polygons = mask_polygons(mask, offset=location[:2], min_area=float(request.get("min_poly_area", 0) or 0))
        params = {
            "label_names": {"gland": 1},
            "annotation": annotation_result(polygons),
            "glands": len(polygons),
            "latencies": {"pre": 0.0, "infer": round(infer_seconds, 3), "post": round(time.time() - start - infer_seconds, 3),
                          "total": round(time.time() - start, 3)},
        }
        if request.get("result_write_to_file", True) is False:
            return None, params
        handle, path = tempfile.mkstemp(suffix=".png", prefix="gland_")
        os.close(handle)
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)
        return path, params
