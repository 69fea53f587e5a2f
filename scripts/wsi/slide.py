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
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from scripts.errors import ConfigError, RunError

__all__ = ["Slide", "TiffLevel", "open_slide", "SLIDE_BACKENDS"]

logger = logging.getLogger(__name__)

SLIDE_BACKENDS = ("auto", "openslide", "tifffile")
MPP_RANGE = (0.02, 50.0)  # microns per pixel that a microscope slide can plausibly have


class TiffLevel:
    """Random access to rectangles of one TIFF page, decoding only the tiles or strips that a rectangle touches.

    Decoded segments are kept in a small least-recently-used cache (``cache_mb``), so the margins that
    neighbouring tiles share are decoded once.

    Args:
        page: a ``tifffile.TiffPage`` of 8-bit samples, interleaved (tiled or stripped, any compression tifffile
            decodes).
        fill: value for the parts of a rectangle outside the page. Defaults to 255 (white, the slide background).
        cache_mb: size of the decoded-segment cache. Defaults to 64.
        source: the file name and level for messages. Defaults to the page's file name.

    Raises:
        ConfigError: the page is not 8-bit or stores its colour planes separately; the message names the file.
    """

    def __init__(self, page, fill: int = 255, cache_mb: float = 64.0, source: str | None = None):
        self.page = page
        self.fill = fill
        self.source = source or str(page.parent.filehandle.path)
        if page.dtype != np.uint8:
            raise ConfigError(f"'{self.source}' stores {page.dtype} samples; whole-slide inference reads 8-bit RGB. "
                              "Convert it to an 8-bit pyramidal TIFF first (e.g. vips tiffsave --tile --pyramid "
                              "after vips cast uchar).")
        if page.planarconfig == 2 and page.samplesperpixel > 1:
            raise ConfigError(f"'{self.source}' stores its colour planes separately (PlanarConfiguration 2), "
                              "which this reader does not assemble; use slide_backend 'openslide' or convert it to "
                              "an interleaved pyramidal TIFF (vips tiffsave --tile --pyramid).")
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.channels = int(page.samplesperpixel)
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip or self.height), self.width
            self.seg_h = min(self.seg_h, self.height)
        self.seg_cols = math.ceil(self.width / self.seg_w)
        segment_mb = self.seg_h * self.seg_w * self.channels / 2**20
        if segment_mb > 64:
            logger.warning("'%s' is stored in strips of %d x %d pixels (%.0f MB decoded each): every region read "
                           "decodes whole strips, so memory follows the strip size. A tiled pyramidal TIFF "
                           "(vips tiffsave --tile --pyramid) reads much faster.", self.source, self.seg_h,
                           self.seg_w, segment_mb)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_items = max(1, int(cache_mb // max(segment_mb, 1e-6)))
        self._decode = page.decode
        self._fh = page.parent.filehandle
        self._decode_args = {"jpegtables": getattr(page, "jpegtables", None),
                             "jpegheader": getattr(page.keyframe, "jpegheader", None)}

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _segment(self, row: int, col: int) -> np.ndarray:
        index = row * self.seg_cols + col
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if count == 0:  # a tile the writer left empty
            segment = np.full((self.seg_h, self.seg_w, self.channels), self.fill, np.uint8)
        else:
            self._fh.seek(offset)
            data = self._fh.read(count)
            try:
                decoded, _, _ = self._decode(data, index, **self._decode_args)
            except Exception as err:  # codecs raise their own types; say where the damage is
                raise RunError(f"'{self.source}': cannot decode {'tile' if self.page.is_tiled else 'strip'} "
                                  f"{index} (row {row}, column {col}, file offset {offset}): {err}") from err
            # tifffile returns (planes, depth, length, width, samples) for a segment
            segment = decoded.reshape(decoded.shape[-3:])
        self._cache[index] = segment
        if len(self._cache) > self._cache_items:
            self._cache.popitem(last=False)
        return segment

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The ``height`` x ``width`` x channels rectangle at (``top``, ``left``); outside the page is ``fill``."""
        out = np.full((height, width, self.channels), self.fill, dtype=np.uint8)
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
        base_h, base_w = self.level_shapes[0]
        # per axis: pyramids whose sizes do not halve exactly have slightly different y and x factors
        self.level_scales = [(base_h / h, base_w / w) for h, w in self.level_shapes]
        self.downsamples = [(sy + sx) / 2 for sy, sx in self.level_scales]
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
        values = [float(mpp_x or 0), float(mpp_y or 0)]
        if not all(math.isfinite(v) and v > 0 for v in values):
            return None
        mpp = sum(values) / 2
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:  # e.g. a 72-dpi default written by a converter
            logger.warning("'%s' records %.4g um/px, outside the range of microscopy %s; it is ignored, so give "
                           "'wsi_level' instead of 'wsi_mpp'.", self.path, mpp, MPP_RANGE)
            return None
        return mpp

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
        # MONAI takes the level-0 top-left corner; OpenSlide maps it back with its own downsample factor
        scale = float(self._reader.get_downsample_ratio(self._handle, level))
        location = (int(round(y0 * scale)), int(round(x0 * scale)))
        try:
            patch, _ = self._reader.get_data(self._handle, location=location, size=(y1 - y0, x1 - x0), level=level)
        except Exception as err:  # OpenSlide reports damaged tiles with its own error types
            raise RunError(f"'{self.path}': cannot read the {x1 - x0} x {y1 - y0} region at ({x0}, {y0}) of level "
                           f"{level} ({err}); the slide file may be damaged.") from err
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
                levels = [TiffLevel(level.keyframe, source=f"{path} (level {index})")
                          for index, level in enumerate(series.levels)]
                if len(levels) == 1 and len(handle.pages) > 1:
                    logger.warning("tifffile finds no pyramid in '%s' (its %d pages are not marked as reduced "
                                   "levels), so every read is at full resolution; OpenSlide may know its layout.",
                                   path, len(handle.pages))
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
    """An RGB region of ``size`` pixels in the target grid: level ``level`` shrunk by ``factor``.

    Target pixel (y, x) is the average of the source area [y f, (y + 1) f) x [x f, (x + 1) f), sampled on a
    ceil(f) x ceil(f) grid with bilinear interpolation (``torchvision.ops.roi_align``). The area depends only on
    the pixel's absolute position, so neighbouring tiles resample seamlessly and the grid maps to the level by
    exactly ``factor``.
    """
    height, width = int(size[0]), int(size[1])
    if factor == 1.0:
        return slide.read(level, top, left, height, width)
    import torch
    from torchvision.ops import roi_align

    src_top, src_left = math.floor(top * factor) - 1, math.floor(left * factor) - 1
    src_h = math.ceil((top + height) * factor) + 1 - src_top
    src_w = math.ceil((left + width) * factor) + 1 - src_left
    region = slide.read(level, src_top, src_left, src_h, src_w)
    tensor = torch.from_numpy(region).permute(2, 0, 1)[None].float()
    box = torch.tensor([[0.0, left * factor - src_left, top * factor - src_top,
                         (left + width) * factor - src_left, (top + height) * factor - src_top]], dtype=torch.float64)
    resized = roi_align(tensor, box.float(), output_size=(height, width), spatial_scale=1.0,
                        sampling_ratio=math.ceil(factor), aligned=True)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
