"""GlaS (Warwick-QU) in its official layout: ``train_N.bmp`` + ``train_N_anno.bmp``, ``testA_N``, ``testB_N``,
``Grade.csv``. PNG copies in the same layout work too. Annotations are instance maps (one id per gland) or
binary 0/255 masks; any value > 0 is gland.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from scripts.data.datalist import IMAGE_SUFFIXES
from scripts.errors import ConfigError

from .common import StudyData, link_into_view, natural_key, report_problems, seeded_splits, write_datalist

__all__ = ["glas_datalist", "read_glas_grades", "scan_glas", "study_scan", "study_layout"]

logger = logging.getLogger(__name__)

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
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"GlaS folder '{root}' does not exist (--root); point it at the folder with train_N.bmp files.")
    items, problems = scan_glas(root)
    if problems:
        report_problems(f"GlaS folder '{root}'", problems)
    train = sorted((n for n, i in items.items() if i["subset"] == "train"), key=natural_key)
    if not train:
        raise ConfigError(f"GlaS folder '{root}' holds no train_N images with train_N_anno annotations.")
    grades = read_glas_grades(root)
    split = seeded_splits(train, [grades.get(n, "unknown") for n in train], seed,
                          validation=(validation_ratio, validation_count), labeled=(labeled_ratio, labeled_count))
    validation, labeled, pool = split["validation"], split["labeled"], split["pool"]

    def entry(name: str, with_label: bool = True) -> dict:
        item = {"image": items[name]["image"], "grade": grades.get(name, "unknown"), "subset": items[name]["subset"]}
        if with_label:
            item["label"] = items[name]["label"]
        return item

    tests = sorted((n for n, i in items.items() if i["subset"] != "train"), key=natural_key)
    sections = {
        "training": [entry(n) for n in labeled],
        "unlabeled": [entry(n, with_label=False) for n in pool if n not in set(labeled)],
        "validation": [entry(n) for n in validation],
        "test": [entry(n) for n in tests],
    }
    path = write_datalist(sections, out, extra={"source": {"dataset": "glas", "root": str(root.resolve()), "seed": seed}})
    logger.info("GlaS datalist %s: %s", path, {k: len(v) for k, v in sections.items()})
    return path


def _study_files(root: Path) -> list[dict]:
    """GlaS images with their annotations and grades, by the adapter's own file rules."""
    if not root.is_dir():
        raise ConfigError(f"GlaS folder '{root}' does not exist (--root / --test_root).")
    items, problems = scan_glas(root)
    if problems:
        report_problems(f"GlaS folder '{root}'", problems)
    grades = read_glas_grades(root)
    return [{"image": str(Path(i["image"]).resolve()), "label": str(Path(i["label"]).resolve()), "subset": i["subset"],
             "grade": grades.get(name, "unknown"), "group": grades.get(name, "unknown")}
            for name, i in sorted(items.items(), key=lambda kv: natural_key(kv[0]))]


def study_scan(root: Path, test_root: Path | None, scratch: Path) -> StudyData:
    """The study's GlaS pool: the train_N images grouped by grade; test = testA_ / testB_ of ``test_root`` (all
    its annotated images when it has none)."""
    files = _study_files(root)
    pool = [f for f in files if f["subset"] == "train"]
    if not pool:
        raise ConfigError(f"GlaS folder '{root}' holds no train_N images with train_N_anno annotations (--root).")
    test = None
    if test_root is not None:
        candidates = _study_files(test_root)
        test = [f for f in candidates if f["subset"] != "train"] or candidates
    elif len(files) > len(pool):
        logger.info("[study] %s also holds %d testA_ / testB_ images; they are not used. Pass --test_root %s to "
                    "test on them instead of held-out training images.", root, len(files) - len(pool), root)
    return StudyData(pool, test=test)


def study_layout(view: Path, pool, unlabeled, test, source: StudyData, root: Path) -> None:
    """Lays out the study's GlaS images (and Grade.csv) as links in the official flat layout."""
    for entry in pool:
        stem = Path(entry["image"]).stem
        link_into_view(entry["image"], view / Path(entry["image"]).name)
        link_into_view(entry["label"], view / f"{stem}_anno{Path(entry['label']).suffix}")
    if (root / "Grade.csv").is_file():
        link_into_view(str(root / "Grade.csv"), view / "Grade.csv")
