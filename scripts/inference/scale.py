"""Inference at another image scale than the input's, with the result returned at the input's size."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

__all__ = ["ScaledInferer", "rescale_image"]


def rescale_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """A batch of images (N x C x H x W) resized by ``scale`` as the network sees it: bilinear, antialiased when
    shrinking (int8 calibration windows are cut from images resized by this too)."""
    if scale == 1.0:
        return image
    scaled = tuple(max(1, round(s * scale)) for s in image.shape[-2:])
    plain = image.as_tensor() if hasattr(image, "as_tensor") else image
    return F.interpolate(plain.float(), size=scaled, mode="bilinear", align_corners=False, antialias=scale < 1.0)


class ScaledInferer(Inferer):
    """Resizes the input by ``scale``, runs ``inferer`` on it and resizes the logits back to the input's size.

    A model trained on downscaled images (config key ``image_scale``, e.g. 0.5 for GlaS at 20x seen at 10x) must
    see images at the same scale at inference; the masks still come out at the size of the image given.

    Args:
        inferer: the inferer to wrap, e.g. a ``SlidingWindowInferer``.
        scale: the factor applied to height and width; 1.0 passes the input through untouched. Defaults to 1.0.
        autocast: run the network under ``torch.autocast`` in this dtype on the input's device (inference's
            ``amp``, see ``scripts.inference.precision.autocast_dtype``); the logits come back as float32, and a
            sliding window blends them in the input's float32. Defaults to None (no autocast).

    Examples::

        inferer = ScaledInferer(SlidingWindowInferer(roi_size=(128, 128)), scale=0.5)
        logits = inferer(image, network)  # same height and width as image
    """

    def __init__(self, inferer: Inferer, scale: float = 1.0, autocast: torch.dtype | None = None):
        super().__init__()
        if not 0.0 < float(scale) <= 4.0:
            raise ValueError(f"image_scale={scale} must be in (0, 4], e.g. 0.5 to segment at half resolution.")
        self.inferer = inferer
        self.scale = float(scale)
        self.autocast = autocast

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # no autocast context without one: an inner ``autocast(enabled=False)`` would switch off a caller's
        with torch.autocast(inputs.device.type, dtype=self.autocast) if self.autocast else nullcontext():
            if self.scale == 1.0:
                return self.inferer(inputs, network, *args, **kwargs).float()
            size = tuple(inputs.shape[-2:])
            logits = self.inferer(rescale_image(inputs, self.scale), network, *args, **kwargs)
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
