"""A lab's own data: ``images/`` with same-named masks in ``masks/``, optional ``unlabeled/``; or a CSV of paths."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from scripts.data.datalist import IMAGE_SUFFIXES
from scripts.data.validation import check_entries
from scripts.errors import ConfigError

from .common import SECTIONS, Listing, Split, natural_key, report_problems, split_listing, write_split

__all__ = ["folder_datalist", "csv_datalist", "folder_listing", "csv_listing", "folder_split"]


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


def folder_listing(root: str | os.PathLike) -> Listing:
    """The masked images of ``root/images`` (one group) and the images of ``root/unlabeled``, each file checked.

    Raises:
        ConfigError: when ``images/`` or ``masks/`` is missing, listing every image without a mask and the reverse,
            and every file that cannot be used.
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
    return Listing([(e["image"], dict(e, group="all")) for e in labeled], unlabeled,
                   source={"dataset": "folder", "root": str(root.resolve())})


def folder_split(listing: Listing, out: str | os.PathLike, labeled_ratio: float | None = 1.0,
                 labeled_count: int | None = None, validation_ratio: float = 0.2, test_ratio: float = 0.0,
                 seed: int = 0) -> Split:
    """The split of a folder or CSV listing (the arguments of :func:`folder_datalist`): test and validation held
    out of the annotated images, then the labeled share of the rest; ``out`` is not used."""
    sections = split_listing(listing, seed, test=(test_ratio, None), validation=(validation_ratio, None),
                             labeled=(labeled_ratio, labeled_count))
    return Split(sections, {**listing.source, "seed": seed})


def folder_datalist(root: str | os.PathLike, out: str | os.PathLike, labeled_ratio: float | None = 1.0,
                    labeled_count: int | None = None, validation_ratio: float = 0.2, test_ratio: float = 0.0,
                    seed: int = 0) -> Path:
    """Datalist from ``root/images`` + ``root/masks`` (masks named like their image, any suffix) and an optional
    ``root/unlabeled``. Validation and test are held out of the masked images; ``labeled_ratio`` below 1 keeps
    only that share of the rest labeled (the others become unlabeled), e.g. to simulate a label budget.
    """
    return write_split(folder_split(folder_listing(root), out, labeled_ratio, labeled_count, validation_ratio,
                                    test_ratio, seed), out)


def csv_listing(csv_path: str | os.PathLike) -> Listing:
    """The rows of a CSV (columns ``image``, optional ``label`` and ``split``): rows with a ``split`` as fixed
    entries of that section, the others annotated (one group) or unlabeled; every file checked.

    Raises:
        ConfigError: when the CSV is missing or has no ``image`` column, listing every row with an unknown split
            or a split that needs a label, and every file that cannot be used.
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
    return Listing([(e["image"], dict(e, group="all")) for e in labeled], unlabeled, fixed,
                   source={"dataset": "csv", "csv": str(csv_path.resolve())})


def csv_datalist(csv_path: str | os.PathLike, out: str | os.PathLike, labeled_ratio: float | None = 1.0,
                 labeled_count: int | None = None, validation_ratio: float = 0.2, test_ratio: float = 0.0,
                 seed: int = 0) -> Path:
    """Datalist from a CSV with columns ``image``, optional ``label`` and optional ``split`` (training / unlabeled /
    validation / test). Relative paths start from the CSV's folder. Rows with a ``split`` keep it; the others
    are split like ``folder_datalist`` (rows without a label are unlabeled).
    """
    return write_split(folder_split(csv_listing(csv_path), out, labeled_ratio, labeled_count, validation_ratio,
                                    test_ratio, seed), out)
