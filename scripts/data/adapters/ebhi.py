"""EBHI-SEG: six class folders, each with ``image/`` and ``label/`` holding the same file names.

Labels are 8-bit and not clean, so training thresholds them at > 127 (the ``ebhi_*`` data-set presets set
``label_threshold: 127``). Images without a label are reported and go to the unlabeled set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from scripts.data.datalist import IMAGE_SUFFIXES
from scripts.errors import ConfigError

from .common import Listing, Split, natural_key, report_problems, split_listing, write_split

__all__ = ["EBHI_CLASSES", "EBHI_PRESETS", "ebhi_datalist", "ebhi_listing", "ebhi_split"]

logger = logging.getLogger(__name__)

EBHI_CLASSES = ("Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma", "Adenocarcinoma")
EBHI_PRESETS = {
    "ebhi_gland": ("Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma"),
    "ebhi_cancer": ("Adenocarcinoma",),
}


def _normal(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


def _class_folders(root: Path, wanted: tuple[str, ...]) -> dict[str, Path]:
    present = {_normal(p.name): p for p in root.iterdir() if p.is_dir()}
    missing = [c for c in wanted if _normal(c) not in present]
    if missing:
        raise ConfigError(
            f"EBHI-SEG folder '{root}' lacks class folder(s) {missing}; found {sorted(p.name for p in present.values())}."
        )
    return {c: present[_normal(c)] for c in wanted}


def ebhi_listing(root: str | os.PathLike, preset: str = "ebhi_gland") -> Listing:
    """The images of ``preset``'s class folders: those with a label annotated and grouped by class, the others
    unlabeled (and named in a warning); every entry tagged with its ``class``.

    Raises:
        ConfigError: when the folder, the preset or one of its class folders is missing, or listing every
            ``image/`` folder that does not exist and every label without an image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"EBHI-SEG folder '{root}' does not exist (--root).")
    if preset not in EBHI_PRESETS:
        raise ConfigError(f"preset='{preset}' is not one of {list(EBHI_PRESETS)}.")
    annotated, no_label, problems = [], [], []
    for cls, folder in _class_folders(root, EBHI_PRESETS[preset]).items():
        image_dir, label_dir = folder / "image", folder / "label"
        if not image_dir.is_dir():
            problems.append(f"{image_dir} does not exist")
            continue
        labels = {p.name: p for p in label_dir.iterdir() if p.is_file()} if label_dir.is_dir() else {}
        images = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
        for image in images:
            if image.name in labels:
                entry = {"image": str(image), "class": cls, "label": str(labels[image.name]), "group": cls}
                annotated.append((f"{cls}/{image.name}", entry))
            else:
                no_label.append({"image": str(image), "class": cls})
        problems += [f"{labels[n]}: label without an image" for n in sorted(set(labels) - {p.name for p in images})]
    if problems:
        report_problems(f"EBHI-SEG folder '{root}'", problems)
    if no_label:
        logger.warning("%d EBHI-SEG image(s) have no label; they go to the unlabeled set: %s", len(no_label),
                       ", ".join(e["image"] for e in no_label))
    return Listing(sorted(annotated, key=lambda item: natural_key(item[0])), no_label,
                   source={"dataset": preset, "root": str(root.resolve())})


def ebhi_split(listing: Listing, out: str | os.PathLike, labeled_ratio: float | None = 0.1,
               labeled_count: int | None = None, validation_ratio: float = 0.1, test_ratio: float = 0.2,
               seed: int = 0) -> Split:
    """EBHI-SEG's split of a listing (the arguments of :func:`ebhi_datalist`): test, validation, then the labeled
    share of the rest, stratified by class; ``out`` is not used."""
    sections = split_listing(listing, seed, test=(test_ratio, None), validation=(validation_ratio, None),
                             labeled=(labeled_ratio, labeled_count))
    return Split(sections, {**listing.source, "seed": seed,
                            "images_without_label": [e["image"] for e in listing.unlabeled]})


def ebhi_datalist(root: str | os.PathLike, out: str | os.PathLike, preset: str = "ebhi_gland",
                  labeled_ratio: float | None = 0.1, labeled_count: int | None = None,
                  validation_ratio: float = 0.1, test_ratio: float = 0.2, seed: int = 0) -> Path:
    """Writes an EBHI-SEG datalist for ``preset`` (``ebhi_gland``: the five non-cancer classes; ``ebhi_cancer``:
    Adenocarcinoma). Test, validation and labeled splits are stratified by class and depend only on ``seed``.

    Args:
        root: the EBHI-SEG folder with the class folders.
        out: datalist JSON to write.
        preset: ``ebhi_gland`` or ``ebhi_cancer``. Defaults to ``ebhi_gland``.
        labeled_ratio / labeled_count: labeled share of what remains after test and validation. Defaults to 0.1.
        validation_ratio: share of labeled images held out for validation. Defaults to 0.1.
        test_ratio: share of labeled images held out for testing. Defaults to 0.2.
        seed: split seed. Defaults to 0.
    """
    listing = ebhi_listing(root, preset)
    if not listing.annotated:
        raise ConfigError(f"EBHI-SEG folder '{Path(root).expanduser()}' holds no labeled images for preset '{preset}'.")
    return write_split(ebhi_split(listing, out, labeled_ratio, labeled_count, validation_ratio, test_ratio, seed), out)
