"""The GlaS object metrics as a MONAI metric, so that evaluators compute and save them like Dice."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from .gland_objects import object_dice, object_f1, object_hausdorff

__all__ = ["GlandObjectMetric"]


class GlandObjectMetric(CumulativeIterationMetric):
    """One GlaS object metric per image, from predictions and instance (or binary) ground truth.

    ``y_pred`` is one-hot or class indices (B x C x H x W or B x 1 x H x W); its foreground is every class but 0.
    ``y`` is the ground truth as an instance map (B x 1 x H x W), as ``GlandInstancesd`` makes it from the mask
    file by the data set's rule (config key ``instance_labels``), so that touching GlaS glands stay separate
    objects; a binary mask is split into connected components.

    Args:
        name: ``object_f1``, ``object_dice`` or ``object_hausdorff``. Defaults to ``object_f1``.
        reduction: how ``aggregate`` reduces over images. Defaults to ``"mean"``.
    """

    def __init__(self, name: str = "object_f1", reduction: str = "mean"):
        super().__init__()
        if name not in ("object_f1", "object_dice", "object_hausdorff"):
            raise ValueError(f"name='{name}' is not object_f1, object_dice or object_hausdorff.")
        self.name = name
        self.reduction = reduction
        # Only the named metric: evaluate.json has one handler per metric, so computing all three in each handler
        # did the object matching three times over.
        self._metric = {"object_f1": object_f1, "object_dice": object_dice, "object_hausdorff": object_hausdorff}[name]

    @staticmethod
    def _foreground(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].sum(1) > 0 if x.shape[1] > 1 else x[:, 0] > 0

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        pred = self._foreground(y_pred).cpu().numpy()
        truth = (y[:, 0] if y.shape[1] == 1 else y.argmax(1)).cpu().numpy()
        values = [self._metric(p.astype("uint8"), t) for p, t in zip(pred, truth)]
        return torch.tensor(values, dtype=torch.float32)[:, None]

    def aggregate(self, reduction: str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        finite = torch.where(torch.isfinite(data), data, torch.full_like(data, float("nan")))
        value, _ = do_metric_reduction(finite, reduction or self.reduction)
        return value
