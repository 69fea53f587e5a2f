"""Whole-slide segmentation: tissue detection, tile-by-tile inference, pyramidal TIFF mask and GeoJSON polygons.

For each slide, ``SlideSegmenter``:

1. opens it (``open_slide``) and picks the level and the resize factor for ``level`` or ``mpp``;
2. builds a thumbnail block by block and detects tissue on it (``scripts.wsi.tissue``);
3. walks the output grid tile by tile in storage order; a tile without tissue is background without being read.
   Tissue tiles are segmented with the bundle's sliding window (Gaussian blending, optional flip TTA) laid on
   one grid over the whole slide (``scripts.wsi.windows``), so a window on a tile border is computed once and
   the mask has no tile seams; windows with no tissue under them are left out. On a GPU the next tile's region
   is read on a second thread while this one is segmented.
   With ``shared_windows`` off, or an inferer other than the bundle's, each tile is read with a margin
   (``halo``) of context and segmented on its own with ``inferer``. Tiles stream into a tiled TIFF, so memory
   holds a few tiles, not the slide;
4. turns that mask into a pyramidal TIFF and a GeoJSON of polygons in the slide's level-0 pixel frame (what
   QuPath's File > Import objects reads), and writes a tissue thumbnail and a JSON summary.

A slide whose outputs are complete is skipped unless ``overwrite`` is set; a slide that fails is reported and the
others are still processed, then the run stops with an error naming every failed slide.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.inferers import Inferer
from monai.transforms import NormalizeIntensityd
from PIL import Image
from tqdm import tqdm

from scripts.data.transforms import IMAGENET_MEAN_255, IMAGENET_STD_255
from scripts.config import as_bool
from scripts.errors import ConfigError
from scripts.files import atomic_path, write_text_atomically
from scripts.inference.fused import fold_batch_norms
from scripts.inference.precision import autocast_dtype
from scripts.wsi.outputs import mask_to_geojson, tile_grid, write_mask_pyramid, write_tiled_tiff
from scripts.wsi.slide import choose_level, open_slide, region_at_scale
from scripts.wsi.tissue import build_thumbnail, tissue_mask
from scripts.wsi.windows import SharedWindowTiles, labels_from_logits, window_plan

__all__ = ["SlideSegmenter", "list_slides", "SLIDE_SUFFIXES"]

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def list_slides(slides: str | os.PathLike | Sequence[str]) -> list[str]:
    """A folder (its slide files, sorted), one slide file, or a list of files."""
    if isinstance(slides, (list, tuple)):
        found = [str(s) for s in slides]
    else:
        path = Path(slides)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError(f"No slides ({', '.join(SLIDE_SUFFIXES)}) in folder '{path}' (config key 'slides').")
        elif path.is_file():
            found = [str(path)]
        else:
            raise ConfigError(f"'slides' = '{path}' is neither a slide file nor a folder of slides.")
    by_stem: dict[str, list[str]] = {}
    for slide in found:
        by_stem.setdefault(Path(slide).stem, []).append(slide)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        raise ConfigError("Outputs are named after the slide's file name without its extension, and these slides "
                          f"share one: {clashes}. Rename them or segment them into different 'wsi_output_dir's.")
    return found


class _Inline:
    """``ThreadPoolExecutor``'s ``submit`` run at once, in this thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # raised where the result is asked for, as from a thread
            future.set_exception(err)
        return future


class SlideSegmenter:
    """Segments whole-slide images tile by tile with the bundle's network and inferer.

    Args:
        network: the segmentation network (PyTorch module or ``OnnxSegmenter``); put in eval mode here, and a
            PyTorch one segments with its batch norms folded into its convolutions (``fold_batch_norms``).
        inferer: applied as ``inferer(tile, network)`` to each tile with its margin, e.g. the bundle's
            ``SlidingWindowInferer`` (Gaussian blending) or its ``FlipTTAInferer`` wrapper.
        output_dir: where ``<slide>_mask.tif``, ``<slide>.geojson``, ``<slide>_tissue.png`` and
            ``<slide>_summary.json`` go.
        num_classes: output channels of the network.
        class_names: name per class for the GeoJSON (index 0 is background). Defaults to ``("background", "gland")``.
        level: pyramid level to segment at. Exclusive with ``mpp``. Defaults to None (level 0 when ``mpp`` is None).
        mpp: target microns per pixel; the nearest finer level is read and resized. Defaults to None.
        tile_size: output tile size in pixels (also the TIFF tile size; a multiple of 16). Defaults to 1024.
        halo: context margin read around each tile, in pixels, when tiles are segmented on their own (the shared
            window grid reads what its windows cover). Defaults to 64.
        device: where tiles are segmented. Defaults to CPU.
        amp: run a PyTorch network under autocast (config key ``amp``): on CUDA, and on a CPU that computes bfloat16
            natively (AVX512-BF16 or AMX; elsewhere it is refused, as it would be emulated and slower). Defaults to
            False.
        amp_dtype: autocast dtype (config key ``amp_dtype``); on the CPU only ``"bfloat16"``. Defaults to
            ``"bfloat16"``.
        mask_scale: stored value = class index x ``mask_scale`` (255 makes a binary mask 0/255). Defaults to None (1).
        tissue_detection: skip tiles without tissue. Defaults to True.
        tissue_downsample: thumbnail size relative to the processing grid. Defaults to 16.
        tissue_threshold: saturation cut in [0, 1]; None for Otsu's. Defaults to None.
        min_tissue_fraction: a tile is segmented when at least this fraction of it is tissue. Defaults to 0.01.
        geojson: write polygons. Defaults to True.
        simplify: polygon simplification tolerance in mask pixels. Defaults to 1.0.
        min_object_area: polygons smaller than this (mask pixels) are left out of the GeoJSON and counted. Defaults to 0.
        backend: slide reader, ``"auto"``, ``"openslide"`` or ``"tifffile"``. Defaults to ``"auto"``.
        overwrite: redo slides whose outputs exist. Defaults to False.
        progress: show a progress bar per slide. Defaults to True.
        normalize: the intensity transform of ``inference.json`` (its ``normalize`` key, a dictionary transform on
            ``"image"``, 3 x H x W on the 0..255 scale), so slides are normalised exactly as tiles are. Defaults to
            None: the ImageNet mean / std on the 0..255 scale that ``inference.json`` uses.
        shared_windows: segment tissue tiles on one window grid over the slide (config key
            ``wsi_shared_windows``; needs the bundle's inferer, see ``scripts.wsi.windows``). Defaults to True.
        skip_background_windows: on that grid, leave out windows with no tissue under them (on the tissue
            thumbnail grown by one of its pixels); what no computed window covers is background (config key
            ``wsi_skip_background_windows``; needs tissue detection). Defaults to True.
        read_ahead: read the next tissue tile on a thread while this one is segmented. Defaults to None: on a GPU
            only (on the CPU the network keeps every core busy, and a reader beside it was measured slower).

    Examples::

        segmenter = SlideSegmenter(network, SlidingWindowInferer((224, 224), mode="gaussian"), "out", num_classes=2,
                                   mpp=0.5, mask_scale=255)
        segmenter.run("slides/")
    """

    def __init__(self, network: torch.nn.Module, inferer: Inferer, output_dir: str | os.PathLike,
                 num_classes: int, class_names: Sequence[str] = ("background", "gland"), level: int | None = None,
                 mpp: float | None = None, tile_size: int = 1024, halo: int = 64,
                 device: torch.device | str = "cpu", amp: bool = False, amp_dtype: str = "bfloat16",
                 mask_scale: int | None = None, tissue_detection: bool = True, tissue_downsample: int = 16,
                 tissue_threshold: float | None = None,
                 min_tissue_fraction: float = 0.01, geojson: bool = True, simplify: float = 1.0,
                 min_object_area: float = 0.0, backend: str = "auto", overwrite: bool = False, progress: bool = True,
                 normalize: Callable[[dict], dict] | None = None, shared_windows: bool = True,
                 skip_background_windows: bool = True, read_ahead: bool | None = None):
        if tile_size < 16 or tile_size % 16:
            raise ConfigError(f"'wsi_tile_size' must be a positive multiple of 16 (a TIFF rule), got {tile_size}.")
        if halo < 0:
            raise ConfigError(f"'wsi_halo' must be >= 0, got {halo}.")
        if len(class_names) != num_classes:
            raise ConfigError(f"'class_names' has {len(class_names)} names for {num_classes} classes "
                              f"('num_classes'); give one name per class, background first.")
        if tissue_downsample < 1:
            raise ConfigError(f"'tissue_downsample' must be >= 1, got {tissue_downsample}.")
        if not 0 <= min_tissue_fraction <= 1:
            raise ConfigError(f"'min_tissue_fraction' must be in [0, 1], got {min_tissue_fraction}.")
        if mask_scale is not None and (num_classes - 1) * mask_scale > 255:
            raise ConfigError(f"'mask_scale' {mask_scale} x {num_classes - 1} classes exceeds 255 in a uint8 mask.")
        self.network, self.inferer = network, inferer
        self.output_dir = Path(output_dir)
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.level, self.mpp = level, mpp
        self.tile_size, self.halo = int(tile_size), int(halo)
        self.device = torch.device(device)
        # the dtype a PyTorch network runs in (None: float32); refused on a CPU without native bfloat16
        self.autocast = autocast_dtype(amp, amp_dtype, self.device) \
            if isinstance(network, torch.nn.Module) and self.device.type in ("cuda", "cpu") else None
        self.mask_scale = mask_scale
        tissue_detection, geojson = as_bool(tissue_detection, "tissue_detection"), as_bool(geojson, "wsi_geojson")
        overwrite = as_bool(overwrite, "wsi_overwrite")
        self.tissue_detection, self.tissue_downsample = tissue_detection, int(tissue_downsample)
        self.tissue_threshold, self.min_tissue_fraction = tissue_threshold, min_tissue_fraction
        self.geojson, self.simplify, self.min_object_area = geojson, simplify, min_object_area
        self.backend, self.overwrite, self.progress = backend, overwrite, progress
        if normalize is None:
            normalize = NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN_255, divisor=IMAGENET_STD_255,
                                            channel_wise=True)
        self.normalize = normalize
        shared_windows = as_bool(shared_windows, "wsi_shared_windows")
        self.plan = window_plan(inferer, self.tile_size) if shared_windows else None
        if shared_windows and self.plan is None:
            logger.info("Tiles are segmented one by one with a margin of %d pixels: the inferer is not the bundle's "
                        "sliding window at a scale of 1/n, or a window is larger than a tile.", self.halo)
        self._model = network  # what segments: the network prepared for inference at the start of each slide
        self.skip_background_windows = as_bool(skip_background_windows, "wsi_skip_background_windows")
        self.read_ahead = self.device.type == "cuda" if read_ahead is None else bool(read_ahead)

    def outputs(self, slide_path: str) -> dict[str, Path]:
        stem = Path(slide_path).stem
        names = {"mask": f"{stem}_mask.tif", "tissue": f"{stem}_tissue.png", "summary": f"{stem}_summary.json"}
        if self.geojson:
            names["geojson"] = f"{stem}.geojson"
        return {key: self.output_dir / name for key, name in names.items()}

    def run(self, slides: str | os.PathLike | Sequence[str]) -> list[dict]:
        """Segments every slide; returns their summaries. Raises ``ConfigError`` at the end if any slide failed."""
        paths = list_slides(slides)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summaries, failures = [], []
        for index, path in enumerate(paths, 1):
            logger.info("Slide %d/%d: %s", index, len(paths), path)
            try:
                summaries.append(self.segment(path))
            except Exception as err:  # one damaged slide must not stop a batch; every failure is listed at the end
                failures.append(f"{path}: {type(err).__name__}: {err}")
                logger.error("Slide %s failed (%s: %s); going on with the others.", path, type(err).__name__, err,
                             exc_info=logger.isEnabledFor(logging.DEBUG))
        if failures:
            raise ConfigError(f"{len(failures)} of {len(paths)} slides failed (the others were segmented):\n  "
                              + "\n  ".join(failures))
        return summaries

    def settings(self) -> dict:
        """What decides a slide's outputs (besides the network): a slide done with other settings is redone."""
        return {"level": self.level, "mpp": self.mpp, "tile_size": self.tile_size, "halo": self.halo,
                "classes": self.class_names, "mask_scale": self.mask_scale, "tissue_detection": self.tissue_detection,
                "tissue_downsample": self.tissue_downsample, "tissue_threshold": self.tissue_threshold,
                "min_tissue_fraction": self.min_tissue_fraction, "geojson": self.geojson, "simplify": self.simplify,
                "min_object_area": self.min_object_area, "image_scale": getattr(self.inferer, "scale", 1.0),
                "window_grid": "slide" if self.plan is not None else "tile",
                "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
                "skip_background_windows": self._skips_windows()}

    def _skips_windows(self) -> bool:
        return self.plan is not None and self.tissue_detection and self.skip_background_windows

    def _window_wanted(self, tissue: np.ndarray) -> Callable[[int, int, int, int], bool]:
        """Whether a window's box (processing-grid pixels) has tissue under it, on the thumbnail grown by a pixel."""
        from scipy.ndimage import binary_dilation

        grown, down = binary_dilation(tissue, iterations=1), self.tissue_downsample

        def wanted(top: int, left: int, bottom: int, right: int) -> bool:
            block = grown[max(top, 0) // down:math.ceil(bottom / down), max(left, 0) // down:math.ceil(right / down)]
            return bool(block.any())
        return wanted

    def _done(self, slide_path: str, outputs: dict[str, Path]) -> dict | None:
        """The summary of an earlier run with the same settings whose outputs all exist, else None."""
        if self.overwrite or not all(p.is_file() for p in outputs.values()):
            return None
        summary = json.loads(outputs["summary"].read_text())
        settings = summary.get("settings")
        if isinstance(settings, dict):
            # summaries from before the key was recorded count as float32 (slides done with CUDA's amp are redone)
            settings = {"autocast": None, **settings}
        if settings != self.settings():
            logger.info("Outputs of %s exist but were made with other settings; redoing it.", slide_path)
            return None
        logger.info("Outputs of %s exist in %s; skipped (set 'wsi_overwrite' true to redo it, e.g. after changing "
                    "the model).", slide_path, self.output_dir)
        return summary

    def _normalized(self, region: np.ndarray) -> torch.Tensor:
        """The region as the network's input: a plain float32 tensor. MONAI's transforms return a ``MetaTensor``,
        whose metadata bookkeeping on every operation of the network cost about 18 % of a slide's time at scale 1
        (docs/benchmarks.md)."""
        image = torch.from_numpy(region).permute(2, 0, 1).float()
        normalized = self.normalize({"image": image})["image"]
        normalized = normalized.as_tensor() if hasattr(normalized, "as_tensor") else normalized
        return torch.as_tensor(normalized, dtype=torch.float32)

    @torch.no_grad()
    def _segment_tile(self, region: np.ndarray) -> np.ndarray:
        image = self._normalized(region).to(self.device)[None]
        with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext():
            logits = self.inferer(image, self._model)
        return labels_from_logits(logits[0].float().cpu())

    def _prepare(self) -> None:
        """The network as slides are segmented with it: in eval mode, each batch norm folded into the convolution
        before it (``fold_batch_norms``: a view that shares the network's weights, made again for every slide so a
        reloaded model is followed), and on the CPU in channels-last memory order. Both were measured faster
        (docs/benchmarks.md) and compute the same function."""
        self._model = self.network
        if isinstance(self.network, torch.nn.Module):
            self._model = fold_batch_norms(self.network.eval())
            if self.device.type == "cpu":
                self._model.to(memory_format=torch.channels_last)
        elif hasattr(self.network, "eval"):
            self.network.eval()

    @torch.no_grad()
    def _predict(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of normalised windows, float32 on the CPU."""
        windows = windows.to(self.device)
        if isinstance(self._model, torch.nn.Module) and self.device.type == "cpu":
            windows = windows.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext():
            logits = self._model(windows)
        return logits.float().cpu()

    def _tissue(self, slide, level: int, factor: float, grid: tuple[int, int], png: Path):
        """The tissue mask of the processing grid at 1/``tissue_downsample`` (None without detection), its cut."""
        down = self.tissue_downsample
        shape = (math.ceil(grid[0] / down), math.ceil(grid[1] / down))
        tissue, cut = None, None
        if self.tissue_detection:
            tissue, cut = tissue_mask(build_thumbnail(slide, level, factor, grid, down))
        picture = np.full(shape, 255, np.uint8) if tissue is None else tissue.astype(np.uint8) * 255
        with atomic_path(png) as partial:
            Image.fromarray(picture).save(partial, format="PNG")
        return tissue, cut

    def _has_tissue(self, tissue: np.ndarray | None, top: int, left: int, h: int, w: int) -> bool:
        if tissue is None:
            return True
        down = self.tissue_downsample
        window = tissue[top // down:math.ceil((top + h) / down), left // down:math.ceil((left + w) / down)]
        return window.size > 0 and window.mean() >= max(self.min_tissue_fraction, 1e-9)

    def _write_mask(self, slide, level: int, factor: float, grid: tuple[int, int], tissue, path: Path,
                    name: str) -> dict:
        """Segments the grid tile by tile into the tiled TIFF ``path``; returns tile and class-pixel counts and the
        seconds spent reading (on the reader thread), waiting for reads, and segmenting."""
        tile, halo = self.tile_size, self.halo
        counts = np.zeros(self.num_classes, np.int64)
        corners = tile_grid(grid, tile)
        sizes = {(top, left): (min(tile, grid[0] - top), min(tile, grid[1] - left)) for top, left in corners}
        todo = [(top, left) for top, left in corners if self._has_tissue(tissue, top, left, *sizes[(top, left)])]
        seconds = {"read": 0.0, "read_wait": 0.0, "segment": 0.0}
        shared = None
        if self.plan is not None:
            wanted = self._window_wanted(tissue) if self._skips_windows() and tissue is not None else None
            shared = SharedWindowTiles(self.plan, self._predict, self._read_normalized(slide, level, factor), grid,
                                       tile, {(top // tile, left // tile) for top, left in todo}, self.num_classes,
                                       wanted)

        def read(top: int, left: int):
            start = time.perf_counter()
            if shared is not None:
                region = shared.read_region(top // tile, left // tile)
            else:
                h, w = sizes[(top, left)]
                region = region_at_scale(slide, level, factor, top - halo, left - halo, (h + 2 * halo, w + 2 * halo))
            seconds["read"] += time.perf_counter() - start  # one reader thread: no concurrent update
            return region

        bar = tqdm(total=len(corners), desc=name, unit="tile", disable=not self.progress, file=sys.stderr,
                   mininterval=2.0)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader") if self.read_ahead \
                else _Inline() as reader:
            reads = {}

            def ask(index: int) -> None:
                if index < len(todo):
                    reads[todo[index]] = reader.submit(read, *todo[index])

            ask(0)
            segmented = 0

            def tile_labels(top: int, left: int) -> np.ndarray:
                nonlocal segmented
                out = np.zeros((tile, tile), np.uint8)
                h, w = sizes[(top, left)]
                if (top, left) in reads:
                    start = time.perf_counter()
                    region = reads.pop((top, left)).result()
                    segmented += 1
                    ask(segmented)  # on the CPU this reads the next region now: waited for as well
                    seconds["read_wait"] += time.perf_counter() - start
                    start = time.perf_counter()
                    if shared is not None:
                        labels = shared.segment(top // tile, left // tile, region)
                    else:
                        labels = self._segment_tile(region)[halo:halo + h, halo:halo + w]
                    seconds["segment"] += time.perf_counter() - start
                    counts[:] += np.bincount(labels.ravel(), minlength=self.num_classes)[:self.num_classes]
                    out[:h, :w] = labels * (self.mask_scale or 1)
                else:
                    counts[0] += h * w
                bar.update(1)
                return out

            try:
                write_tiled_tiff(path, grid, tile, tile_labels)
            finally:
                bar.close()
                for pending in reads.values():
                    pending.cancel()
        return {"tiles": len(corners), "tiles_segmented": segmented,
                "tiles_skipped_background": len(corners) - segmented, "counts": counts,
                "windows": shared.windows_computed if shared is not None else None,
                "windows_skipped_background": shared.windows_skipped if shared is not None else None,
                "seconds": seconds}

    def _read_normalized(self, slide, level: int, factor: float) -> Callable[[int, int, int, int], torch.Tensor]:
        def read(top: int, left: int, height: int, width: int) -> torch.Tensor:
            return self._normalized(region_at_scale(slide, level, factor, top, left, (height, width)))
        return read

    def segment(self, slide_path: str) -> dict:
        """Segments one slide; returns (and writes) its summary."""
        outputs = self.outputs(slide_path)
        earlier = self._done(slide_path, outputs)
        if earlier is not None:
            return earlier
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stale = self.output_dir / f"{Path(slide_path).stem}.geojson"
        if not self.geojson and stale.is_file():
            logger.info("Removing %s from an earlier run: 'wsi_geojson' is off now.", stale)
            stale.unlink()
        self._prepare()
        start = time.perf_counter()
        level0 = self.output_dir / f".{Path(slide_path).stem}_mask.level0.tif"
        with open_slide(slide_path, self.backend) as slide:
            level, factor = choose_level(slide, self.level, self.mpp)
            level_h, level_w = slide.level_shapes[level]
            grid = (max(1, int(level_h / factor)), max(1, int(level_w / factor)))
            tissue, cut = self._tissue(slide, level, factor, grid, outputs["tissue"])
            timing = {"tissue_detection": time.perf_counter() - start}
            try:
                mark = time.perf_counter()
                tiles = self._write_mask(slide, level, factor, grid, tissue, level0, Path(slide_path).name)
                timing["tiles"] = time.perf_counter() - mark
                timing.update(tiles.pop("seconds"))
                mark = time.perf_counter()
                grid_mpp = slide.level_mpp(level) * factor if slide.mpp is not None else None
                scale = tuple(s * factor for s in slide.level_scales[level])  # mask pixel -> level-0 pixel, (y, x)
                description = {"source": str(slide_path), "level": level, "resize_factor": factor,
                               "downsample_from_level0": list(scale), "mpp": grid_mpp, "classes": self.class_names,
                               "mask_scale": self.mask_scale or 1}
                levels = write_mask_pyramid(level0, outputs["mask"], self.tile_size, grid_mpp, description)
                timing["pyramid"] = time.perf_counter() - mark
                polygons, mark = {}, time.perf_counter()
                if self.geojson:
                    polygons = mask_to_geojson(level0, outputs["geojson"], self.tile_size, scale, self.class_names,
                                               self.mask_scale, self.simplify, self.min_object_area)
                timing["geojson"] = time.perf_counter() - mark
            finally:
                level0.unlink(missing_ok=True)
            counts = tiles.pop("counts")
            total = max(int(counts.sum()), 1)
            summary = {
                "slide": str(slide_path),
                "reader": slide.backend,
                "slide_levels": [list(s) for s in slide.level_shapes],
                "slide_mpp": slide.mpp,
                "level": level,
                "resize_factor": factor,
                "mask_shape": list(grid),
                "mask_mpp": grid_mpp,
                "mask_levels": [list(s) for s in levels],
                **tiles,
                "tissue_threshold": cut,
                "class_fractions": {name: round(int(n) / total, 6) for name, n in zip(self.class_names, counts)},
                "polygons": polygons,
                "seconds": round(time.perf_counter() - start, 2),
                # where the seconds went: tissue detection, the tile loop (of which reading on the reader thread,
                # waiting for reads, segmenting; the rest is writing the tiles), the pyramid, the GeoJSON
                "timing": {key: round(value, 3) for key, value in timing.items()},
                "outputs": {key: str(p) for key, p in outputs.items()},
                "settings": self.settings(),
            }
        write_text_atomically(outputs["summary"], json.dumps(summary, indent=2))
        logger.info("%s: %d of %d tiles segmented (%d background), %s, %.1f s -> %s", Path(slide_path).name,
                    tiles["tiles_segmented"], tiles["tiles"], tiles["tiles_skipped_background"],
                    polygons or "no polygons", summary["seconds"], outputs["mask"])
        return summary
