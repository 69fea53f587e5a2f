"""KPIs 2024 patch task: ``Task1_patch_level/{train,validation,test}/<model>/<case>/img/*_img.jpg`` with
``mask/*_mask.jpg``. Patches are large (2048 x 2048), so each is downsampled or tiled by a configurable rule
into PNGs under an output folder; JPEG masks are thresholded at > 127 and written as 0 / 255.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.errors import ConfigError

from .common import Listing, Split, natural_key, report_problems, split_listing, write_split

__all__ = ["kpi_datalist", "kpi_base", "scan_kpi_split", "kpi_listing", "kpi_split"]

# The KPI split folder each datalist section's patches come from and are converted into.
FOLDERS = {"training": "train", "unlabeled": "train", "validation": "validation", "test": "test"}


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


def kpi_listing(root: str | os.PathLike) -> Listing:
    """KPI's patches: the train split annotated and grouped by disease model, the validation and test splits as
    they are published; every entry tagged with its ``model``."""
    root = Path(root).expanduser()
    base = kpi_base(root)
    patches = {split: [{"image": str(image), "label": str(mask), "model": model, "group": model}
                       for image, mask, model, _ in scan_kpi_split(base, split)]
               for split in ("train", "validation", "test")}
    return Listing([(f"train/{e['model']}/{Path(e['image']).stem}", e) for e in patches["train"]],
                   fixed={"validation": patches["validation"], "test": patches["test"]},
                   source={"dataset": "kpi", "root": str(root.resolve())})


def kpi_split(listing: Listing, out: str | os.PathLike, rule: str = "downsample", factor: int = 4, tile_size: int = 512,
              labeled_ratio: float | None = 0.1, labeled_count: int | None = None, seed: int = 0,
              mask_threshold: int = 127) -> Split:
    """KPI's split of a listing (the arguments of :func:`kpi_datalist`): the labeled share of the annotated
    patches, stratified by disease model; every patch is converted by ``rule`` into ``<out's folder>/kpi_<rule>/``."""
    if rule not in ("downsample", "tile"):
        raise ConfigError(f"rule='{rule}' is not 'downsample' or 'tile'.")
    if (rule == "downsample" and factor < 1) or (rule == "tile" and tile_size < 16):
        raise ConfigError(f"factor={factor} / tile_size={tile_size} are out of range.")
    converted = Path(out).expanduser().resolve().parent / f"kpi_{rule}"
    sections: dict[str, list[dict]] = {}
    for section, entries in split_listing(listing, seed, labeled=(labeled_ratio, labeled_count)).items():
        sections[section] = []
        for entry in entries:
            image_path, folder = Path(entry["image"]), converted / FOLDERS[section]
            image = Image.open(image_path).convert("RGB")
            mask = None
            if "label" in entry:
                mask = Image.fromarray(((np.asarray(Image.open(entry["label"]).convert("L")) > mask_threshold) * 255)
                                       .astype(np.uint8))
            for suffix, img, msk in _pieces(image, mask, rule, factor, tile_size):
                name = f"{entry['model']}_{image_path.stem}{suffix}.png"
                (folder / "images").mkdir(parents=True, exist_ok=True)
                img.save(folder / "images" / name)
                piece = {"image": str(folder / "images" / name), "model": entry["model"]}
                if msk is not None:
                    (folder / "masks").mkdir(parents=True, exist_ok=True)
                    msk.save(folder / "masks" / name)
                    piece["label"] = str(folder / "masks" / name)
                sections[section].append(piece)
    source = {**listing.source, "rule": rule, "factor": factor, "tile_size": tile_size, "seed": seed}
    return Split(sections, source)


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
    listing = kpi_listing(root)
    if not listing.annotated:
        raise ConfigError(f"KPI folder '{kpi_base(root)}' has no train/<model>/<case>/img/*_img.jpg patches.")
    return write_split(kpi_split(listing, out, rule, factor, tile_size, labeled_ratio, labeled_count, seed,
                                 mask_threshold), out)
