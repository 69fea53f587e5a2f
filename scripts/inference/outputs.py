"""Writing what inference produces: the mask, and on request a probability map and a contour overlay."""

from __future__ import annotations

import os
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

from scripts.config import as_bool
from scripts.data.images import read_rgb
from scripts.errors import ConfigError
from scripts.handlers.evaluation import draw_overlay

__all__ = ["SavePredictiond"]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class SavePredictiond(MapTransform):
    """Writes ``<output_dir>/<image name>_<postfix>.png`` (class indices, times ``scale``) in the image's own row and
    column order; optionally ``_prob.png`` (foreground probability, 0..255) and ``_overlay.png`` (contours on the
    image).

    Args:
        keys: the prediction key, one channel of class indices. Defaults to ``"pred"``.
        output_dir: output folder, created if needed.
        source_key: the key whose ``filename_or_obj`` names the outputs. Defaults to ``"image"``.
        postfix: appended to the image's file stem. Defaults to ``"mask"``.
        scale: multiply class indices by this (255 shows binary masks as 0 / 255); None keeps the indices.
        probability_key: key of the softmax probabilities (C x H x W) to save as the foreground probability map,
            or None. Defaults to None.
        overlay: also write the prediction's contours over the image. Defaults to False.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str = "masks", source_key: str = "image",
                 postfix: str = "mask", scale: int | None = None, probability_key: str | None = None,
                 overlay: bool = False):
        super().__init__(keys)
        self.output_dir = output_dir
        self.source_key = source_key
        self.postfix = postfix
        self.scale = scale
        self.probability_key = probability_key
        self.overlay = as_bool(overlay, "save_overlays")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        meta = getattr(d[self.source_key], "meta", None) or {}
        source = str(meta.get("filename_or_obj", self.source_key))
        stem = os.path.join(self.output_dir, os.path.splitext(os.path.basename(source))[0])
        os.makedirs(self.output_dir, exist_ok=True)
        for key in self.key_iterator(d):
            mask = _numpy(d[key])
            mask = mask[0] if mask.ndim == 3 else mask
            values = mask.astype(np.int64) * (self.scale or 1)
            if values.max(initial=0) > 255:
                raise ConfigError(f"Mask for '{source}' has values up to {values.max()}; lower 'mask_scale'.")
            Image.fromarray(values.astype(np.uint8)).save(f"{stem}_{self.postfix}.png")
            if self.probability_key is not None:
                probs = _numpy(d[self.probability_key])
                foreground = probs[1:].sum(0) if probs.shape[0] > 1 else probs[0]
                Image.fromarray(np.clip(foreground * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(f"{stem}_prob.png")
            if self.overlay:
                rgb = read_rgb(source)
                Image.fromarray(draw_overlay(rgb, mask)).save(f"{stem}_overlay.png")
        return d
