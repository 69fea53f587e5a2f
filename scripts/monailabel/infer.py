"""The MONAI Label infer task ``gland``: the bundle's ``inference.json`` pipeline behind MONAI Label's API.

Preprocessing, the network (rebuilt from the record in ``model.pt``), the sliding window, flip test-time
augmentation and the gland post-processing all come from ``inference.json`` through MONAI's ``ConfigParser``, so a
suggestion in QuPath is the mask ``python -m monai.bundle run inference`` writes for the same image. The weights are
reloaded when ``model.pt`` changes (a training run publishing a better model).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from scripts.errors import ConfigError
from scripts.monailabel.annotations import annotation_result, mask_polygons
from scripts.networks import load_trained_weights

__all__ = ["GlandPipeline", "GlandInferTask", "InputError"]

logger = logging.getLogger(__name__)


class InputError(ConfigError):
    """An image sent for segmentation cannot be read; the message names it."""


class GlandPipeline:
    """``inference.json``'s preprocessing, network, window and post-processing, one image at a time.

    Args:
        bundle_root: the bundle folder (holds ``configs/inference.json``; in this repository ``bundle``).
        model_path: the trained ``model.pt``.
        device: ``"cpu"``, ``"cuda"`` or None for CUDA when available.
        overrides: extra ``inference.json`` keys (e.g. ``{"sw_batch_size": 8}``).
    """

    def __init__(self, bundle_root: str | os.PathLike, model_path: str | os.PathLike, device: str | None = None,
                 overrides: dict | None = None):
        self.bundle_root = Path(bundle_root)
        self.config_file = self.bundle_root / "configs" / "inference.json"
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file} not found: 'bundle_root' must be the bundle folder.")
        self.model_path = Path(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.overrides = dict(overrides or {})
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._parts: dict[str, Any] = {}

    def available(self) -> bool:
        return self.model_path.is_file()

    def _model_stamp(self) -> tuple[int, int]:
        stat = self.model_path.stat()
        return stat.st_mtime_ns, stat.st_size

    def _build(self) -> None:
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        settings = {"bundle_root": str(self.bundle_root), "ckpt_path": str(self.model_path), "backend": "pytorch",
                    "device": self.device, "output_dir": tempfile.gettempdir(), **self.overrides}
        for key, value in settings.items():
            parser[key] = value
        network = parser.get_parsed_content("network")
        load_trained_weights(network, self.model_path)
        network.eval()
        inferers = {}
        for tta in (False, True):
            parser["tta"] = tta
            inferers[tta] = parser.get_parsed_content("inferer", lazy=False)
        self._parts = {
            "network": network,
            "preprocessing": parser.get_parsed_content("preprocessing"),
            "inferers": inferers,
            "post": {key: parser.get_parsed_content(key) for key in ("min_object_size", "fill_holes", "split_touching")},
            "settings": parser.get_parsed_content("model_settings"),
        }
        logger.info("Loaded %s (network %s)", self.model_path, self._parts["settings"])

    def parts(self) -> dict[str, Any]:
        """The built pipeline; rebuilt when ``model.pt`` changed since the last call."""
        with self._lock:
            if not self.model_path.is_file():
                raise FileNotFoundError(f"No trained model at {self.model_path}: train first (POST /train/gland) or "
                                        "copy a model.pt there.")
            stamp = self._model_stamp()
            if stamp != self._stamp:
                self._build()
                self._stamp = stamp
            return self._parts

    def probabilities(self, image: str | os.PathLike | np.ndarray, tta: bool = False) -> torch.Tensor:
        """Softmax probabilities (C x H x W, the input's size) of an image file or an H x W x 3 uint8 array."""
        parts = self.parts()
        with tempfile.TemporaryDirectory() as folder:
            if isinstance(image, np.ndarray):  # a slide region: the same loader as files, through a lossless PNG
                path = Path(folder) / "region.png"
                Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8)).save(path)
                image = path
            try:
                data = parts["preprocessing"]({"image": str(image)})
            except Exception as err:  # MONAI wraps reader errors in RuntimeError
                raise InputError(f"Image '{image}' cannot be read as an RGB image ({str(err).splitlines()[0][:200]}); "
                                 "send a PNG, JPEG or TIFF tile.") from err
        batch = torch.as_tensor(data["image"])[None].to(self.device)
        with torch.no_grad():
            logits = parts["inferers"][bool(tta)](batch, parts["network"])
        return torch.softmax(logits.float(), dim=1)[0].cpu()

    def segment(self, image: str | os.PathLike | np.ndarray, tta: bool = False) -> np.ndarray:
        """The post-processed class-index mask (H x W, uint8) of an image file or array."""
        from scripts.inference import postprocess_mask

        post = self.parts()["post"]
        mask = self.probabilities(image, tta).argmax(0).numpy().astype(np.uint8)
        return postprocess_mask(mask, **post).astype(np.uint8)


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
