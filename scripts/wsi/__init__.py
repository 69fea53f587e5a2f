"""Whole-slide inference: region reads, tissue detection, tile-by-tile segmentation, pyramidal TIFF and GeoJSON."""

from .outputs import mask_to_geojson, tile_grid, write_mask_pyramid, write_tiled_tiff
from .segment import SLIDE_SUFFIXES, SlideSegmenter, list_slides
from .slide import SLIDE_BACKENDS, Slide, TiffLevel, choose_level, open_slide, region_at_scale
from .synthetic import demo_slide, write_synthetic_slide
from .tissue import build_thumbnail, otsu_threshold, saturation, tissue_mask

__all__ = [
    "SLIDE_BACKENDS",
    "SLIDE_SUFFIXES",
    "Slide",
    "SlideSegmenter",
    "TiffLevel",
    "build_thumbnail",
    "choose_level",
    "demo_slide",
    "list_slides",
    "mask_to_geojson",
    "open_slide",
    "otsu_threshold",
    "region_at_scale",
    "saturation",
    "tile_grid",
    "tissue_mask",
    "write_mask_pyramid",
    "write_synthetic_slide",
    "write_tiled_tiff",
]
