"""Generated pyramidal TIFF slides: the demo slide, test fixtures and benchmark inputs, written tile by tile.

A slide is white background with a few elliptical tissue regions; each tissue tile is one of a small set of
generated H&E-like tiles (``scripts.data.synthetic``), so a slide of any size costs a few tile syntheses and its
memory never holds more than one tile per level. The gland mask can be written alongside, as the ground truth.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import tifffile

from scripts.data.synthetic import synthesize_tile
from scripts.files import atomic_path

__all__ = ["write_synthetic_slide", "demo_slide"]

BACKGROUND = 244  # the grey-white of glass under a bright field


def _tissue_tiles(rows: int, cols: int, rng: np.random.Generator, regions: int | None,
                  radius: tuple[float, float]) -> np.ndarray:
    """Which tiles hold tissue: the union of ``regions`` (1-3 when None) ellipses over the tile grid."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    tissue = np.zeros((rows, cols), bool)
    for _ in range(int(rng.integers(1, 4)) if regions is None else regions):
        cy, cx = rng.uniform(0.25, 0.75) * rows, rng.uniform(0.25, 0.75) * cols
        ry, rx = rng.uniform(*radius) * rows + 0.6, rng.uniform(*radius) * cols + 0.6
        tissue |= ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0
    return tissue


def _shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsampling by an integer factor (images) - the way scanners build their pyramids."""
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    view = image[:h * factor, :w * factor].reshape(h, factor, w, factor, *image.shape[2:]).astype(np.float32)
    return view.mean(axis=(1, 3)).round().astype(np.uint8)


def write_synthetic_slide(path: str | os.PathLike, height: int, width: int, tile: int = 256, mpp: float = 0.5,
                          seed: int = 0, variants: int = 6, mask_path: str | os.PathLike | None = None,
                          compression: str = "jpeg", tissue_regions: int | None = None,
                          tissue_radius: tuple[float, float] = (0.15, 0.35)) -> Path:
    """Writes a pyramidal RGB TIFF slide (levels halving down to one tile) and, optionally, its 0/255 gland mask.

    Args:
        path: the ``.tif`` to write.
        height: level-0 height in pixels.
        width: level-0 width in pixels.
        tile: TIFF tile size; also the size of the generated tissue tiles. Defaults to 256.
        mpp: microns per pixel recorded at level 0. Defaults to 0.5 (20x).
        seed: layout and texture seed. Defaults to 0.
        variants: how many distinct tissue tiles are generated and reused. Defaults to 6.
        mask_path: where to write the level-0 ground-truth mask as a tiled TIFF. Defaults to None (none).
        compression: TIFF compression of the image levels. Defaults to ``"jpeg"``, as scanners write.
        tissue_regions: number of elliptical tissue regions. Defaults to None (1 to 3, drawn).
        tissue_radius: range of the regions' radii as fractions of the slide's height and width. Defaults to
            (0.15, 0.35).
    """
    rng = np.random.default_rng(seed)
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    tissue = _tissue_tiles(rows, cols, rng, tissue_regions, tuple(tissue_radius))
    pieces = [synthesize_tile(rng, (tile, tile)) for _ in range(variants)]
    choice = rng.integers(0, variants, size=(rows, cols))

    shrunk: dict[int, list[np.ndarray]] = {}

    def level_tile(level: int, top: int, left: int, want_mask: bool = False) -> np.ndarray:
        """One tile of ``level``: 2^level x 2^level level-0 tiles, each shrunk by 2^level (cached per variant)."""
        span = 2 ** level
        if want_mask:
            sources = [mask for _, mask in pieces]
        else:
            if level not in shrunk:
                shrunk[level] = [_shrink(image, span) for image, _ in pieces]
            sources = shrunk[level]
        step = tile // span
        out = np.full((tile, tile, *sources[0].shape[2:]), 0 if want_mask else BACKGROUND, np.uint8)
        row0, col0 = top * span // tile, left * span // tile
        for r in range(row0, min(row0 + span, rows)):
            for c in range(col0, min(col0 + span, cols)):
                if tissue[r, c]:
                    out[(r - row0) * step:(r - row0 + 1) * step, (c - col0) * step:(c - col0 + 1) * step] = \
                        sources[choice[r, c]]
        return out

    path = Path(path)
    with atomic_path(path) as partial, tifffile.TiffWriter(partial, bigtiff=True) as writer:
        level, shape = 0, (height, width)
        while True:
            tiles = (level_tile(level, top, left) for top in range(0, shape[0], tile)
                     for left in range(0, shape[1], tile))
            level_mpp = mpp * 2 ** level
            writer.write(tiles, shape=(*shape, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                         compression=compression, subfiletype=1 if level else 0, metadata=None,
                         resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
            if max(shape) <= tile or 2 ** (level + 1) > tile:
                break
            level, shape = level + 1, (math.ceil(shape[0] / 2), math.ceil(shape[1] / 2))
    if mask_path is not None:
        from scripts.wsi.outputs import write_tiled_tiff

        def mask_tile(top: int, left: int) -> np.ndarray:
            return level_tile(0, top, left, want_mask=True)

        write_tiled_tiff(mask_path, (height, width), tile, mask_tile)
    return path


def demo_slide(root: str | os.PathLike, height: int = 3072, width: int = 4096, seed: int = 0) -> str:
    """The demo slide in ``root`` (generated once, then reused): a 3072 x 4096 pyramidal TIFF at 0.5 um/px.

    Keep ``root`` apart from the demo data set's folder, which must hold nothing but that data set.
    """
    path = Path(root) / f"demo_slide_{height}x{width}_s{seed}.tif"
    if not path.is_file():
        write_synthetic_slide(path, height, width, seed=seed)
    return str(path)
