"""Dictionary transforms that make pathology images and masks fit the network, with clear errors otherwise."""

from __future__ import annotations

import logging
from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.errors import ConfigError

from .images import PLAIN_MODES, RGB_CONVERSIONS, read_rgb

__all__ = ["EnsureRGBd", "PrepareLabeld", "check_roi_size", "IMAGENET_MEAN_255", "IMAGENET_STD_255"]

logger = logging.getLogger(__name__)

# ImageNet statistics on the 0..255 scale that LoadImage returns (UNI was trained with them).
IMAGENET_MEAN_255 = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD_255 = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def _source(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", None) or {}
    return str(meta.get("filename_or_obj", key))


class EnsureRGBd(MapTransform):
    """Makes channel-first images RGB on the 0..255 scale, as ``RGB_CONVERSIONS`` says for each PIL mode.

    Grey is repeated and an alpha channel dropped in place. Palette, CMYK, YCbCr, black-and-white and 16-bit
    images, whose stored values are not RGB on 0..255, are read again from their file (``meta['mode']`` and
    ``meta['filename_or_obj']`` of PILReader) and converted by ``rgb_array``; the first image of each converted
    mode is logged. Modes without a conversion, and other channel counts, are refused with a ``ConfigError``.
    Use it right after loading, before any spatial transform.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self._logged_modes: set[str] = set()

    def _reread(self, img: torch.Tensor, source: str) -> torch.Tensor:
        rgb = torch.as_tensor(read_rgb(source)).permute(2, 0, 1).to(img.dtype)
        if rgb.shape[1:] != img.shape[1:]:
            raise ConfigError(
                f"Image '{source}' is {rgb.shape[2]}x{rgb.shape[1]} in its file but {img.shape[2]}x{img.shape[1]} "
                "when converted to RGB; put EnsureRGBd right after LoadImaged."
            )
        if isinstance(img, MetaTensor):
            return MetaTensor(rgb, meta=img.meta, applied_operations=img.applied_operations)
        return rgb

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mode = (getattr(img, "meta", None) or {}).get("mode")
            if mode is not None and mode not in PLAIN_MODES:
                img = self._reread(img, _source(d, key))
            if mode not in (None, "RGB", "L") and mode not in self._logged_modes:
                self._logged_modes.add(mode)
                logger.info("Image '%s' has PIL mode %s: %s; other %s images are converted the same way.",
                            _source(d, key), mode, RGB_CONVERSIONS[mode], mode)
            channels = img.shape[0]
            if channels in (1, 2):  # grey, grey + alpha
                img = img[:1].repeat(3, *([1] * (img.ndim - 1)))
            elif channels == 4:  # RGB + alpha
                img = img[:3]
            elif channels != 3:
                raise ConfigError(
                    f"Image '{_source(d, key)}' has {channels} channels; expected RGB (3), RGBA (4), grey (1) or "
                    "grey with alpha (2)."
                )
            d[key] = img
        return d


class PrepareLabeld(MapTransform):
    """Turns a mask into one channel of class indices.

    Binary tasks (``num_classes=2``) take any value above ``threshold`` as foreground: 0 fits 0/255 masks and
    GlaS-style instance-id masks alike, 127 fits noisy 8-bit masks such as EBHI-SEG's or JPEG-compressed ones.
    With more classes the mask must already hold indices 0..num_classes-1.

    Args:
        keys: mask keys. Defaults to ``"label"``.
        num_classes: number of classes including background. Defaults to 2.
        threshold: foreground is ``mask > threshold`` in binary tasks (config key ``label_threshold``). Defaults to 0.
    """

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 2, threshold: float = 0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes
        self.threshold = threshold

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.shape[0] > 1:
                if not torch.equal(mask.amax(0), mask.amin(0)):
                    raise ConfigError(
                        f"Mask '{_source(d, key)}' has {mask.shape[0]} channels that differ; save masks as one "
                        "channel of class indices (or 0/255 for binary tasks)."
                    )
                mask = mask[:1]
            if self.num_classes == 2:
                mask = (mask > self.threshold).to(torch.float32)
            else:
                if mask.min() < 0 or mask.max() >= self.num_classes or not torch.equal(mask, mask.round()):
                    raise ConfigError(
                        f"Mask '{_source(d, key)}' has values {sorted(torch.unique(mask).tolist())[:10]}; "
                        f"expected class indices 0..{self.num_classes - 1}."
                    )
                mask = mask.to(torch.float32)
            d[key] = mask
        return d


def check_roi_size(roi_size: Sequence[int], patch_size: int, key: str = "roi_size") -> list[int]:
    """Returns ``roi_size`` as a list after checking that each side is a positive multiple of the patch size; the
    error names the multiples on either side of each wrong side (256 with patch 14: 252 or 266)."""
    sizes = [int(s) for s in roi_size]
    if len(sizes) != 2:
        raise ConfigError(
            f"Config key '{key}' is {list(roi_size)}; it needs 2 sides (height, width), e.g. {[patch_size * 14] * 2}."
        )
    if any(s <= 0 or s % patch_size for s in sizes):
        around = {s: _multiples_around(s, patch_size) for s in sizes if s <= 0 or s % patch_size}
        choices = ", ".join(f"{' or '.join(map(str, sides))} instead of {s}" for s, sides in around.items())
        nearest = [min(around[s], key=lambda m: abs(m - s)) if s in around else s for s in sizes]
        raise ConfigError(
            f"Config key '{key}' is {list(roi_size)}; each side must be a positive multiple of the encoder patch "
            f"size {patch_size}: use {choices}, e.g. --{key} [{nearest[0]},{nearest[1]}]."
        )
    return sizes


def _multiples_around(side: int, patch_size: int) -> tuple[int, ...]:
    """The multiples of ``patch_size`` just below and above ``side`` (only ``patch_size`` when none is below)."""
    lower = side // patch_size * patch_size
    return (lower, lower + patch_size) if lower > 0 else (patch_size,)


