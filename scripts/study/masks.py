"""Saving each test image's predicted mask during the study's evaluation, and the config that adds it.

The study evaluates with ``evaluate.json`` plus one small config written by :func:`write_mask_config`: it appends
:class:`SaveMaskd` to the evaluation's post-processing, so the masks come from the very predictions that were
scored, at the input's size, without a second inference pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Hashable, Mapping

import numpy as np
from PIL import Image

from scripts.files import write_text_atomically

__all__ = ["SaveMaskd", "write_mask_config", "MASK_DIR_NAME"]

MASK_DIR_NAME = "masks"


class SaveMaskd:
    """Writes ``<output_dir>/<name>.png`` for a prediction: class indices times ``scale`` (0 / 255 for binary tasks).

    The prediction may be one-hot or probabilities (C x H x W, reduced by argmax) or one channel of indices. The
    name is the entry's ``name_key`` field when present, else the image file's stem.

    Args:
        keys: the prediction key. Defaults to ``"pred"``.
        output_dir: output folder, created if needed.
        name_key: entry field holding the mask's file name (without suffix). Defaults to ``"mask_name"``.
        source_key: key whose ``filename_or_obj`` names the mask when ``name_key`` is absent. Defaults to ``"image"``.
        scale: multiplier of the class indices. Defaults to 255.
    """

    def __init__(self, keys: str = "pred", output_dir: str = MASK_DIR_NAME, name_key: str = "mask_name",
                 source_key: str = "image", scale: int = 255):
        self.key = keys
        self.output_dir = output_dir
        self.name_key = name_key
        self.source_key = source_key
        self.scale = int(scale)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        pred = d[self.key]
        array = pred.detach().cpu().numpy() if hasattr(pred, "detach") else np.asarray(pred)
        if array.ndim == 3:
            array = array.argmax(0) if array.shape[0] > 1 else array[0]
        values = array.astype(np.int64) * self.scale
        if values.max(initial=0) > 255 or values.min(initial=0) < 0:
            raise ValueError(f"SaveMaskd: mask values reach {values.max()}; lower 'scale' (now {self.scale}).")
        name = d.get(self.name_key)
        if not name:
            meta = getattr(d.get(self.source_key), "meta", None) or {}
            name = Path(str(meta.get("filename_or_obj", "image"))).stem
        os.makedirs(self.output_dir, exist_ok=True)
        Image.fromarray(values.astype(np.uint8)).save(os.path.join(self.output_dir, f"{name}.png"))
        return d


def write_mask_config(path: str | os.PathLike) -> Path:
    """Writes the config that makes ``evaluate.json`` also save the masks to ``<bundle_root>/masks/``.

    It replaces the evaluator's post-processing by the same transforms (``validate#postprocessing#transforms``)
    followed by :class:`SaveMaskd`; the masks are 0 / 255 for two classes and class indices otherwise.

    Args:
        path: the JSON file to write (inside the study's output folder).
    """
    content = {
        "study_mask_dir": f"$os.path.join(@bundle_root, '{MASK_DIR_NAME}')",
        "study_save_masks": {
            "_target_": "scripts.study.masks.SaveMaskd",
            "keys": "pred",
            "output_dir": "@study_mask_dir",
            "name_key": "mask_name",
            "scale": "$255 if @num_classes == 2 else 1",
        },
        "validate#evaluator#postprocessing": "$monai.transforms.Compose(@validate#postprocessing#transforms + [@study_save_masks])",
    }
    return write_text_atomically(path, json.dumps(content, indent=4) + "\n")
