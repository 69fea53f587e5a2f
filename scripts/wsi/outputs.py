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

from scripts.files import atomic_path
from scripts.wsi.slide import TiffLevel

__all__ = ["write_tiled_tiff", "write_mask_pyramid", "mask_to_geojson", "tile_grid"]


def tile_grid(shape: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering ``shape``, row by row (the order TIFF stores tiles in)."""
    return [(top, left) for top in range(0, int(shape[0]), tile) for left in range(0, int(shape[1]), tile)]


def _tile_iter(shape: Sequence[int], tile: int, read_tile: Callable[[int, int], np.ndarray]) -> Iterator[np.ndarray]:
    for top, left in tile_grid(shape, tile):
        yield read_tile(top, left)


def _write_page(writer: tifffile.TiffWriter, shape, tile: int, tiles: Iterator[np.ndarray | bytes],
                mpp: float | None, **kwargs) -> None:
    """One tiled page: ``tiles`` in storage order, arrays, or bytes already encoded as this writes them."""
    resolution = {}
    if mpp:
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    writer.write(tiles, shape=tuple(int(v) for v in shape), dtype=np.uint8,
                 tile=(tile, tile), compression="zlib", photometric="minisblack", **resolution, **kwargs)


def write_tiled_tiff(path: str | os.PathLike, shape: Sequence[int], tile: int,
                     read_tile: Callable[[int, int], np.ndarray]) -> None:
    """A single-page tiled uint8 TIFF whose tiles come from ``read_tile(top, left)``, called in storage order."""
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        _write_page(writer, shape, tile, _tile_iter(shape, tile, read_tile), None)


def _page_tiles(handle: tifffile.TiffFile, tile: int) -> Iterator[np.ndarray | bytes]:
    """The tiles of a file's first page for ``_write_page``: encoded, as stored, when the page is encoded as
    ``_write_page`` encodes (``write_tiled_tiff``'s files), so they are copied without being decoded and compressed
    again; otherwise decoded, one tile at a time."""
    page = handle.pages[0]
    as_written = (page.is_tiled and page.tilewidth == tile and page.tilelength == tile and page.tiledepth == 1
                  and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and page.predictor == 1
                  and page.dtype == np.uint8 and page.samplesperpixel == 1 and page.planarconfig == 1
                  and len(page.dataoffsets) == math.ceil(page.imagelength / tile) * math.ceil(page.imagewidth / tile))
    if not as_written:
        level = TiffLevel(page, fill=0)
        yield from _tile_iter(level.shape, tile, lambda top, left: level.read(top, left, tile, tile)[..., 0])
        return
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        handle.filehandle.seek(offset)
        yield handle.filehandle.read(count)


def _halve(source: TiffLevel, tile: int) -> Callable[[int, int], np.ndarray]:
    def read_tile(top: int, left: int) -> np.ndarray:
        return source.read(2 * top, 2 * left, 2 * tile, 2 * tile)[::2, ::2, 0]
    return read_tile


def write_mask_pyramid(level0: str | os.PathLike, out: str | os.PathLike, tile: int, mpp: float | None = None,
                       description: dict | None = None, min_size: int | None = None) -> list[tuple[int, int]]:
    """Writes ``out``: the mask of the tiled TIFF ``level0`` followed by halvings (nearest) down to one tile.

    Each reduced level is first written to its own temporary file, built from the level above it by reading
    2 x 2 tiles at a time; the final file is then assembled from those files' encoded tiles, copied as they are, and
    moved into place atomically.
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
            level_paths.append(path)  # listed before it is written, so a failure still removes it
            with tifffile.TiffFile(previous) as handle:
                write_tiled_tiff(path, shape, tile, _halve(TiffLevel(handle.pages[0], fill=0), tile))
            shapes.append(shape)
        with atomic_path(out) as partial, tifffile.TiffWriter(partial, bigtiff=True) as writer:
            for index, (path, shape) in enumerate(zip(level_paths, shapes)):
                with tifffile.TiffFile(path) as handle:
                    extra = {"description": json.dumps(description), "metadata": None} if index == 0 and description \
                        else {"metadata": None}
                    _write_page(writer, shape, tile, _page_tiles(handle, tile), mpp * 2 ** index if mpp else None,
                                subfiletype=1 if index else 0, **extra)
    finally:
        for path in level_paths[1:]:
            path.unlink(missing_ok=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
    return shapes


def _pixel_polygons(mask: np.ndarray, top: int, left: int):
    """The pixels of ``mask`` as polygons along pixel edges (not centres), in grid coordinates: one geometry, empty
    when no pixel is set.

    Each horizontal run of pixels is a box (identical runs of consecutive rows make one taller box). The boxes tile
    the mask without overlap, and each box's top and bottom edges also carry the run ends of the row above and
    below, so that boxes sharing an edge share its vertices: a valid coverage, which GEOS unites by cancelling the
    shared edges (``coverage_union_all``), several times faster than a general union of the same boxes and with the
    same result.
    """
    import shapely

    if not mask.any():  # a background tile: most of a slide, and the run search below costs 4 ms a 1024-pixel tile
        return shapely.GeometryCollection()
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)
    _, ends = np.nonzero(change == -1)
    if len(rows) == 0:
        return shapely.GeometryCollection()
    width = mask.shape[1] + 2
    # every run end, sorted by (row, x): the vertices a row puts on the edges it shares with the rows beside it
    ends_by_row = np.sort(np.concatenate([rows * width + starts, rows * width + ends]))
    code = starts * width + ends
    order = np.lexsort((rows, code))
    rows, starts, ends, code = rows[order], starts[order], ends[order], code[order]
    first = np.ones(len(rows), bool)
    first[1:] = (code[1:] != code[:-1]) | (rows[1:] != rows[:-1] + 1)
    heads = np.flatnonzero(first)
    last_rows = np.maximum.reduceat(rows, heads)
    first_rows, starts, ends = rows[heads], starts[heads], ends[heads]
    # run ends of the row above strictly inside (start, end) go on the top edge; of the row below, on the bottom
    top_lo = np.searchsorted(ends_by_row, (first_rows - 1) * width + starts, "right")
    top_count = np.searchsorted(ends_by_row, (first_rows - 1) * width + ends, "left") - top_lo
    bottom_hi = np.searchsorted(ends_by_row, (last_rows + 1) * width + ends, "left")
    bottom_count = bottom_hi - np.searchsorted(ends_by_row, (last_rows + 1) * width + starts, "right")
    # each ring: top-left, the top edge's inner vertices left to right, top-right, bottom-right, the bottom edge's
    # inner vertices right to left, bottom-left
    sizes = 4 + top_count + bottom_count
    ring = np.repeat(np.arange(len(heads)), sizes)
    position = np.arange(len(ring)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    n_top, n_bottom = top_count[ring], bottom_count[ring]
    upper, lower = first_rows[ring], last_rows[ring] + 1
    x = np.where(position <= n_top, starts[ring], ends[ring])  # top-left, then top-right from position n_top + 1
    y = np.where(position <= n_top + 1, upper, lower)
    x = np.where(position == sizes[ring] - 1, starts[ring], x)  # bottom-left
    on_top = (position >= 1) & (position <= n_top)
    x[on_top] = ends_by_row[top_lo[ring[on_top]] + position[on_top] - 1] % width
    on_bottom = (position >= n_top + 3) & (position < n_top + 3 + n_bottom)
    x[on_bottom] = ends_by_row[bottom_hi[ring[on_bottom]] - 1 - (position[on_bottom] - n_top[on_bottom] - 3)] % width
    coords = np.stack([x + left, y + top], axis=1).astype(float)
    return shapely.coverage_union_all(shapely.polygons(shapely.linearrings(coords, indices=ring)))


class _PieceGroups:
    """Polygons traced tile by tile, grouped with union-find as they are found to touch; a group is united once,
    when it is final, so a large object costs one union instead of one per row of tiles it spans."""

    def __init__(self):
        self.pieces: dict[int, object] = {}
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        self._next = 0

    def add(self, geom) -> int:
        index = self._next
        self._next += 1
        self.pieces[index], self.parent[index], self.members[index] = geom, index, [index]
        return index

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            if len(self.members[a]) < len(self.members[b]):
                a, b = b, a
            self.parent[b] = a
            self.members[a].extend(self.members.pop(b))

    def pop_union(self, root: int):
        import shapely

        members = self.members.pop(root)
        geoms = [self.pieces.pop(m) for m in members]
        for m in members:
            del self.parent[m]
        return shapely.union_all(geoms)


def mask_to_geojson(level0: str | os.PathLike, out: str | os.PathLike, tile: int,
                    scale: float | Sequence[float], class_names: Sequence[str], mask_scale: int | None = None,
                    simplify: float = 1.0, min_area: float = 0.0,
                    colors: Sequence[Sequence[int]] | None = None) -> dict[str, int]:
    """Writes the mask of tiled TIFF ``level0`` as a GeoJSON FeatureCollection of QuPath annotations.

    Polygons follow pixel edges, so the pieces of a gland cut by tile borders join exactly. Each tile is traced
    (the coverage union of its pixel runs, ``_pixel_polygons``); a piece that touches a piece of the same row or of
    the row above's lower edge joins its group; a group with no piece on the current row's lower edge is final: it
    is united once, simplified and written out. Memory holds one tile and the pieces of the objects still open.

    Args:
        level0: the full-resolution mask (values are class index x ``mask_scale``).
        out: the ``.geojson`` file; written atomically.
        tile: tile size the mask is read and traced in.
        scale: multiplies coordinates, from mask pixels to slide level-0 pixels (QuPath's frame): one factor, or
            (y, x) factors.
        class_names: name per class index; index 0 (background) gets no polygons.
        mask_scale: the factor the class indices were stored with (255 for a binary 0/255 mask). Defaults to None (1).
        simplify: Douglas-Peucker tolerance in mask pixels, applied once a polygon is final. Defaults to 1.0.
        min_area: final polygons below this area in mask pixels are left out and counted. Defaults to 0.
        colors: RGB per class for QuPath. Defaults to a fixed palette.

    Returns: the number of polygons written and left out per class name.
    """
    import shapely

    palette = colors or [(0, 0, 0), (40, 200, 90), (230, 160, 20), (60, 120, 230), (220, 60, 60), (150, 80, 200)]
    scale_y, scale_x = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
    factors = np.array([scale_x, scale_y])
    step = int(mask_scale or 1)
    counts: dict[str, int] = {}
    out = Path(out)
    with atomic_path(out) as partial:
        with tifffile.TiffFile(level0) as handle, open(partial, "w") as stream:
            level = TiffLevel(handle.pages[0], fill=0)
            height, width = level.shape
            stream.write('{"type": "FeatureCollection", "features": [\n')
            first = True

            def emit(geom, cls: int) -> None:
                nonlocal first
                name = class_names[cls]
                for poly in shapely.get_parts(geom):
                    if poly.area < min_area:
                        counts[f"{name} (below min_area)"] = counts.get(f"{name} (below min_area)", 0) + 1
                        continue
                    if simplify > 0:
                        # from a canonical start vertex and orientation, so the result depends on the shape only
                        poly = shapely.normalize(poly).simplify(simplify, preserve_topology=True)
                    poly = shapely.transform(poly, lambda xy: xy * factors)
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

            classes = range(1, len(class_names))
            groups = {cls: _PieceGroups() for cls in classes}
            frontier: dict[int, list[int]] = {cls: [] for cls in classes}
            for top in range(0, height, tile):
                bottom = min(top + tile, height)
                new: dict[int, list[int]] = {cls: [] for cls in classes}
                for left in range(0, width, tile):
                    block = level.read(top, left, bottom - top, min(tile, width - left))[..., 0]
                    for cls in classes:
                        pieces = _pixel_polygons(block == cls * step, top, left)
                        if not pieces.is_empty:
                            new[cls].extend(groups[cls].add(p) for p in shapely.get_parts(pieces))
                for cls in classes:
                    group, candidates = groups[cls], frontier[cls] + new[cls]
                    if new[cls]:
                        tree = shapely.STRtree([group.pieces[i] for i in candidates])
                        hits = tree.query([group.pieces[i] for i in new[cls]], predicate="intersects")
                        for a, b in zip(*hits):
                            group.join(new[cls][a], candidates[b])
                    frontier[cls] = [i for i in new[cls] if bottom < height and group.pieces[i].bounds[3] >= bottom]
                    still_open = {group.find(i) for i in frontier[cls]}
                    for root in {group.find(i) for i in candidates} - still_open:
                        emit(group.pop_union(root), cls)
            stream.write("\n]}\n")
    return counts
