"""Checks every file of a datalist before training starts and reports all problems at once.

A run on a broken data set should stop in seconds with a list of what to fix, not fail an hour in on one file.
With ``drop_invalid`` the invalid entries are left out instead, and the run prints how many and which.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from scripts.config import as_bool
from scripts.errors import ConfigError

from .datalist import load_datalist
from .images import read_image

__all__ = ["checked_datalist", "check_entries"]

logger = logging.getLogger(__name__)


def _mask_problem(mask: np.ndarray, path: str, num_classes: int) -> str | None:
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[..., :3]
        if not (mask == mask[..., :1]).all():
            return f"mask {path} is a colour image with differing channels; save one channel of class indices"
        mask = mask[..., 0]
    if num_classes > 2:
        bad = np.unique(mask[mask >= num_classes])
        if bad.size:
            return (f"mask {path} has values {bad[:8].tolist()} outside the class indices 0..{num_classes - 1}; "
                    "fix the mask or set 'num_classes'")
    return None


def check_entries(entries: Sequence[dict], section: str, num_classes: int = 2) -> tuple[list[dict], list[str]]:
    """The entries that are sound, and one line per problem (unreadable file, image mode without an RGB
    conversion, size mismatch, bad mask values)."""
    good, problems = [], []
    for entry in entries:
        image, issue = read_image(entry["image"], rgb=True)
        if issue is None and "label" in entry:
            mask, issue = read_image(entry["label"])
            if issue is None and mask.shape[:2] != image.shape[:2]:
                issue = (f"mask {entry['label']} is {mask.shape[1]}x{mask.shape[0]} but its image {entry['image']} "
                         f"is {image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
            if issue is None:
                issue = _mask_problem(mask, entry["label"], num_classes)
        if issue is None:
            good.append(entry)
        else:
            problems.append(f"[{section}] {issue}")
    return good, problems


def checked_datalist(datalist: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
                     sections: Sequence[str] = ("training", "unlabeled", "validation"), num_classes: int = 2,
                     require_unlabeled: bool = True, drop_invalid: bool = False) -> dict[str, list[dict]]:
    """Loads and checks the given sections of a datalist; returns ``{section: entries}``.

    Problems found: missing files, unreadable, empty, truncated or oversized files (``read_image``), image modes
    without an RGB conversion, masks whose size differs from their image, colour masks, mask values outside the classes, the same image
    listed twice (within or across sections), and an empty unlabeled set when the method needs one.

    Args:
        datalist: datalist JSON (config key ``datalist``).
        dataset_dir: folder relative paths start from (config key ``dataset_dir``).
        sections: sections to load; ``unlabeled`` entries need no label.
        num_classes: number of classes; masks of multi-class tasks must hold indices below it.
        require_unlabeled: whether an empty or missing ``unlabeled`` section is an error (semi-supervised methods).
        drop_invalid: leave invalid entries out (and say which) instead of stopping (config key ``drop_invalid``).

    Raises:
        ConfigError: listing every problem, unless ``drop_invalid``; a missing datalist or section, or an entry
            without ``image`` / ``label``, always stops the run (``load_datalist``).
    """
    loaded: dict[str, list[dict]] = {}
    for section in sections:
        unlabeled = section == "unlabeled"
        try:
            loaded[section] = load_datalist(datalist, dataset_dir, section, require_label=not unlabeled, check_files=False)
        except ConfigError as err:
            if not unlabeled:
                raise
            if require_unlabeled:
                raise ConfigError(
                    f"{err} The method is semi-supervised and needs unlabeled images: add an 'unlabeled' section, or "
                    "set 'method' to 'supervised'."
                ) from err
            loaded[section] = []

    problems: list[str] = []
    seen: dict[str, str] = {}
    for section, entries in loaded.items():
        kept = []
        for entry in entries:
            key = os.path.realpath(entry["image"])
            if key in seen:
                problems.append(f"[{section}] {entry['image']} is listed twice (also in '{seen[key]}')")
                continue
            seen[key] = section
            kept.append(entry)
        good, found = check_entries(kept, section, num_classes)
        problems += found
        loaded[section] = good
    if problems:
        listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        if not as_bool(drop_invalid, "drop_invalid"):
            raise ConfigError(
                f"Datalist '{datalist}' has {len(problems)} invalid entr{'y' if len(problems) == 1 else 'ies'}:\n  "
                f"{listing}\nFix them, or set 'drop_invalid' to true to train without them."
            )
        logger.warning("Dropped %d invalid entries of '%s' ('drop_invalid' is true):\n  %s", len(problems), datalist, listing)
    if require_unlabeled and "unlabeled" in loaded and not loaded["unlabeled"]:
        raise ConfigError(f"Datalist '{datalist}' has no usable unlabeled images; the semi-supervised method needs some.")
    counts = ", ".join(f"{len(v)} {k}" for k, v in loaded.items())
    logger.info("Datalist %s checked: %s", datalist, counts)
    return loaded
