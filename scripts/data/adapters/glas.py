"""GlaS (Warwick-QU) in its official layout: ``train_N.bmp`` + ``train_N_anno.bmp``, ``testA_N``, ``testB_N``,
``Grade.csv``. PNG copies in the same layout work too. Annotations are instance maps (one id per gland) or
binary 0/255 masks; any value > 0 is gland.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from scripts.data.datalist import IMAGE_SUFFIXES
from scripts.errors import ConfigError

from .common import Listing, Split, natural_key, report_problems, split_listing, write_split

__all__ = ["glas_datalist", "read_glas_grades", "scan_glas", "glas_listing", "glas_split"]

_NAME = re.compile(r"^(train|testA|testB)_(\d+)$")


def read_glas_grades(root: Path) -> dict[str, str]:
    """``{image name: grade}`` from ``Grade.csv`` (benign / malignant); empty when the file is absent."""
    path = root / "Grade.csv"
    if not path.is_file():
        return {}
    grades = {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader)]
        name_col = header.index("name") if "name" in header else 0
        grade_col = next((i for i, h in enumerate(header) if h.startswith("grade (glas)")), 2)
        for row in reader:
            if len(row) > max(name_col, grade_col):
                grades[row[name_col].strip()] = row[grade_col].strip().lower()
    return grades


def scan_glas(root: Path) -> tuple[dict[str, dict], list[str]]:
    """Images with their annotations by name, and the problems found (images without annotation and the reverse)."""
    files = {p.stem: p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    items, problems = {}, []
    for stem, path in files.items():
        if stem.endswith("_anno") or not _NAME.match(stem):
            continue
        anno = files.get(f"{stem}_anno")
        if anno is None:
            problems.append(f"{path}: no annotation {stem}_anno.* next to it")
            continue
        items[stem] = {"image": str(path), "label": str(anno), "subset": _NAME.match(stem).group(1)}
    for stem, path in files.items():
        if stem.endswith("_anno") and stem[: -len("_anno")] not in files:
            problems.append(f"{path}: annotation without its image")
    return items, problems


def glas_listing(root: str | os.PathLike) -> Listing:
    """The GlaS folder's images: ``train_N`` annotated and grouped by grade (``unknown`` without ``Grade.csv``),
    ``testA_N`` / ``testB_N`` as its test section, each entry tagged with its ``grade`` and ``subset``.

    Raises:
        ConfigError: when the folder does not exist, or listing every image without its annotation and the reverse.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"GlaS folder '{root}' does not exist (--root); point it at the folder with train_N.bmp files.")
    items, problems = scan_glas(root)
    if problems:
        report_problems(f"GlaS folder '{root}'", problems)
    grades = read_glas_grades(root)

    def entry(name: str) -> dict:
        grade = grades.get(name, "unknown")
        return {"image": items[name]["image"], "grade": grade, "subset": items[name]["subset"],
                "label": items[name]["label"], "group": grade}

    names = sorted(items, key=natural_key)
    return Listing([(n, entry(n)) for n in names if items[n]["subset"] == "train"],
                   fixed={"test": [entry(n) for n in names if items[n]["subset"] != "train"]},
                   source={"dataset": "glas", "root": str(root.resolve())})


def glas_split(listing: Listing, out: str | os.PathLike, labeled_ratio: float | None = 0.1,
               labeled_count: int | None = None, validation_ratio: float | None = 0.15,
               validation_count: int | None = None, seed: int = 0) -> Split:
    """GlaS's split of a listing (the arguments of :func:`glas_datalist`): validation held out of the annotated
    images, then the labeled share of the rest, both stratified by grade; ``out`` is not used."""
    sections = split_listing(listing, seed, validation=(validation_ratio, validation_count),
                             labeled=(labeled_ratio, labeled_count))
    return Split(sections, {**listing.source, "seed": seed})


def glas_datalist(root: str | os.PathLike, out: str | os.PathLike, labeled_ratio: float | None = 0.1,
                  labeled_count: int | None = None, validation_ratio: float | None = 0.15,
                  validation_count: int | None = None, seed: int = 0) -> Path:
    """Writes a datalist for GlaS: labeled / unlabeled / validation from the training images, test = testA + testB.

    Validation is a hold-out of the training images (test sets are never used for model selection); the labeled
    share is taken from the remaining training images. Both splits are stratified by grade (benign / malignant)
    when ``Grade.csv`` is present, and depend only on ``seed``.

    Args:
        root: the GlaS folder.
        out: datalist JSON to write; its paths are relative to its folder.
        labeled_ratio: share of the (non-validation) training images that keep their masks. Defaults to 0.1.
        labeled_count: number of labeled images instead of a ratio.
        validation_ratio: share of the training images held out for validation. Defaults to 0.15.
        validation_count: number of validation images instead of a ratio.
        seed: split seed. Defaults to 0.
    """
    listing = glas_listing(root)
    if not listing.annotated:
        raise ConfigError(f"GlaS folder '{Path(root).expanduser()}' holds no train_N images with train_N_anno "
                          "annotations.")
    return write_split(glas_split(listing, out, labeled_ratio, labeled_count, validation_ratio, validation_count, seed),
                       out)
