"""What the MONAI Deploy operators compute, as plain classes that run and are tested without the SDK.

The segmentation is the bundle's ``inference.json`` with ``backend: onnx``, parsed by MONAI's ``ConfigParser``
(``scripts.inference.InferencePipeline``): normalisation, window, softmax, argmax and gland post-processing are not
copied here. Images are read as the config's preprocessing reads them (PIL, RGB) and masks written by the same
writer, so the application writes the masks ``monai.bundle run inference`` writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from scripts.data import read_image
from scripts.errors import ConfigError
from scripts.inference import InferenceInputs, InferencePipeline, SavePredictiond, output_stem, scan_inputs
from scripts.inference.pipeline import image_reader
from scripts.networks import checked_overrides

__all__ = ["ImageFolderLoader", "TiledOnnxSegmenter", "MaskWriter", "resolve_model_path"]

logger = logging.getLogger(__name__)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The ``.onnx`` file itself, or the only ``.onnx`` file under a folder (a MAP keeps models in sub-folders).

    Raises:
        ConfigError: when nothing is at ``path`` or a folder holds no or several ``.onnx`` files.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise ConfigError(
            f"Model folder '{path}' holds {len(found)} .onnx files {[str(p) for p in found][:5]}; "
            "keep exactly one there or pass the file itself (-m / HOLOSCAN_MODEL_PATH)."
        )
    raise ConfigError(
        f"ONNX model '{path}' does not exist (-m / HOLOSCAN_MODEL_PATH); export one with "
        "python -m scripts.cli export-onnx."
    )


class ImageFolderLoader:
    """The images of a folder, read one at a time as channel-first RGB tensors on the 0..255 scale, by the
    ``load_image`` transform of ``inference.json`` (what the bundle's inference reads with).

    Every file is opened once up front (as the bundle's inference does); files that cannot be read then, or
    later when they are loaded, are logged, skipped and listed by :meth:`report`.

    Args:
        input_dir: folder of PNG / JPEG / TIFF / BMP images.
        config_file: the inference config. Defaults to the bundle's ``configs/inference.json``.
        overrides: keys of that config (app.yaml's ``inference`` section), as the segmenter gets them.

    Raises:
        ConfigError: when the folder is missing, holds no images, holds images whose masks would share a name
            (``a.png`` and ``a.jpg``), or none of them can be read.

    Examples::

        loader = ImageFolderLoader("tiles/")
        images = [loader.load(path) for path in loader.paths]
        loader.report()  # raises, naming every unreadable file, if there was one
    """

    def __init__(self, input_dir: str | os.PathLike, config_file: str | os.PathLike | None = None,
                 overrides: dict | None = None):
        self.inputs: InferenceInputs = scan_inputs(input_dir)
        self.paths = [item["image"] for item in self.inputs.items]
        self._read = image_reader(config_file, overrides)

    def load(self, path: str) -> MetaTensor | None:
        """The image at ``path`` (3 x H x W, float, with its file name in ``meta``), or None when it cannot be read."""
        try:
            return self._read({"image": path})["image"]
        except (OSError, RuntimeError, ValueError) as err:
            _, problem = read_image(path, rgb=True)  # says what is wrong with a file in words, unlike the readers
            if problem is None:
                reason = err
                while reason.__cause__ is not None:  # Compose wraps the reader's or transform's own message
                    reason = reason.__cause__
                problem = f"{path}: {reason}"
            self.inputs.items = [item for item in self.inputs.items if item["image"] != path]
            self.inputs.failures.append(problem)
            logger.error("%s; it is skipped and reported at the end.", problem)
            return None

    def report(self) -> None:
        """Raises a ``ConfigError`` naming every unreadable file, if any; the readable ones were processed."""
        self.inputs(None)  # the bundle's end-of-run report; it needs no engine


class TiledOnnxSegmenter:
    """Post-processed class indices for one image of any size from an exported model, as ``inference.json`` does.

    Everything comes from the bundle's ``inference.json`` (``scripts.inference.InferencePipeline`` with
    ``backend: onnx``): the normalisation, the Gaussian-blended sliding window with the model's own window and image
    scale (from the ONNX file's record), softmax, argmax and the gland post-processing. ``overrides`` sets other keys
    of that config, as the ``inference`` section of ``app.yaml`` does.

    Args:
        model_path: the ``.onnx`` file, or a folder holding exactly one.
        overrides: keys of ``inference.json`` (e.g. ``{"sw_batch_size": 8, "min_object_size": 1600}``; the
            network's keys, such as ``roi_size``, only under ``model_overrides`` and only for a model exported
            without its record). Defaults to None.
        config_file: the inference config. Defaults to the bundle's ``configs/inference.json``.
    """

    def __init__(self, model_path: str | os.PathLike, overrides: dict | None = None,
                 config_file: str | os.PathLike | None = None):
        overrides = dict(overrides or {})
        roi_size = checked_overrides(overrides.get("model_overrides")).get("roi_size")
        if roi_size is not None and (len(roi_size) != 2 or min(roi_size) < 1):
            raise ConfigError(f"roi_size={list(roi_size)} (app.yaml, section 'inference', model_overrides): give two "
                              "positive sides, e.g. [96, 96].")
        path = resolve_model_path(model_path)
        self.pipeline = InferencePipeline(path, config_file, backend="onnx", overrides=overrides)
        parts = self.pipeline.parts()
        self.network, self.inferer = parts["network"], parts["inferers"][False]
        self.image_scale = float(parts["settings"]["image_scale"])
        self.num_classes = int(parts["settings"]["num_classes"])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: 3 x H x W on the 0..255 scale; returns 1 x H x W class indices."""
        return torch.from_numpy(self.pipeline.segment_tensor(image).astype(np.int64))[None]


class MaskWriter:
    """Writes ``<output_dir>/<image name>_mask.png`` the way the bundle's inference does (0 / 255 when binary).

    Args:
        output_dir: output folder, created if needed.
        num_classes: with 2 classes the mask is scaled to 0 / 255, otherwise it holds the class indices. Defaults to 2.
    """

    def __init__(self, output_dir: str | os.PathLike, num_classes: int = 2):
        self.output_dir = Path(output_dir)
        self._save = SavePredictiond("pred", output_dir=str(output_dir), postfix="mask",
                                     scale=255 if num_classes == 2 else None)

    def __call__(self, image: MetaTensor, mask: torch.Tensor) -> Path:
        """Writes the mask of ``image`` (the loaded tensor, whose ``meta`` names the file) and returns its path."""
        self._save({"image": image, "pred": mask})
        return self.output_dir / f"{output_stem(image.meta['filename_or_obj'])}_mask.png"
