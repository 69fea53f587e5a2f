"""Metrics the field reports: pixel metrics come from MONAI; the GlaS object metrics are here."""

from .handlers import GlandObjectMetric
from .gland_objects import gland_object_metrics, instances, object_dice, object_f1, object_hausdorff

__all__ = ["GlandObjectMetric", "gland_object_metrics", "instances", "object_dice", "object_f1", "object_hausdorff"]
