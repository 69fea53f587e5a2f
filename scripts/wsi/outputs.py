"""Slide-scale outputs written tile by tile: a tiled pyramidal TIFF mask and QuPath-ready GeoJSON polygons.

Both read the full-resolution mask from a tiled TIFF one tile (or one row of tiles) at a time, so their memory
does not depend on the slide's size. The pyramid keeps every level as a reduced-resolution page of the main IFD
chain, the layout that OpenSlide, QuPath and tifffile all read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tifffile

from scripts.wsi.slide import TiffLevel

__all__ = ["write_tiled_tiff", "write_mask_pyramid", "mask_to_geojson", "tile_grid"]


def tile_grid(shape: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering ``shape``, row by row (the order TIFF stores tiles in)."""
    return [(top, left) for top in range(0, int(shape[0]), tile) for left in range(0, int(shape[1]), tile)]


def _tile_iter(shape: Sequence[int], tile: int, read_tile: Callable[[int, int], np.ndarray]) -> Iterator[np.ndarray]:
    for top, left in tile_grid(shape, tile):
        yield read_tile(top, left)


def _write_page(writer: tifffile.TiffWriter, shape, tile: int, read_tile, mpp: float | None, **kwargs) -> None:
    resolution = {}
    if mpp:
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    writer.write(_tile_iter(shape, tile, read_tile), shape=tuple(int(v) for v in shape), dtype=np.uint8,
                 tile=(tile, tile), compression="zlib", photometric="minisblack", **resolution, **kwargs)


def write_tiled_tiff(path: str | os.PathLike, shape: Sequence[int], tile: int,
                     read_tile: Callable[[int, int], np.ndarray]) -> None:
    """A single-page tiled uint8 TIFF whose tiles come from ``read_tile(top, left)``, called in storage order."""
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        _write_page(writer, shape, tile, read_tile, None)


def _halve(source: TiffLevel, tile: int) -> Callable[[int, int], np.ndarray]:
    def read_tile(top: int, left: int) -> np.ndarray:
        return source.read(2 * top, 2 * left, 2 * tile, 2 * tile)[::2, ::2, 0]
    return read_tile


def write_mask_pyramid(level0: str | os.PathLike, out: str | os.PathLike, tile: int, mpp: float | None = None,
                       description: dict | None = None, min_size: int | None = None) -> list[tuple[int, int]]:
    """Writes ``out``: the mask of the tiled TIFF ``level0`` followed by halvings (nearest) down to one tile.

    Each reduced level is first written to its own temporary file, built from the level above it by reading
    2 x 2 tiles at a time; the final file is then assembled from those files and moved into place atomically.
    Returns the shapes of the levels.
    """
    out = Path(out)
    work = out.parent / f".{out.name}.levels"
    work.mkdir(parents=True, exist_ok=True)
    min_size = min_size or tile
    level_paths = [Path(level0)]
    try:
        with tifffile.TiffFile(level0) as handle:
            shapes = [tuple(int(v) for v in handle.pages[0].shape[:2])]
        while max(shapes[-1]) > min_size:
            previous = level_paths[-1]
            shape = (math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2))
            path = work / f"level{len(level_paths)}.tif"
            with tifffile.TiffFile(previous) as handle:
                write_tiled_tiff(path, shape, tile, _halve(TiffLevel(handle.pages[0], fill=0), tile))
            level_paths.append(path)
            shapes.append(shape)
        partial = out.parent / f".{out.name}.partial"
        with tifffile.TiffWriter(partial, bigtiff=True) as writer:
            for index, (path, shape) in enumerate(zip(level_paths, shapes)):
                with tifffile.TiffFile(path) as handle:
                    level = TiffLevel(handle.pages[0], fill=0)
                    extra = {"description": json.dumps(description), "metadata": None} if index == 0 and description \
                        else {"metadata": None}
                    _write_page(writer, shape, tile, lambda t, l: level.read(t, l, tile, tile)[..., 0],
                                mpp * 2 ** index if mpp else None, subfiletype=1 if index else 0, **extra)
        os.replace(partial, out)
    finally:
        for path in level_paths[1:]:
            path.unlink(missing_ok=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
    return shapes


def _run_boxes(mask: np.ndarray, top: int, left: int):
    """Shapely boxes of the horizontal runs of ``mask``, in grid coordinates (pixel edges, not centres)."""
    import shapely

    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)
    _, ends = np.nonzero(change == -1)
    if len(rows) == 0:
        return shapely.box([], [], [], [])
    # the same run in consecutive rows becomes one taller box: fewer boxes make the union several times faster
    code = starts * (mask.shape[1] + 2) + ends
    order = np.lexsort((rows, code))
    rows, starts, ends, code = rows[order], starts[order], ends[order], code[order]
    first = np.ones(len(rows), bool)
    first[1:] = (code[1:] != code[:-1]) | (rows[1:] != rows[:-1] + 1)
    heads = np.flatnonzero(first)
    last_rows = np.maximum.reduceat(rows, heads)
    return shapely.box(left + starts[heads], top + rows[heads], left + ends[heads], top + last_rows + 1)


def mask_to_geojson(level0: str | os.PathLike, out: str | os.PathLike, tile: int, scale: float,
                    class_names: Sequence[str], mask_scale: int | None = None, simplify: float = 1.0,
                    min_area: float = 0.0, colors: Sequence[Sequence[int]] | None = None) -> dict[str, int]:
    """Writes the mask of tiled TIFF ``level0`` as a GeoJSON FeatureCollection of QuPath annotations.

    Polygons follow pixel edges, so the pieces of a gland cut by tile borders join exactly: each row of tiles
    is traced, united with the still-open polygons of the row above, and every polygon that does not reach the
    row's lower edge is final and written out. Memory holds one tile and the polygons of one row of tiles.

    Args:
        level0: the full-resolution mask (values are class index x ``mask_scale``).
        out: the ``.geojson`` file; written atomically.
        tile: rows of this many pixels are traced at once.
        scale: multiplies coordinates, from mask pixels to slide level-0 pixels (QuPath's frame).
        class_names: name per class index; index 0 (background) gets no polygons.
        mask_scale: the factor the class indices were stored with (255 for a binary 0/255 mask). Defaults to None (1).
        simplify: Douglas-Peucker tolerance in mask pixels, applied once a polygon is final. Defaults to 1.0.
        min_area: final polygons below this area in mask pixels are left out and counted. Defaults to 0.
        colors: RGB per class for QuPath. Defaults to a fixed palette.

    Returns: the number of polygons written and left out per class name.
    """
    import shapely

    palette = colors or [(0, 0, 0), (40, 200, 90), (230, 160, 20), (60, 120, 230), (220, 60, 60), (150, 80, 200)]
    step = int(mask_scale or 1)
    counts: dict[str, int] = {}
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    with tifffile.TiffFile(level0) as handle:
        level = TiffLevel(handle.pages[0], fill=0)
        height, width = level.shape
        open_geoms: dict[int, list] = {c: [] for c in range(1, len(class_names))}
        first = True
        with open(partial, "w") as stream:
            stream.write('{"type": "FeatureCollection", "features": [\n')

            def emit(geom, cls: int) -> None:
                nonlocal first
                name = class_names[cls]
                for poly in shapely.get_parts(geom):
                    if poly.area < min_area:
                        counts[f"{name} (below min_area)"] = counts.get(f"{name} (below min_area)", 0) + 1
                        continue
                    if simplify > 0:
                        poly = poly.simplify(simplify, preserve_topology=True)
                    poly = shapely.transform(poly, lambda xy: xy * scale)
                    feature = {
                        "type": "Feature",
                        "geometry": shapely.geometry.mapping(poly),
                        "properties": {"objectType": "annotation",
                                       "classification": {"name": name,
                                                          "color": list(palette[cls % len(palette)])}},
                    }
                    stream.write(("" if first else ",\n") + json.dumps(feature))
                    first = False
                    counts[name] = counts.get(name, 0) + 1

            for top in range(0, height, tile):
                bottom = min(top + tile, height)
                pieces = {cls: list(geoms) for cls, geoms in open_geoms.items()}
                for left in range(0, width, tile):
                    block = level.read(top, left, bottom - top, min(tile, width - left))[..., 0]
                    for cls in pieces:
                        boxes = _run_boxes(block == cls * step, top, left)
                        if len(boxes):
                            pieces[cls].append(shapely.union_all(boxes))
                for cls, geoms in pieces.items():
                    open_geoms[cls] = []
                    if not geoms:
                        continue
                    for poly in shapely.get_parts(shapely.union_all(geoms)):
                        if bottom < height and poly.bounds[3] >= bottom:
                            open_geoms[cls].append(poly)  # may continue into the next row of tiles
                        else:
                            emit(poly, cls)
            stream.write("\n]}\n")
    os.replace(partial, out)
    return counts
