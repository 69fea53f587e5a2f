"""Metrics the field reports: pixel metrics come from MONAI; the GlaS object metrics and their ground truth are here."""

from .gland_objects import gland_object_metrics, instances, object_dice, object_f1, object_hausdorff
from .handlers import GlandObjectMetric
from .transforms import GlandInstancesd

__all__ = [
    "GlandInstancesd",
    "GlandObjectMetric",
    "gland_object_metrics",
    "instances",
    "object_dice",
    "object_f1",
    "object_hausdorff",
]
