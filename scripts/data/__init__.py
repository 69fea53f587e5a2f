"""Data: the demo data generator, datalist loading and checks, and the transforms the configs use."""

from .datalist import demo_cache_dir, list_images, load_datalist
from .images import RGB_CONVERSIONS, read_image, read_rgb
from .validation import check_entries, checked_datalist
from .synthetic import ensure_demo_dataset, generate_demo_dataset, synthesize_tile
from .views import AddValidMaskd, RandCutMixBoxd, RandStrongAugmentd
from .transforms import IMAGENET_MEAN_255, IMAGENET_STD_255, EnsureRGBd, PrepareLabeld, check_roi_size

__all__ = [
    "demo_cache_dir",
    "load_datalist",
    "checked_datalist",
    "check_entries",
    "list_images",
    "RGB_CONVERSIONS",
    "read_image",
    "read_rgb",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "synthesize_tile",
    "AddValidMaskd",
    "RandCutMixBoxd",
    "RandStrongAugmentd",
    "EnsureRGBd",
    "PrepareLabeld",
    "check_roi_size",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
]
