"""KPIs 2024 patch task: ``Task1_patch_level/{train,validation,test}/<model>/<case>/img/*_img.jpg`` with
``mask/*_mask.jpg``. Patches are large (2048 x 2048), so each is downsampled or tiled by a configurable rule
into PNGs under an output folder; JPEG masks are thresholded at > 127 and written as 0 / 255.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.errors import ConfigError

from .common import StudyData, link_into_view, natural_key, report_problems, seeded_splits, write_datalist

__all__ = ["kpi_datalist", "kpi_base", "scan_kpi_split", "study_scan", "study_layout"]

logger = logging.getLogger(__name__)

SPLITS = {"train": "training", "validation": "validation", "test": "test"}


def _pieces(image: Image.Image, mask: Image.Image | None, rule: str, factor: int, tile_size: int):
    """Yields (suffix, image, mask) after the rule: one downsampled pair, or the tiles of the full-size pair."""
    if rule == "downsample":
        size = (image.width // factor, image.height // factor)
        yield "", image.resize(size, Image.BILINEAR), None if mask is None else mask.resize(size, Image.NEAREST)
        return
    for top in range(0, image.height - tile_size + 1, tile_size):
        for left in range(0, image.width - tile_size + 1, tile_size):
            box = (left, top, left + tile_size, top + tile_size)
            yield f"_r{top // tile_size}c{left // tile_size}", image.crop(box), None if mask is None else mask.crop(box)


def kpi_base(root: str | os.PathLike) -> Path:
    """The folder holding KPI's ``train`` / ``validation`` / ``test`` splits: ``root/Task1_patch_level`` or ``root``."""
    root = Path(root).expanduser()
    base = root / "Task1_patch_level" if (root / "Task1_patch_level").is_dir() else root
    if not base.is_dir():
        raise ConfigError(f"KPI folder '{root}' does not exist (--root).")
    return base


def scan_kpi_split(base: Path, split: str) -> list[tuple[Path, Path, str, str]]:
    """``(image, mask, disease model, case)`` for every patch of one split
    (``<split>/<model>/<case>/img/*_img.jpg`` with ``mask/*_mask.jpg``), in natural order.

    Raises:
        ConfigError: listing the patches without a mask.
    """
    found, problems = [], []
    for image in sorted((base / split).glob("*/*/img/*_img.jpg"), key=lambda p: natural_key(str(p))):
        mask = image.parent.parent / "mask" / image.name.replace("_img.jpg", "_mask.jpg")
        if not mask.is_file():
            problems.append(f"{image}: no mask {mask.name}")
            continue
        found.append((image, mask, image.parent.parent.parent.name, image.parent.parent.name))
    if problems:
        report_problems(f"KPI folder '{base}'", problems)
    return found


def kpi_datalist(root: str | os.PathLike, out: str | os.PathLike, rule: str = "downsample", factor: int = 4,
                 tile_size: int = 512, labeled_ratio: float | None = 0.1, labeled_count: int | None = None,
                 seed: int = 0, mask_threshold: int = 127) -> Path:
    """Converts KPI patches by ``rule`` and writes a datalist: the official train split gives the labeled (by
    ratio, stratified by disease model) and unlabeled sets, validation and test stay as they are.

    Args:
        root: the folder holding ``Task1_patch_level`` (or that folder itself).
        out: datalist JSON; converted images go to ``<its folder>/kpi_<rule>/``.
        rule: ``downsample`` (by ``factor``) or ``tile`` (``tile_size`` squares, edges that do not fill a tile dropped).
        factor: downsampling factor. Defaults to 4 (2048 -> 512).
        tile_size: tile side for ``tile``. Defaults to 512.
        labeled_ratio / labeled_count: labeled share of the train split (counted in patches, before tiling).
        seed: split seed. Defaults to 0.
        mask_threshold: mask pixels above it are glomerulus. Defaults to 127.
    """
    base = kpi_base(root)
    if rule not in ("downsample", "tile"):
        raise ConfigError(f"rule='{rule}' is not 'downsample' or 'tile'.")
    if (rule == "downsample" and factor < 1) or (rule == "tile" and tile_size < 16):
        raise ConfigError(f"factor={factor} / tile_size={tile_size} are out of range.")
    out = Path(out).expanduser().resolve()
    converted = out.parent / f"kpi_{rule}"
    found: dict[str, list[tuple[str, str, Path, Path]]] = {}
    for split in SPLITS:
        for image, mask, model, _ in scan_kpi_split(base, split):
            found.setdefault(split, []).append((f"{split}/{model}/{image.stem}", model, image, mask))
    if not found.get("train"):
        raise ConfigError(f"KPI folder '{base}' has no train/<model>/<case>/img/*_img.jpg patches.")
    train = found["train"]
    names = [t[0] for t in train]
    labeled = set(seeded_splits(names, [t[1] for t in train], seed, labeled=(labeled_ratio, labeled_count))["labeled"])

    sections: dict[str, list[dict]] = {"training": [], "unlabeled": [], "validation": [], "test": []}
    for split, items in found.items():
        for name, model, image_path, mask_path in items:
            section = SPLITS[split] if split != "train" else ("training" if name in labeled else "unlabeled")
            image = Image.open(image_path).convert("RGB")
            mask = Image.fromarray(((np.asarray(Image.open(mask_path).convert("L")) > mask_threshold) * 255).astype(np.uint8))
            for suffix, img, msk in _pieces(image, mask, rule, factor, tile_size):
                stem = f"{model}_{image_path.stem}{suffix}"
                target = converted / split / "images" / f"{stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                img.save(target)
                entry = {"image": str(target), "model": model}
                if section != "unlabeled":
                    mask_target = converted / split / "masks" / f"{stem}.png"
                    mask_target.parent.mkdir(parents=True, exist_ok=True)
                    msk.save(mask_target)
                    entry["label"] = str(mask_target)
                sections[section].append(entry)
    path = write_datalist(sections, out, extra={"source": {"dataset": "kpi", "root": str(root.resolve()), "rule": rule,
                                                           "factor": factor, "tile_size": tile_size, "seed": seed}})
    logger.info("KPI datalist %s: %s", path, {k: len(v) for k, v in sections.items()})
    return path


def _study_patches(base: Path, split: str) -> list[dict]:
    """Patches of one KPI split, as study entries grouped by disease model."""
    return [{"image": str(image.resolve()), "label": str(mask.resolve()), "model": model, "group": model, "case": case}
            for image, mask, model, case in scan_kpi_split(base, split)]


def study_scan(root: Path, test_root: Path | None, scratch: Path) -> StudyData:
    """The study's KPI pool: train-split patches grouped by disease model; test = ``test_root``'s test split."""
    base = kpi_base(root)
    pool = _study_patches(base, "train")
    if not pool:
        raise ConfigError(f"KPI folder '{base}' has no train/<model>/<case>/img/*_img.jpg patches (--root).")
    test = None
    if test_root is None and (base / "test").is_dir():
        logger.info("[study] %s has an official test split; it is not used. Pass --test_root %s to test on it "
                    "instead of held-out training patches.", base, root)
    if test_root is not None:
        test = _study_patches(kpi_base(test_root), "test")
        if not test:
            raise ConfigError(f"KPI folder '{test_root}' has no test/<model>/<case>/img/*_img.jpg patches "
                              "(--test_root); point it at a KPI folder with its official test split.")
    return StudyData(pool, test=test, extra={"validation_dir": base / "validation"})


def study_layout(view: Path, pool, unlabeled, test, source: StudyData, root: Path) -> None:
    """Lays out the study's patches as links in KPI's split / model / case folders; the test patches go in too,
    since the adapter converts them (``Adapter.test_through_adapter``)."""
    base = view / "Task1_patch_level"
    for split, entries in (("train", pool), ("test", test)):
        for entry in entries:
            folder = base / split / entry["model"] / entry["case"]
            link_into_view(entry["image"], folder / "img" / Path(entry["image"]).name)
            link_into_view(entry["label"], folder / "mask" / Path(entry["label"]).name)
    validation = source.extra["validation_dir"]
    if Path(validation).is_dir():
        link_into_view(str(validation), base / "validation")
