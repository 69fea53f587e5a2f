"""The GlaS challenge's object-level metrics: object F1, object Dice and object Hausdorff distance.

Objects are the instances of a mask: its ids when it is an instance map (GlaS annotations), or the connected
components (8-connectivity) of a binary mask. Which reading a data set's masks need is the config key
``instance_labels``; evaluation turns the ground truth into an instance map once (``GlandInstancesd``), so the
metrics below receive instance maps or binary masks. The definitions follow the GlaS 2015 challenge paper
(Sirinukunwattana et al., Medical Image Analysis 2017):

- each segmented object's ground truth is the annotated object it overlaps most; the segmented object is a true
  positive when it covers at least half of that ground-truth object, each ground-truth object counting at most
  once; F1 = 2 TP / (2 TP + FP + FN);
- object Dice = 1/2 [sum_i gamma_i Dice(G_i, S*(G_i)) + sum_j sigma_j Dice(G*(S_j), S_j)], with area weights
  gamma_i = |G_i| / sum |G| and sigma_j = |S_j| / sum |S|, and * the most-overlapping object on the other side
  (none: Dice 0);
- object Hausdorff: the same weighting of Hausdorff distances; an object with no overlapping partner is paired
  with the partner nearest to it in Hausdorff distance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["instances", "object_f1", "object_dice", "object_hausdorff", "gland_object_metrics"]


def instances(mask: np.ndarray, threshold: float = 0, instance_labels: bool = True) -> np.ndarray:
    """Instance labels (0 = background, 1..N = objects) of a 2D mask.

    Args:
        mask: the mask, H x W.
        threshold: foreground is ``mask > threshold`` (config key ``label_threshold``). Defaults to 0.
        instance_labels: True reads a mask holding several foreground values as an instance map and keeps its
            ids (GlaS annotations); a mask with one foreground value (0/255) is split into connected components.
            False always takes the connected components (8-connectivity) of ``mask > threshold``, the right
            reading for grey-level or noisy masks such as EBHI-SEG's (config key ``instance_labels``).
            Defaults to True.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"object metrics need a 2D mask, got shape {mask.shape}")
    foreground = mask > threshold
    if instance_labels and len(np.unique(mask[foreground])) > 1:
        return np.where(foreground, mask, 0).astype(np.int64)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    return labels


class _Objects:
    """The objects of an instance map: areas and boundary points, without one full-image mask per
    object, so that a prediction with thousands of speckles costs a few passes over the pixels."""

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels)
        if labels.size and labels.min() < 0:
            raise ValueError(f"instance ids must be >= 0, got {labels.min()}")
        if labels.size and labels.max() > labels.size:  # sparse, very large ids: a table by id would not fit
            values, inverse = np.unique(labels, return_inverse=True)
            labels = inverse.reshape(labels.shape) + (0 if values[0] == 0 else 1)  # 0 stays background
        counts = np.bincount(labels.ravel())
        ids = np.flatnonzero(counts[1:]) + 1
        if len(ids) and ids[-1] != len(ids):  # ids with gaps (an annotation with objects removed): number 1..n
            table = np.zeros(len(counts), dtype=np.int64)
            table[ids] = np.arange(1, len(ids) + 1)
            labels = table[labels]
            counts = np.bincount(labels.ravel(), minlength=len(ids) + 1)
        self.labels = labels
        self.n = len(ids)
        self.areas = counts[1:self.n + 1]
        self._boundaries: tuple[np.ndarray, np.ndarray] | None = None

    def boundaries(self) -> tuple[np.ndarray, np.ndarray]:
        """Boundary pixels of every object: (P x 2 coordinates grouped by object, n + 1 offsets into them), so
        that object ``i`` (0-based) owns rows ``offsets[i]:offsets[i + 1]``.

        A boundary pixel is an object pixel with an 8-neighbour outside its object (the image border counts as
        outside), as a 3 x 3 erosion defines it; one pass over the image finds them for all objects at once.
        """
        if self._boundaries is None:
            padded = np.pad(self.labels, 1)
            inner = padded[1:-1, 1:-1]
            edge = np.zeros(inner.shape, dtype=bool)
            height, width = inner.shape
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dy or dx:
                        edge |= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] != inner
            edge &= inner > 0
            points = np.argwhere(edge)
            owner = inner[edge]
            order = np.argsort(owner, kind="stable")
            offsets = np.searchsorted(owner[order], np.arange(1, self.n + 2))
            self._boundaries = points[order].astype(np.float64), offsets
        return self._boundaries

    def boundary(self, i: int) -> np.ndarray:
        """Boundary pixel coordinates (K x 2) of object ``i`` (0-based)."""
        points, offsets = self.boundaries()
        return points[offsets[i]:offsets[i + 1]]


def _overlaps(a: _Objects, b: _Objects) -> np.ndarray:
    """Pixel counts of the intersection of every object of ``a`` with every object of ``b`` (a x b).

    One joint histogram of the two label images: objects of one side never overlap each other.
    """
    joint = np.bincount((a.labels.astype(np.int64) * (b.n + 1) + b.labels).ravel(), minlength=(a.n + 1) * (b.n + 1))
    return joint.reshape(a.n + 1, b.n + 1)[1:, 1:]


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[_Objects, _Objects]:
    return _Objects(instances(pred)), _Objects(instances(truth))


def object_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object F1 of a predicted and a ground-truth mask (binary or instance maps)."""
    seg, gt = _pair(pred, truth)
    if seg.n == 0 and gt.n == 0:
        return 1.0
    overlap = _overlaps(seg, gt)
    matched_gt: set[int] = set()
    tp = 0
    for j in range(seg.n if gt.n else 0):
        best = int(overlap[j].argmax())
        if overlap[j, best] > 0 and overlap[j, best] >= 0.5 * gt.areas[best] and best not in matched_gt:
            matched_gt.add(best)
            tp += 1
    fp, fn = seg.n - tp, gt.n - tp
    return 2 * tp / (2 * tp + fp + fn)


def object_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object Dice of a predicted and a ground-truth mask (binary or instance maps)."""
    seg, gt = _pair(pred, truth)
    if seg.n == 0 and gt.n == 0:
        return 1.0
    if seg.n == 0 or gt.n == 0:
        return 0.0
    overlap = _overlaps(gt, seg)
    dice = 2.0 * overlap / (gt.areas[:, None] + seg.areas[None, :])  # Dice of every pair, from the overlaps alone
    best_seg, best_gt = overlap.argmax(1), overlap.argmax(0)
    dice_gt = np.where(overlap.max(1) > 0, dice[np.arange(gt.n), best_seg], 0.0)
    dice_seg = np.where(overlap.max(0) > 0, dice[best_gt, np.arange(seg.n)], 0.0)
    term_gt = float((gt.areas / gt.areas.sum() * dice_gt).sum())
    term_seg = float((seg.areas / seg.areas.sum() * dice_seg).sum())
    return 0.5 * (term_gt + term_seg)


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two boundary point sets, in pixels."""
    d2 = (a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2
    return float(np.sqrt(max(d2.min(1).max(), d2.min(0).max())))


def _nearest_hausdorff(points: np.ndarray, others: _Objects, block: int = 1 << 20) -> float:
    """The smallest Hausdorff distance between one boundary point set and any object of ``others``.

    One distance matrix against every boundary point of ``others`` (in row blocks of at most ``block`` entries),
    reduced object by object, where a loop over the objects would build one small matrix per pair: a speckle that
    touches no gland is compared with all glands, and a missed gland with every speckle.
    """
    targets, offsets = others.boundaries()
    starts = offsets[:-1]
    to_others = np.zeros(others.n)  # per object: the largest distance from a point of the set to that object
    from_others = np.full(len(targets), np.inf)  # per target point: its distance to the set
    rows = max(1, block // len(targets))
    for start in range(0, len(points), rows):
        part = points[start:start + rows]
        d2 = (part[:, None, 0] - targets[None, :, 0]) ** 2 + (part[:, None, 1] - targets[None, :, 1]) ** 2
        to_others = np.maximum(to_others, np.minimum.reduceat(d2, starts, axis=1).max(0))
        from_others = np.minimum(from_others, d2.min(0))
    back = np.maximum.reduceat(from_others, starts)  # per object: the largest distance from it to the set
    return float(np.sqrt(np.maximum(to_others, back).min()))


def object_hausdorff(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object Hausdorff distance in pixels; ``inf`` when exactly one of the masks is empty."""
    seg, gt = _pair(pred, truth)
    if seg.n == 0 and gt.n == 0:
        return 0.0
    if seg.n == 0 or gt.n == 0:
        return float("inf")
    overlap = _overlaps(gt, seg)

    def partner(objects: _Objects, i: int, others: _Objects, counts: np.ndarray) -> float:
        if counts.max() > 0:
            return _hausdorff(objects.boundary(i), others.boundary(int(counts.argmax())))
        return _nearest_hausdorff(objects.boundary(i), others)

    term_gt = sum(gt.areas[i] / gt.areas.sum() * partner(gt, i, seg, overlap[i]) for i in range(gt.n))
    term_seg = sum(seg.areas[j] / seg.areas.sum() * partner(seg, j, gt, overlap[:, j]) for j in range(seg.n))
    return float(0.5 * (term_gt + term_seg))


def gland_object_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The three GlaS object metrics of one image."""
    return {
        "object_f1": object_f1(pred, truth),
        "object_dice": object_dice(pred, truth),
        "object_hausdorff": object_hausdorff(pred, truth),
    }
