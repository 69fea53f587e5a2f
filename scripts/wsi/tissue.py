"""Tissue detection on a low-resolution thumbnail, so that background tiles of a slide are never segmented.

The thumbnail is assembled block by block from the coarsest pyramid level that is fine enough, so building it
never decodes a whole level. Tissue is where the colour saturation exceeds a threshold (Otsu's by default, kept
between ``min_threshold``, so that an empty slide is not thresholded on noise, and ``max_threshold``, so that a
slide that is all tissue is not split into pale and dark tissue), closed, hole-filled and cleared of specks
smaller than ``min_area``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from scripts.errors import ConfigError
from scripts.wsi.slide import Slide, region_at_scale

__all__ = ["build_thumbnail", "tissue_mask", "otsu_threshold", "saturation"]


def build_thumbnail(slide: Slide, level: int, factor: float, grid_shape: tuple[int, int], downsample: int,
                    max_read: int = 2048) -> np.ndarray:
    """RGB thumbnail of the processing grid (``level`` shrunk by ``factor``, ``grid_shape`` pixels) at 1/``downsample``.

    Each block is read from the coarsest level whose pixels are at most as large as a thumbnail pixel, so no read
    exceeds ``max_read`` x ``max_read`` source pixels.
    """
    if downsample < 1:
        raise ConfigError(f"'tissue_downsample' must be >= 1, got {downsample}.")
    thumb_h, thumb_w = math.ceil(grid_shape[0] / downsample), math.ceil(grid_shape[1] / downsample)
    thumb = np.empty((thumb_h, thumb_w, 3), np.uint8)
    # thumbnail pixel size in level-0 pixels, then the coarsest level still at least that fine
    thumb_px = slide.downsamples[level] * factor * downsample
    source = max((lv for lv in range(slide.level_count) if slide.downsamples[lv] <= thumb_px * 1.001),
                 key=lambda lv: slide.downsamples[lv])
    source_factor = thumb_px / slide.downsamples[source]
    block = max(16, int(max_read // math.ceil(source_factor)))
    for top in range(0, thumb_h, block):
        for left in range(0, thumb_w, block):
            h, w = min(block, thumb_h - top), min(block, thumb_w - left)
            thumb[top:top + h, left:left + w] = region_at_scale(slide, source, source_factor, top, left, (h, w))
    return thumb


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image."""
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)  # uint8: a float copy of the whole thumbnail is not needed
    spread = (high - low).astype(np.float32)
    return np.divide(spread, high, out=np.zeros_like(spread), where=high > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * centres)
    mean_low = mass_low / np.maximum(weight_low, 1e-12)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def tissue_mask(thumbnail: np.ndarray, threshold: float | None = None, min_threshold: float = 0.05,
                max_threshold: float = 0.15, min_area: int = 16, closing: int = 2) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB thumbnail and the saturation threshold used.

    Args:
        thumbnail: H x W x 3 uint8.
        threshold: saturation cut in [0, 1]; None for Otsu's threshold. Defaults to None.
        min_threshold: lower bound of Otsu's cut, so that a blank slide yields no tissue. Defaults to 0.05.
        max_threshold: upper bound of Otsu's cut. On a slide that is (nearly) all tissue, Otsu splits the tissue
            itself into pale and dark halves; stained tissue is more saturated than this, glass much less.
            Defaults to 0.15.
        min_area: tissue components smaller than this many thumbnail pixels are dropped. Defaults to 16.
        closing: iterations of binary closing that bridge small gaps. Defaults to 2.
    """
    sat = saturation(thumbnail)
    if threshold is None:
        cut = min(max(otsu_threshold(sat), min_threshold), max_threshold)
    else:
        cut = float(threshold)
    mask = sat > cut
    if closing > 0:
        mask = ndimage.binary_closing(mask, iterations=closing, border_value=0) | mask
    mask = ndimage.binary_fill_holes(mask)
    if min_area > 1 and mask.any():
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_area
        keep[0] = False
        mask = keep[labels]
    return mask, cut
