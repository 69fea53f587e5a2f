"""The loss library: every method preset (supervised ... MPAMatch) builds its objective from these functions."""

from .consistency import cutmix_targets, masked_cross_entropy, supervised_loss
from .contrast import prototype_infonce, sample_pixels_per_class

__all__ = ["cutmix_targets", "masked_cross_entropy", "supervised_loss", "prototype_infonce", "sample_pixels_per_class"]
