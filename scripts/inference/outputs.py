"""Writing what inference produces: the mask, and on request a probability map and a contour overlay.

Every file is written through ``scripts.files.atomic_path`` (a temporary file, then a rename), so a reader or a
killed run never leaves a half-written mask under its final name. The outputs of an image are named after its file
stem (``output_stem``); ``check_output_names`` refuses a folder in which two images share one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Hashable, Iterable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

from scripts.config import as_bool
from scripts.data.images import draw_overlay, read_rgb
from scripts.errors import ConfigError
from scripts.files import atomic_path

__all__ = ["SavePredictiond", "output_stem", "check_output_names"]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def output_stem(source: str | os.PathLike) -> str:
    """The name an image's outputs start with: its file name without the suffix (``a.png``: ``a_mask.png``)."""
    return os.path.splitext(os.path.basename(str(source)))[0]


def check_output_names(sources: Iterable[str | os.PathLike], where: str) -> None:
    """Refuses images whose outputs would have the same names, before any is segmented.

    ``a.png`` and ``a.jpg`` would both write ``a_mask.png``, the second replacing the first. Stems are compared
    ignoring case, as the file systems of Windows and macOS do, so a folder behaves the same everywhere.

    Args:
        sources: the image files.
        where: the folder they come from, for the message.

    Raises:
        ConfigError: listing each group of images that share a name, and what to do.
    """
    groups = defaultdict(list)
    for source in sources:
        groups[output_stem(source).casefold()].append(Path(source).name)
    clashes = [sorted(names) for names in groups.values() if len(names) > 1]
    if clashes:
        lines = [f"{', '.join(names)} -> {output_stem(names[0])}_mask.png" for names in sorted(clashes)]
        raise ConfigError(
            f"Images in '{where}' would write the same output files, one replacing the other:\n  "
            + "\n  ".join(lines) + "\nRename the images so that their names without the suffix differ "
            "(e.g. a.png and a_2.jpg), or move one of each group to another folder; nothing was segmented."
        )


def _save_png(array: np.ndarray, path: str) -> None:
    with atomic_path(path, suffix=".png") as tmp:  # PIL takes the format from the suffix
        Image.fromarray(array).save(tmp)


class SavePredictiond(MapTransform):
    """Writes ``<output_dir>/<image name>_<postfix>.png`` (class indices, times ``scale``) in the image's own row and
    column order; optionally ``_prob.png`` (foreground probability, 0..255) and ``_overlay.png`` (contours on the
    image). Each file appears complete or not at all (``atomic_path``).

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
        stem = os.path.join(self.output_dir, output_stem(source))
        for key in self.key_iterator(d):
            mask = _numpy(d[key])
            mask = mask[0] if mask.ndim == 3 else mask
            values = mask.astype(np.int64) * (self.scale or 1)
            if values.max(initial=0) > 255:
                raise ConfigError(f"Mask for '{source}' has values up to {values.max()}; lower 'mask_scale'.")
            _save_png(values.astype(np.uint8), f"{stem}_{self.postfix}.png")
            if self.probability_key is not None:
                probs = _numpy(d[self.probability_key])
                foreground = probs[1:].sum(0) if probs.shape[0] > 1 else probs[0]
                _save_png(np.clip(foreground * 255.0 + 0.5, 0, 255).astype(np.uint8), f"{stem}_prob.png")
            if self.overlay:
                _save_png(draw_overlay(read_rgb(source), mask), f"{stem}_overlay.png")
        return d
