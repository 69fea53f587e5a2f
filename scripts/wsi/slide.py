"""Whole-slide images read region by region, never whole.

``open_slide`` opens a pyramidal TIFF, SVS or any format OpenSlide knows through MONAI's ``WSIReader``:

- ``backend="openslide"``: MONAI's OpenSlide reader; OpenSlide decodes only the tiles a region touches;
- ``backend="tifffile"``: MONAI's tifffile reader opens the file, but regions are decoded here, tile by tile.
  MONAI 1.6's ``TiffFileWSIReader.get_data`` decodes the whole level for every patch, which for a slide means
  gigabytes per tile; ``TiffLevel`` below reads only the tiles (or strips) that intersect the region;
- ``backend="auto"`` (default): OpenSlide when it is installed and accepts the file, tifffile otherwise.

Coordinates are (row, column) throughout, in pixels of the level being read.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from scripts.errors import ConfigError

__all__ = ["Slide", "TiffLevel", "open_slide", "SLIDE_BACKENDS"]

logger = logging.getLogger(__name__)

SLIDE_BACKENDS = ("auto", "openslide", "tifffile")


class TiffLevel:
    """Random access to rectangles of one TIFF page, decoding only the tiles or strips that a rectangle touches.

    Args:
        page: a ``tifffile.TiffPage`` (tiled or stripped, any compression tifffile can decode).
        fill: value for the parts of a rectangle outside the page. Defaults to 255 (white, the slide background).
    """

    def __init__(self, page, fill: int = 255):
        self.page = page
        self.fill = fill
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.channels = int(page.samplesperpixel)
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip or self.height), self.width
        self.seg_cols = math.ceil(self.width / self.seg_w)
        self._decode = page.decode
        self._fh = page.parent.filehandle
        self._jpegtables = getattr(page, "jpegtables", None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _segment(self, row: int, col: int) -> np.ndarray:
        index = row * self.seg_cols + col
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if count == 0:  # a tile the writer left empty
            return np.full((self.seg_h, self.seg_w, self.channels), self.fill, self.page.dtype)
        self._fh.seek(offset)
        data = self._fh.read(count)
        decoded, _, _ = self._decode(data, index, jpegtables=self._jpegtables)
        # tifffile returns (planes, depth, length, width, samples) for a segment
        return decoded.reshape(decoded.shape[-3:])

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The ``height`` x ``width`` x channels rectangle at (``top``, ``left``); outside the page is ``fill``."""
        out = np.full((height, width, self.channels), self.fill, dtype=self.page.dtype)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, self.height), min(left + width, self.width)
        if y0 >= y1 or x0 >= x1:
            return out
        for row in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for col in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                seg = self._segment(row, col)
                sy, sx = row * self.seg_h, col * self.seg_w
                a0, a1 = max(y0, sy), min(y1, sy + seg.shape[0], self.height)
                b0, b1 = max(x0, sx), min(x1, sx + seg.shape[1], self.width)
                out[a0 - top:a1 - top, b0 - left:b1 - left] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
        return out


class Slide:
    """One open whole-slide image: its levels, their sizes, downsample factors and microns per pixel.

    Use ``open_slide``; ``read(level, top, left, height, width)`` returns an RGB uint8 H x W x 3 array.
    """

    def __init__(self, path: str, backend: str, handle, reader, levels: list[TiffLevel] | None):
        self.path, self.backend = path, backend
        self._handle, self._reader, self._levels = handle, reader, levels
        if levels is not None:
            self.level_shapes = [lv.shape for lv in levels]
        else:
            count = reader.get_level_count(handle)
            self.level_shapes = [tuple(int(v) for v in reader.get_size(handle, lv)) for lv in range(count)]
        base_h = self.level_shapes[0][0]
        self.downsamples = [base_h / shape[0] for shape in self.level_shapes]
        self.mpp = self._read_mpp()

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def _read_mpp(self) -> float | None:
        """Microns per pixel at level 0, or None when the file does not record it."""
        try:
            if self.backend == "openslide":
                mpp_y, mpp_x = self._reader.get_mpp(self._handle, 0)
            else:
                mpp_y, mpp_x = _tiff_mpp(self._levels[0].page)
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            return None
        if not mpp_x or not mpp_y or not math.isfinite(mpp_x) or mpp_x <= 0:
            return None
        return float((mpp_x + mpp_y) / 2)

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.downsamples[level]

    def read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """RGB uint8 rectangle of ``level``; parts outside the slide are white."""
        if not 0 <= level < self.level_count:
            raise ConfigError(f"Slide '{self.path}' has levels 0..{self.level_count - 1}; level {level} was asked for.")
        if self._levels is not None:
            region = self._levels[level].read(top, left, height, width)
        else:
            region = self._read_openslide(level, top, left, height, width)
        if region.shape[-1] == 1:
            region = np.repeat(region, 3, axis=-1)
        return np.ascontiguousarray(region[..., :3])

    def _read_openslide(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        level_h, level_w = self.level_shapes[level]
        out = np.full((height, width, 3), 255, np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, level_h), min(left + width, level_w)
        if y0 >= y1 or x0 >= x1:
            return out
        scale = self.downsamples[level]
        location = (int(round(y0 * scale)), int(round(x0 * scale)))  # MONAI takes the level-0 top-left corner
        patch, _ = self._reader.get_data(self._handle, location=location, size=(y1 - y0, x1 - x0), level=level)
        out[y0 - top:y1 - top, x0 - left:x1 - left] = np.asarray(patch)[..., :3]
        return out

    def close(self) -> None:
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide('{self.path}', backend={self.backend}, levels={self.level_shapes}, "
                f"mpp={self.mpp if self.mpp is None else round(self.mpp, 4)})")


def _tiff_mpp(page) -> tuple[float, float]:
    """Microns per pixel from a TIFF page's resolution tags (or an Aperio description's ``MPP = ...``)."""
    description = str(page.description or "")
    if "MPP =" in description:
        value = float(description.split("MPP =")[1].split("|")[0])
        return value, value
    tags = page.tags
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit))
    if per_unit is None:
        raise ValueError("no physical resolution unit")
    xres, yres = tags["XResolution"].value, tags["YResolution"].value
    return per_unit * yres[1] / yres[0], per_unit * xres[1] / xres[0]


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def open_slide(path: str | os.PathLike, backend: str = "auto") -> Slide:
    """Opens a whole-slide image for region reads.

    Args:
        path: a pyramidal TIFF, SVS, or any other format the chosen backend reads.
        backend: ``"auto"``, ``"openslide"`` or ``"tifffile"`` (see the module docstring). Defaults to ``"auto"``.

    Raises:
        ConfigError: the file is missing or no backend can read it; the message names the file and the backends.
    """
    from monai.data import WSIReader

    path = str(path)
    if backend not in SLIDE_BACKENDS:
        raise ConfigError(f"slide backend '{backend}' is not one of {SLIDE_BACKENDS} (config key 'slide_backend').")
    if not Path(path).is_file():
        raise ConfigError(f"Slide '{path}' does not exist; check 'slides' in the config or the --slides argument.")
    errors = []
    order = ["openslide", "tifffile"] if backend == "auto" else [backend]
    for name in order:
        if name == "openslide" and not _openslide_available():
            errors.append("openslide: not installed (pip install openslide-python openslide-bin)")
            continue
        try:
            reader = WSIReader(backend=name, channel_dim=-1)
            handle = reader.read(path)
            levels = None
            if name == "tifffile":
                series = handle.series[0]
                levels = [TiffLevel(level.keyframe) for level in series.levels]
            slide = Slide(path, name, handle, reader, levels)
        except Exception as err:  # each backend raises its own error types for unreadable files
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        logger.info("Opened %r", slide)
        return slide
    raise ConfigError(f"Cannot read slide '{path}':\n  " + "\n  ".join(errors))


def choose_level(slide: Slide, level: int | None = None, mpp: float | None = None,
                 tolerance: float = 0.1) -> tuple[int, float]:
    """The level to read and the extra downscale factor (>= 1) that brings it to the target resolution.

    Args:
        slide: the open slide.
        level: a level index to segment at, used as it is. Exclusive with ``mpp``.
        mpp: a target resolution in microns per pixel; the coarsest level at least that fine is read and
            resized by the remaining factor. Levels within ``tolerance`` (relative) of the target count as equal.
        tolerance: see ``mpp``. Defaults to 0.1.
    """
    if level is not None and mpp is not None:
        raise ConfigError("Give either 'wsi_level' or 'wsi_mpp', not both.")
    if mpp is None:
        level = 0 if level is None else int(level)
        if not 0 <= level < slide.level_count:
            raise ConfigError(f"'wsi_level' {level} is out of range: slide '{slide.path}' has levels "
                              f"0..{slide.level_count - 1} {slide.level_shapes}.")
        return level, 1.0
    if mpp <= 0:
        raise ConfigError(f"'wsi_mpp' must be positive, got {mpp}.")
    if slide.mpp is None:
        raise ConfigError(f"Slide '{slide.path}' records no microns per pixel, so 'wsi_mpp' {mpp} cannot be "
                          "honoured; give 'wsi_level' instead.")
    candidates = [lv for lv in range(slide.level_count) if slide.level_mpp(lv) <= mpp * (1 + tolerance)]
    if not candidates:
        raise ConfigError(f"Slide '{slide.path}' is {slide.mpp:.3f} um/px at its finest level, coarser than "
                          f"'wsi_mpp' {mpp}; segmenting would need upsampling. Lower 'wsi_mpp' or use 'wsi_level'.")
    chosen = max(candidates, key=lambda lv: slide.level_mpp(lv))
    factor = mpp / slide.level_mpp(chosen)
    return chosen, (1.0 if abs(factor - 1) <= tolerance else factor)


def region_at_scale(slide: Slide, level: int, factor: float, top: int, left: int, size: Sequence[int]) -> np.ndarray:
    """An RGB region of ``size`` pixels in the target grid (level ``level`` shrunk by ``factor``)."""
    height, width = int(size[0]), int(size[1])
    if factor == 1.0:
        return slide.read(level, top, left, height, width)
    import torch
    import torch.nn.functional as F

    src_top, src_left = int(math.floor(top * factor)), int(math.floor(left * factor))
    src_h, src_w = int(math.ceil(height * factor)), int(math.ceil(width * factor))
    region = slide.read(level, src_top, src_left, src_h, src_w)
    tensor = torch.from_numpy(region).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
