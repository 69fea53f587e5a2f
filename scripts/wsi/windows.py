"""One window grid for a whole slide: each network window is segmented once, however many tiles it overlaps.

Segmenting each output tile on its own, with a margin of context and a sliding window over tile plus margin,
computes the windows near tile borders two to four times: with the CPU recipe (window 128 at half scale, 1024-pixel
tiles, overlap 0.25) every mask pixel cost about three network windows' worth of work. ``SharedWindowTiles`` lays
the bundle's sliding window on one grid anchored at the slide's origin, in the network's pixels (the processing
grid shrunk by the inferer's ``image_scale``), and segments the tiles in storage order:

- the windows a tile needs that no earlier tile computed are read (one region with a margin, normalised and
  resized as ``ScaledInferer`` does), run through the network in batches (with flip TTA when it is on), weighted
  by the sliding window's importance map, and added to the pending sums of every tissue tile they overlap;
- a tile's sums are then complete; they are divided by their weights, resized back to the processing grid
  (bilinear, with one network pixel of margin so tile borders interpolate as the inside does) and turned into
  labels.

With tissue detection on, a window with no tissue under it (on the tissue thumbnail, grown by one thumbnail pixel)
is not computed at all; pixels that no computed window covers are background.

The result is the bundle's sliding window over the whole slide at once (Gaussian blending across tile borders,
no seams), at the cost of the windows that cover tissue. Memory holds the pending sums of about one row of
tissue tiles (classes + 1 floats per network pixel of a tile and its margin), not the slide.

``window_plan`` reads the grid from the inference config's inferer (``ScaledInferer`` > ``FlipTTAInferer`` >
``SlidingWindowInferer``); another inferer, a scale that is not 1 / n, or a tile smaller than a window gives
None, and the segmenter then runs the inferer on each tile with its margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import SlidingWindowInferer

from scripts.inference.scale import ScaledInferer, rescale_image
from scripts.inference.tta import FlipTTAInferer

__all__ = ["WindowPlan", "window_plan", "SharedWindowTiles", "labels_from_logits"]

# network pixels of context read around a region before resizing it, so that the antialiasing filter sees the
# same neighbours as it would on the whole slide
_READ_MARGIN = 2


@dataclass(frozen=True)
class WindowPlan:
    """The sliding window of the inference config on the network's pixel grid."""

    roi: tuple[int, int]  # window, network pixels
    stride: tuple[int, int]  # distance between window starts (MONAI's int(roi x (1 - overlap)))
    step: int  # processing-grid pixels per network pixel (1 / image_scale)
    flips: tuple[tuple[int, ...], ...]  # flip TTA dims of a B x C x H x W batch; ((),) without TTA
    batch: int  # windows per network call (sw_batch_size)
    importance: torch.Tensor  # roi-sized blending weights (MONAI's importance map)

    @property
    def scale(self) -> float:
        return 1.0 / self.step


def window_plan(inferer, tile_size: int) -> WindowPlan | None:
    """The window grid of ``inferer``, or None when it is not the bundle's inferer or does not fit the tiles."""
    scale, flips, node = 1.0, ((),), inferer
    if isinstance(node, ScaledInferer):
        scale, node = node.scale, node.inferer
    if isinstance(node, FlipTTAInferer):
        flips, node = tuple(tuple(f) for f in node.flips), node.inferer
    if type(node) is not SlidingWindowInferer:
        return None
    step = round(1.0 / scale)
    if step < 1 or abs(step * scale - 1.0) > 1e-9 or tile_size % step:
        return None
    roi = tuple(int(v) for v in np.broadcast_to(np.asarray(node.roi_size), (2,)))
    overlap = np.broadcast_to(np.asarray(node.overlap, dtype=float), (2,))
    if min(roi) < 1 or max(roi) > tile_size // step:
        return None
    stride = tuple(max(int(r * (1 - o)), 1) for r, o in zip(roi, overlap))
    importance = compute_importance_map(roi, mode=node.mode, sigma_scale=node.sigma_scale, device="cpu")
    return WindowPlan(roi, stride, step, flips, max(int(node.sw_batch_size), 1), importance.float())


def labels_from_logits(logits: torch.Tensor) -> np.ndarray:
    """The argmax over classes (dim 0) of C x H x W logits as uint8, the first class on ties, as ``argmax`` gives;
    class by class, which is several times faster than ``argmax`` over a cropped (strided) tensor."""
    best, labels = logits[0], torch.zeros(logits.shape[1:], dtype=torch.uint8)
    for index in range(1, logits.shape[0]):
        better = logits[index] > best
        labels[better] = index
        best = torch.maximum(best, logits[index])
    return labels.numpy()


def _starts(low: int, high: int, roi: int, stride: int) -> range:
    """Indices k >= 0 of the windows [k stride, k stride + roi) that overlap [low, high)."""
    first = max(0, (low - roi) // stride + 1)
    last = (high - 1) // stride
    return range(first, last + 1)


class SharedWindowTiles:
    """Labels of a slide's tissue tiles, segmented on one window grid (see the module's docstring).

    Args:
        plan: the window grid (``window_plan``).
        predict: network logits of a batch of normalised windows (N x 3 x roi), on the CPU as float32.
        read: ``read(top, left, height, width)``: a normalised 3 x H x W float32 region of the processing grid
            (white outside the slide), as ``SlideSegmenter`` reads tiles.
        grid: the processing grid's (height, width).
        tile: the tile size, processing-grid pixels.
        tissue: the (row, column) of every tile that will be segmented; the others get no sums.
        num_classes: the network's output channels.
        wanted: ``wanted(top, left, bottom, right)`` of a window's box on the processing grid: False skips the
            window (no tissue under it). Pixels that no computed window covers are background. Defaults to None
            (every window is computed).
    """

    def __init__(self, plan: WindowPlan, predict: Callable[[torch.Tensor], torch.Tensor],
                 read: Callable[[int, int, int, int], torch.Tensor], grid: tuple[int, int], tile: int,
                 tissue: set[tuple[int, int]], num_classes: int,
                 wanted: Callable[[int, int, int, int], bool] | None = None):
        self.plan, self.predict, self.read, self.wanted = plan, predict, read, wanted
        self.grid, self.tile, self.tissue, self.num_classes = grid, tile, set(tissue), num_classes
        self.tile_net = tile // plan.step
        self._pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._done: set[tuple[int, int]] = set()
        self.windows_computed = 0
        self.windows_skipped = 0

    def margin_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The tile's box on the network grid with one pixel of margin (none above / left of the slide)."""
        step, top, left = self.plan.step, row * self.tile, col * self.tile
        bottom, right = min(top + self.tile, self.grid[0]), min(left + self.tile, self.grid[1])
        return (max(top // step - 1, 0), max(left // step - 1, 0),
                math.ceil(bottom / step) + 1, math.ceil(right / step) + 1)

    def region_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The processing-grid box to read for a tile: every window overlapping its margin box, plus a margin."""
        (ry, rx), (sy, sx), step = self.plan.roi, self.plan.stride, self.plan.step
        y0, x0, y1, x1 = self.margin_box(row, col)
        rows, cols = _starts(y0, y1, ry, sy), _starts(x0, x1, rx, sx)
        top, left = (rows[0] * sy - _READ_MARGIN) * step, (cols[0] * sx - _READ_MARGIN) * step
        bottom = (rows[-1] * sy + ry + _READ_MARGIN) * step
        right = (cols[-1] * sx + rx + _READ_MARGIN) * step
        return top, left, bottom - top, right - left

    def read_region(self, row: int, col: int) -> torch.Tensor:
        """The tile's region at the network's scale (what ``segment`` takes); safe to call on another thread."""
        top, left, height, width = self.region_box(row, col)
        return rescale_image(self.read(top, left, height, width)[None], self.plan.scale)[0]

    def _windows(self, region: torch.Tensor, row: int, col: int) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        (ry, rx), (sy, sx) = self.plan.roi, self.plan.stride
        y0, x0, y1, x1 = self.margin_box(row, col)
        origin_y = _starts(y0, y1, ry, sy)[0] * sy - _READ_MARGIN
        origin_x = _starts(x0, x1, rx, sx)[0] * sx - _READ_MARGIN
        for ky in _starts(y0, y1, ry, sy):
            for kx in _starts(x0, x1, rx, sx):
                if (ky, kx) not in self._done:
                    self._done.add((ky, kx))
                    step = self.plan.step
                    if self.wanted is not None and not self.wanted(ky * sy * step, kx * sx * step,
                                                                   (ky * sy + ry) * step, (kx * sx + rx) * step):
                        self.windows_skipped += 1
                        continue
                    oy, ox = ky * sy - origin_y, kx * sx - origin_x
                    yield (ky * sy, kx * sx), region[:, oy:oy + ry, ox:ox + rx]

    def _run(self, batch: list[tuple[tuple[int, int], torch.Tensor]]) -> None:
        images = torch.stack([image for _, image in batch])
        logits = None
        for dims in self.plan.flips:
            out = self.predict(torch.flip(images, dims) if dims else images)
            out = torch.flip(out, dims) if dims else out
            logits = out if logits is None else logits + out
        logits = logits.float() * (self.plan.importance / len(self.plan.flips))
        self.windows_computed += len(batch)
        for ((wy, wx), _), weighted in zip(batch, logits):
            self._add(wy, wx, weighted)

    def _add(self, wy: int, wx: int, weighted: torch.Tensor) -> None:
        """Adds one weighted window to the sums of every pending tissue tile whose margin box it overlaps."""
        ry, rx = self.plan.roi
        for row in range(max(wy - 1, 0) // self.tile_net, (wy + ry) // self.tile_net + 1):
            for col in range(max(wx - 1, 0) // self.tile_net, (wx + rx) // self.tile_net + 1):
                if (row, col) not in self.tissue:
                    continue
                y0, x0, y1, x1 = self.margin_box(row, col)
                top, left = max(wy, y0), max(wx, x0)
                bottom, right = min(wy + ry, y1), min(wx + rx, x1)
                if top >= bottom or left >= right:
                    continue
                if (row, col) not in self._pending:
                    self._pending[(row, col)] = (torch.zeros(self.num_classes, y1 - y0, x1 - x0),
                                                 torch.zeros(y1 - y0, x1 - x0), y0, x0)
                sums, weights, oy, ox = self._pending[(row, col)]
                sums[:, top - oy:bottom - oy, left - ox:right - ox] += weighted[:, top - wy:bottom - wy,
                                                                                left - wx:right - wx]
                weights[top - oy:bottom - oy, left - ox:right - ox] += self.plan.importance[top - wy:bottom - wy,
                                                                                            left - wx:right - wx]

    def segment(self, row: int, col: int, region: torch.Tensor) -> np.ndarray:
        """The labels (uint8, tile-sized, cropped at the slide's edge) of tissue tile (``row``, ``col``), given its
        region from ``read_region``. Tiles must come in storage order (row by row)."""
        return labels_from_logits(self.logits(row, col, region))

    def logits(self, row: int, col: int, region: torch.Tensor) -> torch.Tensor:
        """The blended logits (classes x tile, cropped at the slide's edge) behind ``segment``'s labels."""
        ry = self.plan.roi[0]
        y0 = self.margin_box(row, col)[0]
        self._done = {(ky, kx) for ky, kx in self._done if ky * self.plan.stride[0] + ry > y0}
        batch = []
        for window in self._windows(region, row, col):
            batch.append(window)
            if len(batch) == self.plan.batch:
                self._run(batch)
                batch = []
        if batch:
            self._run(batch)
        y0, x0, y1, x1 = self.margin_box(row, col)
        empty = (torch.zeros(self.num_classes, y1 - y0, x1 - x0), torch.zeros(y1 - y0, x1 - x0), y0, x0)
        sums, weights, oy, ox = self._pending.pop((row, col), empty)  # no window wanted: all background
        logits = sums / weights.clamp_min(1e-12)
        if self.wanted is not None:  # where no window was computed: background (class 0 wins the tie at 0)
            logits[0][weights == 0] = 1.0
        step = self.plan.step
        if step > 1:
            logits = F.interpolate(logits[None], scale_factor=step, mode="bilinear", align_corners=False)[0]
        top, left = row * self.tile - oy * step, col * self.tile - ox * step
        height = min(self.tile, self.grid[0] - row * self.tile)
        width = min(self.tile, self.grid[1] - col * self.tile)
        return logits[:, top:top + height, left:left + width]
