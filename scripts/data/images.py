"""Opening image files: why a file cannot be used, named with what to do, and the one way each PIL mode becomes RGB.

Every entry point that reads images (the datalist check, ``prepare``, inference, the ONNX application) opens them
through ``read_image`` so a broken file gets the same message everywhere, and every image reaches the network
through ``rgb_array`` (by way of ``EnsureRGBd``) so a palette, CMYK or 16-bit file gets the same colours everywhere.
"""

from __future__ import annotations

import errno
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from scripts.errors import ConfigError

__all__ = ["RGB_CONVERSIONS", "PLAIN_MODES", "read_image", "read_rgb", "rgb_array", "rgb_problem", "draw_overlay"]

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# What happens to an image of each PIL mode on its way to the network (docs/data.md, "Image modes"); other modes
# (32-bit integer "I", float "F", ...) have no agreed 0..255 range and are refused.
RGB_CONVERSIONS = {
    "RGB": "used as it is",
    "L": "grey repeated to three channels",
    "1": "black and white read as 0 / 255 grey",
    "RGBA": "alpha channel dropped",
    "LA": "alpha channel dropped, grey repeated to three channels",
    "P": "palette indices replaced by their RGB colours",
    "PA": "palette indices replaced by their RGB colours, alpha dropped",
    "CMYK": "converted to RGB",
    "YCbCr": "converted to RGB",
    **{mode: "16-bit grey scaled to 0..255 (divided by 257), repeated to three channels" for mode in SIXTEEN_BIT_MODES},
}

# Modes whose stored values already are grey or RGB on the 0..255 scale (plus alpha); the others are re-read.
PLAIN_MODES = ("RGB", "RGBA", "L", "LA")


def rgb_problem(mode: str) -> str | None:
    """None when images of PIL ``mode`` can be made RGB, else what is wrong and what to do."""
    if mode in RGB_CONVERSIONS:
        return None
    return (f"has PIL mode '{mode}', which has no defined conversion to 8-bit RGB; save it as 8-bit RGB "
            f"(or grey) PNG or TIFF")


def rgb_array(image: Image.Image, source: str | os.PathLike = "image") -> np.ndarray:
    """``image`` as H x W x 3 uint8 RGB, converted as ``RGB_CONVERSIONS`` says.

    Raises:
        ConfigError: for a mode without a conversion, naming ``source``.
    """
    problem = rgb_problem(image.mode)
    if problem is not None:
        raise ConfigError(f"Image '{source}' {problem}.")
    if image.mode in SIXTEEN_BIT_MODES:  # PIL's own conversion clips at 255 instead of scaling
        grey = np.round(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as H x W x 3 uint8 RGB (``rgb_array``)."""
    with Image.open(path) as handle:
        return rgb_array(handle, path)


def _reason(path: str, err: BaseException) -> str:
    """Why ``path`` could not be opened, in words, with what to do."""
    if isinstance(err, Image.DecompressionBombError):
        return (f"{err} If it is a genuine image, cut it into tiles, or save it as a tiled TIFF and segment it as a "
                "whole slide (docs/wsi.md)")
    if isinstance(err, PermissionError):
        return "permission denied; make the file readable (chmod a+r) or run as a user who may read it"
    if getattr(err, "errno", None) == errno.ELOOP:
        return "it is a symbolic link loop; point the link at the image file or remove it"
    if isinstance(err, IsADirectoryError):
        return "it is a folder, not an image; move it out of the way"
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return "the file is empty (0 bytes); copy the image again or remove it"
    if isinstance(err, UnidentifiedImageError):
        suffix = os.path.splitext(path)[1] or "no suffix"
        return (f"it is not an image in a format PIL knows, despite its name ({suffix}); replace it with the image "
                "or remove it")
    return f"the file is truncated or damaged ({err}); copy the image again or remove it"


def read_image(path: str | os.PathLike, rgb: bool = False) -> tuple[np.ndarray | None, str | None]:
    """The pixels of ``path`` as stored, or None and a line naming the file, what is wrong and what to do.

    Args:
        path: the image or mask file.
        rgb: also refuse modes that cannot be made RGB (for images; masks are read as they are). Defaults to False.
    """
    path = str(path)
    try:
        with Image.open(path) as handle:
            handle.load()
            problem = rgb_problem(handle.mode) if rgb else None
            if problem is not None:
                return None, f"image {path} {problem}"
            return np.asarray(handle), None
    except FileNotFoundError:
        return None, f"{path} not found"
    # PIL's format plugins fail with many types (OSError, SyntaxError, struct.error, EOFError, DecompressionBombError)
    except Exception as err:
        return None, f"cannot read {path}: {_reason(path, err)}"


PRED_COLOUR, TRUTH_COLOUR = (0, 255, 0), (255, 255, 0)


def _contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def draw_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, width: int = 2) -> np.ndarray:
    """The RGB image with the prediction's contours in green and the ground truth's in yellow (evaluation reports,
    TensorBoard and folder inference draw the same overlay)."""
    out = np.array(image[..., :3], dtype=np.uint8, copy=True)
    if truth is not None:
        out[_contour(truth > 0, width)] = TRUTH_COLOUR
    out[_contour(pred > 0, width)] = PRED_COLOUR
    return out
