"""A lab's own data: ``images/`` with same-named masks in ``masks/``, optional ``unlabeled/``; or a CSV of paths."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from scripts.data.datalist import IMAGE_SUFFIXES
from scripts.data.validation import check_entries
from scripts.errors import ConfigError

from .common import (StudyData, link_into_view, natural_key, report_problems, scan_with_adapter, seeded_splits,
                     write_datalist)

__all__ = ["folder_datalist", "csv_datalist", "study_scan", "study_layout"]

SECTIONS = ("training", "unlabeled", "validation", "test")


def _check_files(source: str, groups: dict[str, list[dict]]) -> None:
    """Stops before any datalist is written when a listed image or mask cannot be used, naming every such file.

    A lab's own folders are where truncated, empty, mislabelled or mismatched files turn up; the seeded splits
    depend on the set of files, so they are not silently left out.
    """
    problems = [line for name, entries in groups.items() for line in check_entries(entries, name)[1]]
    if problems:
        listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise ConfigError(f"{source} has {len(problems)} file(s) that cannot be used, so no datalist was written:\n  "
                          f"{listing}\nFix or remove them and run prepare again.")


def _split(labeled: list[dict], unlabeled: list[dict], labeled_ratio, labeled_count, validation_ratio, test_ratio,
           seed) -> dict[str, list[dict]]:
    """Seeded test / validation hold-outs of the labeled entries, then the labeled share of the rest."""
    names = [e["image"] for e in labeled]
    split = seeded_splits(names, ["all"] * len(names), seed, test=(test_ratio, None), validation=(validation_ratio, None),
                          labeled=(labeled_ratio, labeled_count))
    test, validation, chosen, pool = set(split["test"]), set(split["validation"]), set(split["labeled"]), split["pool"]
    by_image = {e["image"]: e for e in labeled}
    return {
        "training": [by_image[n] for n in pool if n in chosen],
        "unlabeled": [{"image": by_image[n]["image"]} for n in pool if n not in chosen] + unlabeled,
        "validation": [by_image[n] for n in names if n in validation],
        "test": [by_image[n] for n in names if n in test],
    }


def folder_datalist(root: str | os.PathLike, out: str | os.PathLike, labeled_ratio: float | None = 1.0,
                    labeled_count: int | None = None, validation_ratio: float = 0.2, test_ratio: float = 0.0,
                    seed: int = 0) -> Path:
    """Datalist from ``root/images`` + ``root/masks`` (masks named like their image, any suffix) and an optional
    ``root/unlabeled``. Validation and test are held out of the masked images; ``labeled_ratio`` below 1 keeps
    only that share of the rest labeled (the others become unlabeled), e.g. to simulate a label budget.
    """
    root = Path(root).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise ConfigError(f"Folder '{root}' needs 'images/' and 'masks/' subfolders (and may have 'unlabeled/').")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    images = sorted((p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
    problems = [f"{p}: no mask named {p.stem}.* in {masks_dir}" for p in images if p.stem not in masks]
    problems += [f"{m}: mask without an image" for s, m in sorted(masks.items()) if s not in {p.stem for p in images}]
    if problems:
        report_problems(f"Folder '{root}'", problems)
    labeled = [{"image": str(p), "label": str(masks[p.stem])} for p in images]
    unlabeled_dir = root / "unlabeled"
    unlabeled = [{"image": str(p)} for p in sorted(unlabeled_dir.iterdir(), key=lambda p: natural_key(p.name))
                 if p.suffix.lower() in IMAGE_SUFFIXES] if unlabeled_dir.is_dir() else []
    _check_files(f"Folder '{root}'", {"images": labeled, "unlabeled": unlabeled})
    sections = _split(labeled, unlabeled, labeled_ratio, labeled_count, validation_ratio, test_ratio, seed)
    return write_datalist(sections, out, extra={"source": {"dataset": "folder", "root": str(root.resolve()), "seed": seed}})


def csv_datalist(csv_path: str | os.PathLike, out: str | os.PathLike, labeled_ratio: float | None = 1.0,
                 labeled_count: int | None = None, validation_ratio: float = 0.2, test_ratio: float = 0.0,
                 seed: int = 0) -> Path:
    """Datalist from a CSV with columns ``image``, optional ``label`` and optional ``split`` (training / unlabeled /
    validation / test). Relative paths start from the CSV's folder. Rows with a ``split`` keep it; the others
    are split like ``folder_datalist`` (rows without a label are unlabeled).
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ConfigError(f"CSV '{csv_path}' does not exist.")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise ConfigError(f"CSV '{csv_path}' needs a header with an 'image' column (and optional 'label', 'split').")
    fixed: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    labeled, unlabeled, problems = [], [], []
    for number, row in enumerate(rows, start=2):
        entry = {"image": str((csv_path.parent / row["image"].strip()).resolve())}
        if row.get("label", "").strip():
            entry["label"] = str((csv_path.parent / row["label"].strip()).resolve())
        split = (row.get("split") or "").strip()
        if split and split not in SECTIONS:
            problems.append(f"line {number}: split '{split}' is not one of {list(SECTIONS)}")
        elif split and split != "unlabeled" and "label" not in entry:
            problems.append(f"line {number}: split '{split}' needs a label")
        elif split:
            fixed[split].append(entry if split != "unlabeled" else {"image": entry["image"]})
        else:
            (labeled if "label" in entry else unlabeled).append(entry)
    if problems:
        report_problems(f"CSV '{csv_path}'", problems)
    _check_files(f"CSV '{csv_path}'", {"csv": labeled + unlabeled + [e for entries in fixed.values() for e in entries]})
    split = _split(labeled, unlabeled, labeled_ratio, labeled_count, validation_ratio, test_ratio, seed) if labeled else {
        s: (unlabeled if s == "unlabeled" else []) for s in SECTIONS}
    sections = {s: split[s] + fixed[s] for s in SECTIONS}
    return write_datalist(sections, out, extra={"source": {"dataset": "csv", "csv": str(csv_path.resolve()), "seed": seed}})


def study_scan(root: Path, test_root: Path | None, scratch: Path, **fixed) -> StudyData:
    """The study's pool of an ``images/`` + ``masks/`` folder (one group); ``unlabeled/`` stays unlabeled; test =
    every annotated image of ``test_root``."""
    return scan_with_adapter(folder_datalist, lambda entry: "all", root, test_root, scratch, **fixed)


def study_layout(view: Path, pool, unlabeled, test, source: StudyData, root: Path) -> None:
    """Lays out the study's images as links in ``images/``, ``masks/`` and ``unlabeled/``."""
    for entry in pool:
        link_into_view(entry["image"], view / "images" / Path(entry["image"]).name)
        link_into_view(entry["label"], view / "masks" / Path(entry["label"]).name)
    for entry in unlabeled:
        link_into_view(entry["image"], view / "unlabeled" / Path(entry["image"]).name)
