"""What the MONAI Deploy operators compute, as plain classes that run and are tested without the SDK.

Each step matches the bundle's ``inference.json`` with ``backend: onnx``: the same image reading (PIL, RGB), the
same ImageNet normalisation on the 0..255 scale, the same Gaussian-blended sliding window, softmax and argmax, and
the same mask writer, so the application writes the masks ``monai.bundle run inference`` writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensity

from scripts.data import IMAGENET_MEAN_255, IMAGENET_STD_255, EnsureRGBd, read_image
from scripts.deploy.onnx import OnnxSegmenter
from scripts.errors import ConfigError
from scripts.inference import InferenceInputs, SavePredictiond, ScaledInferer, scan_inputs
from scripts.networks.record import stored_record

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
    """The images of a folder, read one at a time as channel-first RGB tensors on the 0..255 scale.

    Every file is opened once up front (as the bundle's inference does); files that cannot be read then, or
    later when they are loaded, are logged, skipped and listed by :meth:`report`.

    Args:
        input_dir: folder of PNG / JPEG / TIFF / BMP images.

    Raises:
        ConfigError: when the folder is missing, holds no images, or none of them can be read.

    Examples::

        loader = ImageFolderLoader("tiles/")
        images = [loader.load(path) for path in loader.paths]
        loader.report()  # raises, naming every unreadable file, if there was one
    """

    def __init__(self, input_dir: str | os.PathLike):
        self.inputs: InferenceInputs = scan_inputs(input_dir)
        self.paths = [item["image"] for item in self.inputs.items]
        self._read = Compose([
            LoadImaged("image", image_only=True, reader="PILReader", reverse_indexing=False),
            EnsureChannelFirstd("image"),
            EnsureRGBd("image"),
        ])

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
    """Class indices for one image of any size from an exported model, through a Gaussian-blended sliding window.

    A model exported with its record (``export-onnx`` of a recorded ``model.pt``) brings its own window and image
    scale: the window replaces ``roi_size`` (logged when they differ), and the image is resized by the scale before
    the window and the logits back after it, as ``inference.json`` does (``ScaledInferer``).

    Args:
        model_path: the ``.onnx`` file, or a folder holding exactly one.
        num_classes: classes the model predicts. Defaults to 2.
        roi_size: window size, multiples of the encoder's patch size, for a model without a record. Defaults to
            (96, 96), as inference.json.
        sw_batch_size: windows per ONNX Runtime call. Defaults to 4.
        overlap: window overlap. Defaults to 0.25.
        providers: ONNX Runtime providers. Defaults to CUDA when available, else CPU.
    """

    def __init__(self, model_path: str | os.PathLike, num_classes: int = 2, roi_size: Sequence[int] = (96, 96),
                 sw_batch_size: int = 4, overlap: float = 0.25, providers: list[str] | None = None):
        if len(roi_size) != 2 or min(roi_size) < 1:
            raise ConfigError(f"roi_size={list(roi_size)}: give two positive sides, e.g. [96, 96].")
        path = resolve_model_path(model_path)
        self.network = OnnxSegmenter(path, num_classes, providers=providers)
        self.normalize = NormalizeIntensity(subtrahend=IMAGENET_MEAN_255, divisor=IMAGENET_STD_255, channel_wise=True)
        record = stored_record(path, "-m") or {}
        window, self.image_scale = list(record.get("roi_size") or roi_size), float(record.get("image_scale") or 1.0)
        if record and window != list(roi_size):
            logger.info("Model %s was trained with the window %s; it replaces roi_size %s.", path, window, list(roi_size))
        self.inferer = ScaledInferer(SlidingWindowInferer(roi_size=window, sw_batch_size=sw_batch_size,
                                                          overlap=overlap, mode="gaussian"), scale=self.image_scale)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: 3 x H x W on the 0..255 scale; returns 1 x H x W class indices."""
        batch = torch.as_tensor(self.normalize(image), dtype=torch.float32)[None]
        with torch.no_grad():
            logits = self.inferer(batch, self.network)
        return torch.softmax(logits, dim=1).argmax(dim=1)


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
        stem = Path(str(image.meta["filename_or_obj"])).stem
        return self.output_dir / f"{stem}_mask.png"
