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


def _objects(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == i for i in np.unique(labels) if i != 0]


def _overlaps(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Pixel counts of the intersection of every object of ``a`` with every object of ``b``."""
    out = np.zeros((len(a), len(b)), dtype=np.int64)
    for i, obj in enumerate(a):
        for j, other in enumerate(b):
            out[i, j] = np.count_nonzero(obj & other)
    return out


def object_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object F1 of a predicted and a ground-truth mask (binary or instance maps)."""
    seg, gt = _objects(instances(pred)), _objects(instances(truth))
    if not seg and not gt:
        return 1.0
    overlap = _overlaps(seg, gt)
    matched_gt: set[int] = set()
    tp = 0
    for j in range(len(seg)):
        if len(gt) == 0:
            break
        best = int(overlap[j].argmax())
        if overlap[j, best] > 0 and overlap[j, best] >= 0.5 * gt[best].sum() and best not in matched_gt:
            matched_gt.add(best)
            tp += 1
    fp, fn = len(seg) - tp, len(gt) - tp
    return 2 * tp / (2 * tp + fp + fn)


def _dice(a: np.ndarray, b: np.ndarray | None) -> float:
    if b is None:
        return 0.0
    return 2.0 * np.count_nonzero(a & b) / (a.sum() + b.sum())


def object_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object Dice of a predicted and a ground-truth mask (binary or instance maps)."""
    seg, gt = _objects(instances(pred)), _objects(instances(truth))
    if not seg and not gt:
        return 1.0
    if not seg or not gt:
        return 0.0
    overlap = _overlaps(gt, seg)
    gt_area, seg_area = sum(g.sum() for g in gt), sum(s.sum() for s in seg)
    term_gt = sum(g.sum() / gt_area * _dice(g, seg[overlap[i].argmax()] if overlap[i].max() > 0 else None)
                  for i, g in enumerate(gt))
    term_seg = sum(s.sum() / seg_area * _dice(s, gt[overlap[:, j].argmax()] if overlap[:, j].max() > 0 else None)
                   for j, s in enumerate(seg))
    return 0.5 * (term_gt + term_seg)


def _boundary_points(obj: np.ndarray) -> np.ndarray:
    edge = obj & ~ndimage.binary_erosion(obj, structure=np.ones((3, 3), dtype=bool), border_value=0)
    return np.argwhere(edge).astype(np.float64)


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between the boundaries of two objects, in pixels."""
    pa, pb = _boundary_points(a), _boundary_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(max(d.min(1).max(), d.min(0).max()))


def object_hausdorff(pred: np.ndarray, truth: np.ndarray) -> float:
    """GlaS object Hausdorff distance in pixels; ``inf`` when exactly one of the masks is empty."""
    seg, gt = _objects(instances(pred)), _objects(instances(truth))
    if not seg and not gt:
        return 0.0
    if not seg or not gt:
        return float("inf")
    overlap = _overlaps(gt, seg)

    def partner(obj: np.ndarray, others: list[np.ndarray], counts: np.ndarray) -> float:
        if counts.max() > 0:
            return _hausdorff(obj, others[int(counts.argmax())])
        return min(_hausdorff(obj, other) for other in others)

    gt_area, seg_area = sum(g.sum() for g in gt), sum(s.sum() for s in seg)
    term_gt = sum(g.sum() / gt_area * partner(g, seg, overlap[i]) for i, g in enumerate(gt))
    term_seg = sum(s.sum() / seg_area * partner(s, gt, overlap[:, j]) for j, s in enumerate(seg))
    return 0.5 * (term_gt + term_seg)


def gland_object_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The three GlaS object metrics of one image."""
    return {
        "object_f1": object_f1(pred, truth),
        "object_dice": object_dice(pred, truth),
        "object_hausdorff": object_hausdorff(pred, truth),
    }
