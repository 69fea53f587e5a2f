"""Gland post-processing of a discrete prediction: small-object removal, hole filling, splitting touching glands.

``postprocess_mask`` works on any integer mask (class indices, or the 0 / 255 masks inference saves), so saved
predictions can be re-processed offline with other settings; ``GlandPostprocessd`` applies it inside the
bundle's configs, after the argmax and before metrics are computed or masks are saved (config keys
``min_object_size``, ``fill_holes``, ``split_touching``). Every foreground value (class) is processed on its own;
0 is background. Objects are 8-connected, as in the object metrics.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.config import as_bool
from scripts.errors import ConfigError

__all__ = ["GlandPostprocessd", "postprocess_mask", "split_touching_objects"]

# The smallest height, in pixels of distance to the background, by which a gland's core must rise above the
# neck that joins it to another before the two are split: boundary wiggles are never split off.
_MIN_DEPTH = 2.0


def _structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim)  # 8-connectivity in 2D


def _check_options(min_object_size: int, fill_holes: bool | str, split_touching: bool | str,
                   split_ratio: float) -> tuple[int, bool, bool, float]:
    if isinstance(min_object_size, bool) or not isinstance(min_object_size, (int, np.integer)) or min_object_size < 0:
        raise ConfigError(
            f"Config key 'min_object_size' is {min_object_size!r}; use a whole number of pixels >= 0 "
            "(0 keeps every object)."
        )
    fill_holes = as_bool(fill_holes, "fill_holes")
    split_touching = as_bool(split_touching, "split_touching")
    if isinstance(split_ratio, bool) or not isinstance(split_ratio, (int, float)) or not 0 < split_ratio < 1:
        raise ConfigError(f"split_ratio is {split_ratio!r}; use a number between 0 and 1 (default 0.5).")
    return int(min_object_size), fill_holes, split_touching, float(split_ratio)


def _remove_small(region: np.ndarray, min_size: int) -> np.ndarray:
    labels, n = ndimage.label(region, structure=_structure(region.ndim))
    if n == 0:
        return region
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def _cores(dist: np.ndarray, split_ratio: float) -> tuple[np.ndarray, list[int]]:
    """The kept cores of one object, given its distance to the background (0 outside the object).

    Returns a map of core ids (0 elsewhere; ids of absorbed cores may remain and must be ignored) and the ids of
    the cores kept at the end.
    """
    structure = _structure(dist.ndim)
    step = 0.5
    levels = np.arange(np.ceil(dist.max() / step) * step, 1.0, -step).tolist() + [1.0]
    markers = np.zeros(dist.shape, dtype=np.int32)
    node_peak: dict[int, float] = {}  # per component of the previous level: its highest distance
    node_seeds: dict[int, list[int]] = {}  # and the cores it holds
    previous = None
    next_seed = 1
    for level in levels:
        labels, n = ndimage.label(dist >= level, structure=structure)
        if n == 0:
            continue
        peaks = np.atleast_1d(ndimage.maximum(dist, labels, index=np.arange(1, n + 1)))
        children: dict[int, list[int]] = {}
        if previous is not None:
            inside = previous > 0
            base = int(previous.max()) + 1
            for code in np.unique(labels[inside].astype(np.int64) * base + previous[inside]).tolist():
                parent, child = divmod(code, base)
                children.setdefault(parent, []).append(child)
        peak_now: dict[int, float] = {}
        seeds_now: dict[int, list[int]] = {}
        growing = np.zeros(n + 1, dtype=np.int32)
        for c in range(1, n + 1):
            kids = children.get(c, [])
            if not kids:
                seeds = [next_seed]
                next_seed += 1
            elif len(kids) == 1:
                seeds = node_seeds[kids[0]]
            else:
                kept = [k for k in kids
                        if level < split_ratio * node_peak[k] and node_peak[k] - level >= _MIN_DEPTH]
                if len(kept) >= 2:
                    seeds = [s for k in kept for s in node_seeds[k]]
                else:
                    source = kept[0] if kept else max(kids, key=lambda k: node_peak[k])
                    seeds = node_seeds[source]
            peak_now[c], seeds_now[c] = float(peaks[c - 1]), seeds
            if len(seeds) == 1:  # a single core grows with its component; kept cores stay as they were
                growing[c] = seeds[0]
        paint = growing[labels]
        markers = np.where(paint > 0, paint, markers)
        previous, node_peak, node_seeds = labels, peak_now, seeds_now
    # the last level (distance >= 1) is the whole object: one component
    return markers, node_seeds.get(1, [])


def split_touching_objects(region: np.ndarray, split_ratio: float = 0.5) -> np.ndarray:
    """Instance map of a binary mask in which glands joined by a narrow neck get separate ids.

    Each object's distance to the background is flooded from its maxima downwards (a component tree of its
    level sets). Where two cores meet, both are kept as separate glands when the neck's level is below
    ``split_ratio`` times the core's own peak and at least 2 pixels below it, for each of the two; otherwise the
    lower core is absorbed. Every pixel of a split object then goes to its nearest kept core.

    Args:
        region: binary mask (H x W).
        split_ratio: how narrow a neck must be, as a fraction of the smaller gland's inner radius, to split
            there. Defaults to 0.5.

    Returns:
        int32 labels, 0 = background, 1..N = objects (touching objects are adjacent, with no gap).
    """
    region = np.asarray(region, dtype=bool)
    roots, _ = ndimage.label(region, structure=_structure(region.ndim))
    out = np.zeros(region.shape, dtype=np.int32)
    next_id = 1
    for root, box in enumerate(ndimage.find_objects(roots), start=1):
        if box is None:
            continue
        obj = np.pad(roots[box] == root, 1)
        markers, seeds = _cores(ndimage.distance_transform_edt(obj), split_ratio)
        inner = (slice(1, -1),) * region.ndim
        obj, markers = obj[inner], markers[inner]
        if len(seeds) < 2:
            out[box][obj] = next_id
            next_id += 1
            continue
        local = np.where(obj & np.isin(markers, seeds), markers, 0)
        _, nearest = ndimage.distance_transform_edt(local == 0, return_indices=True)
        assigned = local[tuple(nearest)]
        lookup = np.zeros(max(seeds) + 1, dtype=np.int32)
        for i, seed in enumerate(seeds):
            lookup[seed] = next_id + i
        out[box][obj] = lookup[assigned[obj]]
        next_id += len(seeds)
    return out


def _separate(labels: np.ndarray) -> np.ndarray:
    """Binary mask of an instance map with a one-pixel gap wherever two objects touch (8-connectivity)."""
    neighbour_max = ndimage.maximum_filter(labels, footprint=_structure(labels.ndim), mode="constant", cval=0)
    return (labels > 0) & (neighbour_max <= labels)


def postprocess_mask(mask: np.ndarray, min_object_size: int = 0, fill_holes: bool = False,
                     split_touching: bool = False, split_ratio: float = 0.5) -> np.ndarray:
    """Post-processes a discrete mask, each foreground value on its own (0 is background).

    Steps, in this order: objects smaller than ``min_object_size`` pixels become background; holes (background
    enclosed by one value's objects) take that value; glands joined by a narrow neck are separated by a
    one-pixel background gap, so that they count as separate objects.

    Args:
        mask: class indices or a saved 0 / 255 mask, H x W (any integer or boolean dtype).
        min_object_size: objects with fewer pixels are removed, counted at the input's resolution (config key
            ``min_object_size``). Defaults to 0 (keep all).
        fill_holes: fill enclosed holes (config key ``fill_holes``; ``"true"`` / ``"false"`` accepted too).
            Defaults to False.
        split_touching: split touching glands (config key ``split_touching``). Defaults to False.
        split_ratio: neck width, as a fraction of the smaller gland's inner radius, below which touching glands
            are split; see ``split_touching_objects``. Defaults to 0.5.

    Returns:
        A new mask of the same shape, dtype and values.
    """
    min_object_size, fill_holes, split_touching, split_ratio = _check_options(
        min_object_size, fill_holes, split_touching, split_ratio)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ConfigError(f"Post-processing needs a 2D mask (H x W), got shape {mask.shape}.")
    out = mask.copy()
    if not (min_object_size > 0 or fill_holes or split_touching):
        return out
    values = [v for v in np.unique(mask).tolist() if v != 0]
    if min_object_size > 0:
        for value in values:
            region = out == value
            out[region & ~_remove_small(region, min_object_size)] = 0
    if fill_holes:
        for value in values:
            region = out == value
            out[ndimage.binary_fill_holes(region) & (out == 0)] = value
    if split_touching:
        for value in values:
            region = out == value
            out[region & ~_separate(split_touching_objects(region, split_ratio))] = 0
    return out


class GlandPostprocessd(MapTransform):
    """Applies ``postprocess_mask`` to discrete predictions, keeping their layout, dtype and metadata.

    The prediction is either one channel of class indices (1 x H x W, after ``AsDiscreted(argmax=True)``) or
    one-hot (C x H x W, after ``to_onehot``); it comes back in the same layout. With every step off it is
    returned as it is.

    Args:
        keys: prediction keys. Defaults to ``"pred"``.
        min_object_size: objects with fewer pixels become background (config key ``min_object_size``).
            Defaults to 0.
        fill_holes: fill enclosed holes (config key ``fill_holes``). Defaults to False.
        split_touching: split glands joined by a narrow neck (config key ``split_touching``). Defaults to False.
        split_ratio: see ``split_touching_objects``. Defaults to 0.5.
        allow_missing_keys: skip absent keys instead of failing. Defaults to False.
    """

    def __init__(self, keys: KeysCollection = "pred", min_object_size: int = 0, fill_holes: bool = False,
                 split_touching: bool = False, split_ratio: float = 0.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_object_size, self.fill_holes, self.split_touching, self.split_ratio = _check_options(
            min_object_size, fill_holes, split_touching, split_ratio)

    @property
    def enabled(self) -> bool:
        """Whether any step is on."""
        return self.min_object_size > 0 or self.fill_holes or self.split_touching

    def _apply(self, pred: torch.Tensor, key: Hashable) -> torch.Tensor:
        if pred.ndim != 3:
            raise ConfigError(
                f"Post-processing of '{key}' needs a C x H x W prediction, got shape {tuple(pred.shape)}."
            )
        channels = pred.shape[0]
        indices = (pred[0] if channels == 1 else pred.argmax(0)).detach().cpu().numpy().astype(np.int64)
        processed = torch.from_numpy(postprocess_mask(indices, self.min_object_size, self.fill_holes,
                                                      self.split_touching, self.split_ratio)).to(pred.device)
        if channels > 1:
            processed = torch.stack([processed == c for c in range(channels)])
        else:
            processed = processed[None]
        out = pred.clone()  # keeps the MetaTensor type and its metadata
        out.copy_(processed.to(pred.dtype))
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            d[key] = self._apply(d[key], key)
        return d
