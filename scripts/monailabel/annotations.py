"""Masks and polygons for MONAI Label clients: gland outlines for QuPath (ASAP XML) and the Digital Slide Archive,
and the labels those clients send back (ASAP XML polygons or mask images) read as masks for training.

Polygon points are (x, y) = (column, row) in the coordinates of the image the client shows, so a slide region's
outlines are shifted by the region's location.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from scripts.errors import ConfigError

__all__ = ["LabelError", "TILE_SUFFIXES", "is_tile", "image_size", "mask_polygons", "read_asap_polygons",
           "rasterise_polygons", "read_label_mask", "annotation_result"]

GLAND_COLOR = (255, 0, 0)
# Caps on a label a client sends as ASAP XML: its file size, polygons and points in all.
MAX_XML_BYTES = 64 * 2**20
MAX_POLYGONS = 100_000
MAX_POINTS = 5_000_000
TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class LabelError(ConfigError):
    """A label a client sent cannot be used; the message names the file and what to do."""


def mask_polygons(mask: np.ndarray, offset: Sequence[int] = (0, 0), min_area: float = 0.0) -> list[list[list[int]]]:
    """Outer outlines of the foreground objects of ``mask`` (H x W, non-zero = gland), as lists of [x, y] points.

    Every connected object gives one polygon (holes are not outlined: glands' lumens belong to the gland).

    Args:
        mask: the predicted mask.
        offset: (x, y) added to every point, e.g. the location of a slide region. Defaults to (0, 0).
        min_area: polygons enclosing fewer pixels are left out (QuPath's ``min_poly_area``). Defaults to 0.
    """
    import cv2  # OpenCV comes with the MONAI Label requirements; the rest of the bundle does not need it

    binary = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    if not binary.any():
        return []
    # A one-pixel border of background lets an object that fills the whole image still have an outline.
    padded = np.pad(binary, 1)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    dx, dy = int(offset[0]) - 1, int(offset[1]) - 1
    polygons = []
    for contour in contours:
        if len(contour) < 3 or cv2.contourArea(contour) < min_area:
            continue
        points = contour.reshape(-1, 2)
        polygons.append([[int(x) + dx, int(y) + dy] for x, y in points])
    return polygons


def read_asap_polygons(path: str | os.PathLike) -> list[tuple[str, list[tuple[float, float]]]]:
    """The (group name, points) of every polygon in an ASAP XML file (what QuPath's MONAI Label plugin sends).

    The file comes from a client: it is parsed with ``defusedxml`` (no entity expansion, no external references),
    and refused above ``MAX_XML_BYTES``, ``MAX_POLYGONS`` polygons or ``MAX_POINTS`` points, or with a coordinate
    that is not a finite number.
    """
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import ParseError, parse

    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise LabelError(f"Label '{path}' cannot be read ({err}).") from err
    if size > MAX_XML_BYTES:
        raise LabelError(f"Label '{path}' is {size} bytes of XML; at most {MAX_XML_BYTES} are read. Split the "
                         "annotation or send a mask image.")
    try:
        root = parse(path).getroot()
    except (ParseError, DefusedXmlException, OSError) as err:
        raise LabelError(f"Label '{path}' is not readable ASAP XML ({err}); export the annotation again.") from err
    polygons, total = [], 0
    for annotation in root.iter("Annotation"):
        points = []
        for coordinate in annotation.iter("Coordinate"):
            try:
                order = int(coordinate.get("Order", len(points)))
                x, y = float(coordinate.get("X")), float(coordinate.get("Y"))
            except (TypeError, ValueError, OverflowError) as err:
                raise LabelError(f"Label '{path}': a Coordinate of annotation '{annotation.get('Name')}' has no "
                                 f"numeric X / Y ({coordinate.attrib}).") from err
            if not (math.isfinite(x) and math.isfinite(y)):
                raise LabelError(f"Label '{path}': a Coordinate of annotation '{annotation.get('Name')}' is not a "
                                 f"finite number ({coordinate.attrib}).")
            points.append((order, x, y))
            total += 1
            if total > MAX_POINTS:
                raise LabelError(f"Label '{path}' has more than {MAX_POINTS} points; simplify the outlines.")
        if len(polygons) >= MAX_POLYGONS:
            raise LabelError(f"Label '{path}' has more than {MAX_POLYGONS} polygons; split the annotation.")
        if len(points) >= 3:
            points.sort()
            name = annotation.get("PartOfGroup") or annotation.get("Name") or "gland"
            polygons.append((name, [(x, y) for _, x, y in points]))
    return polygons


def rasterise_polygons(polygons: Sequence[tuple[str, Sequence[tuple[float, float]]]], height: int, width: int,
                       ignore: Sequence[str] = ("background", "none", "ignore")) -> np.ndarray:
    """A 0 / 1 mask of ``height`` x ``width`` with every polygon filled, except groups named in ``ignore``."""
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    for name, points in polygons:
        if str(name).strip().lower() in ignore:
            continue
        contour = np.round(np.asarray(points, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [contour], 1)
    return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception as err:  # PIL raises many types for damaged files
        raise LabelError(f"Image '{path}' cannot be read ({err}).") from err


def is_tile(path: str | os.PathLike) -> bool:
    """A single-page PNG / JPEG / TIFF / BMP image of at most 8192 x 8192 pixels (slides are not tiles)."""
    if Path(path).suffix.lower() not in TILE_SUFFIXES:
        return False
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) == 1 and image.width * image.height <= 8192 * 8192
    except Exception:
        return False


def read_label_mask(path: str | os.PathLike, height: int, width: int, max_pixels: int | None = None) -> np.ndarray:
    """The 0 / 1 mask of a label file for an image of ``height`` x ``width`` pixels.

    ASAP XML polygons (coordinates relative to the image) are filled; a mask image (PNG / TIFF / BMP, any
    non-zero value is gland) must have the image's size, which is compared from its header before it is decoded.
    Anything else raises ``LabelError`` naming the file.

    Args:
        max_pixels: refuse an image of more pixels than this before reading it. Defaults to None (no cap).
    """
    if max_pixels is not None and height * width > max_pixels:
        raise LabelError(f"The image of label '{path}' is {width} x {height} pixels, more than the {max_pixels} this "
                         "server reads.")
    path = Path(path)
    if path.suffix.lower() == ".xml":
        polygons = read_asap_polygons(path)
        outside = [name for name, points in polygons
                   if any(x < -1 or y < -1 or x > width + 1 or y > height + 1 for x, y in points)]
        if outside:
            raise LabelError(f"Label '{path}' has polygons outside the {width} x {height} image ({len(outside)} of "
                             f"{len(polygons)}); its coordinates must be relative to the image's top-left corner.")
        return rasterise_polygons(polygons, height, width)
    try:
        with Image.open(path) as image:
            if image.size != (width, height):
                raise LabelError(f"Label '{path}' is {image.width} x {image.height} pixels but its image is "
                                 f"{width} x {height}; a mask label must have the image's size.")
            array = np.asarray(image)
            colour = [i for i, band in enumerate(image.getbands()) if band != "A"]  # an alpha band is not the mask
    except LabelError:
        raise
    except Exception as err:
        raise LabelError(f"Label '{path}' cannot be read as an image or ASAP XML ({err}); send a mask image of the "
                         "image's size (non-zero = gland) or QuPath's ASAP XML.") from err
    if array.ndim == 3:
        array = array[..., colour].max(axis=-1)
    if array.shape != (height, width):
        raise LabelError(f"Label '{path}' is {array.shape[1]} x {array.shape[0]} pixels but its image is "
                         f"{width} x {height}; a mask label must have the image's size.")
    return (array > 0).astype(np.uint8)


def annotation_result(polygons: list[list[list[int]]], label: str = "gland") -> dict:
    """One region's outlines in the form MONAI Label's ASAP and DSA writers read."""
    return {"labels": {label: GLAND_COLOR}, "elements": [{"label": label, "contours": polygons}]} if polygons else {
        "labels": {label: GLAND_COLOR}, "elements": []}
