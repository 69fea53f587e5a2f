"""``inference.json`` as a Python object: its preprocessing, network, window and post-processing, one image at a time.

The MONAI Label app and the MONAI Deploy application segment through this class, so a suggestion in QuPath, a mask
from a Deploy application and a mask from ``python -m monai.bundle run inference`` come from one recipe: the
config file is parsed with MONAI's ``ConfigParser`` and nothing of it is copied. The network and window come from
the trained model's record (``model.pt`` or the ONNX file's metadata) as in the bundle's own inference, and the
pipeline is rebuilt when the model file changes (a training run publishing a better model).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts.errors import ConfigError
from scripts.paths import config_path

__all__ = ["InferencePipeline", "InputError", "INFERENCE_CONFIG", "image_reader"]

logger = logging.getLogger(__name__)

INFERENCE_CONFIG = config_path("inference.json")
_POST_KEYS = ("min_object_size", "fill_holes", "split_touching")


def config_files(config_file) -> list[Path]:
    """The inference config as a list of files: one path, or a list whose first file is the bundle's
    ``inference.json`` and the others override it (a data set preset, a recipe). Defaults to ``inference.json``."""
    if not config_file:
        return [INFERENCE_CONFIG]
    files = [Path(f) for f in (config_file if isinstance(config_file, (list, tuple)) else [config_file])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ConfigError(f"Inference config {missing or '[]'} not found; give the bundle's configs/inference.json, "
                          "then any preset or recipe files that override it.")
    return files


def image_reader(config_file: str | os.PathLike | None = None, overrides: dict | None = None):
    """``inference.json``'s ``load_image`` transform: ``{"image": path}`` -> a channel-first RGB image on the 0..255
    scale, read as the bundle's inference reads it. Needs no model, so a folder can be read before one is loaded.

    Args:
        config_file: the inference config, or a list of config files (``config_files``). Defaults to the bundle's
            ``configs/inference.json``.
        overrides: keys of that config to set first (as ``InferencePipeline`` takes them).
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(config_file)])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser.get_parsed_content("load_image")


class InputError(ConfigError):
    """An image sent for segmentation cannot be read; the message names it."""


class InferencePipeline:
    """``inference.json``'s preprocessing, network, window and post-processing for single images.

    Args:
        model_path: the trained ``model.pt`` (``backend="pytorch"``) or exported ``.onnx`` file (``"onnx"``).
        config_file: the inference config, or a list of config files whose first is the bundle's
            ``inference.json`` and whose others (a preset, a recipe) override it. Defaults to the bundle's
            ``configs/inference.json``.
        backend: ``"pytorch"`` or ``"onnx"``, as the config key ``backend``. Defaults to ``"pytorch"``.
        device: ``"cpu"``, ``"cuda"`` or None for CUDA when available.
        overrides: other keys of the config (e.g. ``{"sw_batch_size": 8, "min_object_size": 1600}``).

    Examples::

        pipeline = InferencePipeline("models/model.onnx", backend="onnx")
        mask = pipeline.segment("tile.png")              # H x W class indices, post-processed
        mask = pipeline.segment_tensor(image_0_255)      # the same from a 3 x H x W tensor on the 0..255 scale
    """

    # How to get a model file, in the words of the application that uses the pipeline.
    train_hint = ("train first (python -m monai.bundle run training --config_file bundle/configs/train.json) or copy "
                  "a model there")

    def __init__(self, model_path: str | os.PathLike, config_file: str | os.PathLike | None = None,
                 backend: str = "pytorch", device: str | torch.device | None = None, overrides: dict | None = None):
        self.config_files = config_files(config_file)
        self.config_file = self.config_files[0]
        if backend not in ("pytorch", "onnx"):
            raise ConfigError(f"backend='{backend}' is not 'pytorch' or 'onnx'.")
        self.model_path = Path(model_path)
        self.backend = backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.overrides = dict(overrides or {})
        parser = ConfigParser()
        parser.read_config([str(f) for f in self.config_files])
        self._check_overrides(parser)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._parts: dict[str, Any] = {}

    def available(self) -> bool:
        return self.model_path.is_file()

    def _model_stamp(self) -> tuple[int, int]:
        stat = self.model_path.stat()
        return stat.st_mtime_ns, stat.st_size

    def _check_overrides(self, parser: ConfigParser) -> None:
        """Refuses an override that the config does not define (it would be ignored); a network, window or label
        key belongs in ``model_overrides``, since the model's record decides them."""
        from scripts.networks import RECORD_KEYS, checked_overrides

        checked_overrides(self.overrides.get("model_overrides"))
        record_keys = sorted(set(self.overrides) & set(RECORD_KEYS))
        if record_keys:
            raise ConfigError(f"Inference settings {record_keys}: the network, window and class names come from the "
                              f"model's record ({self.model_path.name}). To rename the classes, or for a model file "
                              "written before records existed, give them under 'model_overrides', e.g. "
                              "{'model_overrides': {'class_names': ['background', 'gland']}}.")
        unknown = sorted(key for key in self.overrides if key not in parser)
        if unknown:
            from scripts.bundle_args import closest_keys

            raise ConfigError("Unknown inference settings: " + "; ".join(
                f"'{key}' ({closest_keys(key, parser.config)})" for key in unknown) +
                f". {self.config_file.name} defines no such key, so it would be ignored.")

    def _build(self) -> None:
        parser = ConfigParser()
        parser.read_config([str(f) for f in self.config_files])
        model_key = "onnx_path" if self.backend == "onnx" else "ckpt_path"
        settings = {"bundle_root": str(self.config_file.parents[1]), model_key: str(self.model_path),
                    "backend": self.backend, "device": self.device, "output_dir": tempfile.gettempdir(),
                    **self.overrides}
        for key, value in settings.items():
            parser[key] = value
        network = parser.get_parsed_content("network")
        if self.backend == "pytorch":
            from scripts.inference.fused import fold_batch_norms
            from scripts.networks import load_trained_weights

            load_trained_weights(network, self.model_path)
            # each batch norm folded into the convolution before it: the same function, fewer passes (fused.py);
            # the network is built again whenever the model file changes, so the view never outlives its weights
            network = fold_batch_norms(network.eval())
        inferers = {}
        for tta in (False, True):
            parser["tta"] = tta
            inferers[tta] = parser.get_parsed_content("inferer", lazy=False)
        self._parts = {
            "network": network,
            "preprocessing": parser.get_parsed_content("preprocessing"),
            "normalize": parser.get_parsed_content("normalize"),
            "inferers": inferers,
            "post": {key: parser.get_parsed_content(key) for key in _POST_KEYS},
            "settings": parser.get_parsed_content("model_settings"),
        }
        logger.info("Loaded %s (network %s)", self.model_path, self._parts["settings"])

    def missing_model(self) -> str:
        """What to tell a user who asks for a segmentation before there is a model file (``train_hint``)."""
        return f"No trained model at {self.model_path} yet: {self.train_hint}."

    def parts(self) -> dict[str, Any]:
        """The built pipeline; rebuilt when the model file changed since the last call."""
        with self._lock:
            if not self.model_path.is_file():
                raise FileNotFoundError(self.missing_model())
            stamp = self._model_stamp()
            if stamp != self._stamp:
                self._build()
                self._stamp = stamp
            return self._parts

    def _logits_to_probabilities(self, image: torch.Tensor, tta: bool) -> torch.Tensor:
        parts = self.parts()
        batch = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
        with torch.no_grad():
            logits = parts["inferers"][bool(tta)](batch, parts["network"])
        return torch.softmax(logits.float(), dim=1)[0].cpu()

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
        return self._logits_to_probabilities(data["image"], tta)

    def _postprocess(self, probabilities: torch.Tensor) -> np.ndarray:
        from scripts.inference.postprocess import postprocess_mask

        mask = probabilities.argmax(0).numpy().astype(np.uint8)
        return postprocess_mask(mask, **self.parts()["post"]).astype(np.uint8)

    def segment(self, image: str | os.PathLike | np.ndarray, tta: bool = False) -> np.ndarray:
        """The post-processed class-index mask (H x W, uint8) of an image file or array."""
        return self._postprocess(self.probabilities(image, tta))

    def segment_tensor(self, image: torch.Tensor, tta: bool = False) -> np.ndarray:
        """The post-processed class-index mask (H x W, uint8) of a loaded 3 x H x W image on the 0..255 scale.

        The image goes through the config's ``normalize`` transform, as the config's preprocessing does after
        loading.
        """
        normalized = self.parts()["normalize"]({"image": image})["image"]
        return self._postprocess(self._logits_to_probabilities(normalized, tta))
