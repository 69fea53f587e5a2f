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

from .common import (StudyData, link_into_view, natural_key, report_problems, scan_with_adapter, seeded_splits,
                     write_datalist)

__all__ = ["EBHI_CLASSES", "EBHI_PRESETS", "ebhi_datalist", "study_scan", "study_layout"]

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
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"EBHI-SEG folder '{root}' does not exist (--root).")
    if preset not in EBHI_PRESETS:
        raise ConfigError(f"preset='{preset}' is not one of {list(EBHI_PRESETS)}.")
    pairs, no_label, problems = [], [], []
    for cls, folder in _class_folders(root, EBHI_PRESETS[preset]).items():
        image_dir, label_dir = folder / "image", folder / "label"
        if not image_dir.is_dir():
            problems.append(f"{image_dir} does not exist")
            continue
        labels = {p.name: p for p in label_dir.iterdir() if p.is_file()} if label_dir.is_dir() else {}
        images = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
        for image in images:
            key = f"{cls}/{image.name}"
            if image.name in labels:
                pairs.append((key, cls, image, labels[image.name]))
            else:
                no_label.append((key, cls, image))
        problems += [f"{labels[n]}: label without an image" for n in sorted(set(labels) - {p.name for p in images})]
    if problems:
        report_problems(f"EBHI-SEG folder '{root}'", problems)
    if not pairs:
        raise ConfigError(f"EBHI-SEG folder '{root}' holds no labeled images for preset '{preset}'.")
    if no_label:
        logger.warning("%d EBHI-SEG image(s) have no label; they go to the unlabeled set: %s", len(no_label),
                       ", ".join(str(p[2]) for p in no_label))
    by_key = {key: (cls, image, label) for key, cls, image, label in pairs}
    names = sorted(by_key, key=natural_key)
    split = seeded_splits(names, [by_key[n][0] for n in names], seed, test=(test_ratio, None),
                          validation=(validation_ratio, None), labeled=(labeled_ratio, labeled_count))
    test, validation, labeled, pool = set(split["test"]), set(split["validation"]), set(split["labeled"]), split["pool"]

    def entry(name: str, with_label: bool = True) -> dict:
        cls, image, label = by_key[name]
        item = {"image": str(image), "class": cls}
        if with_label:
            item["label"] = str(label)
        return item

    sections = {
        "training": [entry(n) for n in pool if n in labeled],
        "unlabeled": [entry(n, False) for n in pool if n not in labeled]
        + [{"image": str(image), "class": cls} for _, cls, image in no_label],
        "validation": [entry(n) for n in names if n in validation],
        "test": [entry(n) for n in names if n in test],
    }
    path = write_datalist(sections, out, extra={"source": {"dataset": preset, "root": str(root.resolve()), "seed": seed,
                                                           "images_without_label": [str(p[2]) for p in no_label]}})
    logger.info("EBHI-SEG datalist %s: %s", path, {k: len(v) for k, v in sections.items()})
    return path


def study_scan(root: Path, test_root: Path | None, scratch: Path, **fixed) -> StudyData:
    """The study's EBHI-SEG pool for one preset (``fixed``): annotated images grouped by class; images without a
    label stay unlabeled; test = every annotated image of ``test_root``."""
    return scan_with_adapter(ebhi_datalist, lambda entry: entry["class"], root, test_root, scratch, **fixed)


def study_layout(view: Path, pool, unlabeled, test, source: StudyData, root: Path) -> None:
    """Lays out the study's EBHI-SEG images as links in class folders (every class folder exists, even emptied)."""
    for entry in list(pool) + list(test) + list(unlabeled):
        (view / Path(entry["image"]).parent.parent.name / "image").mkdir(parents=True, exist_ok=True)
    for entry in pool:
        folder = view / Path(entry["image"]).parent.parent.name
        link_into_view(entry["image"], folder / "image" / Path(entry["image"]).name)
        link_into_view(entry["label"], folder / "label" / Path(entry["label"]).name)
    for entry in unlabeled:
        link_into_view(entry["image"], view / Path(entry["image"]).parent.parent.name / "image" / Path(entry["image"]).name)
