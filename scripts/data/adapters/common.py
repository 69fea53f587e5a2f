"""What every data-set adapter shares: deterministic stratified splits, writing and reading datalists, and the
study's view of a data set (``StudyData``, links laid out in the adapter's own layout)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from scripts.errors import ConfigError
from scripts.files import write_text_atomically

__all__ = ["natural_key", "split_counts", "stratified_pick", "seeded_splits", "report_problems", "write_datalist",
           "resolve_count", "load_sections", "StudyData", "scan_with_adapter", "link_into_view"]

SECTIONS = ("training", "unlabeled", "validation", "test")


def natural_key(name: str) -> list:
    """Sort key that puts ``train_2`` before ``train_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_count(total: int, ratio: float | None, count: int | None, what: str) -> int:
    """How many of ``total`` items a ratio or an explicit count asks for (at least 1 when asked for any)."""
    if count is not None:
        if not 0 <= count <= total:
            raise ConfigError(f"{what} count {count} is out of range: there are {total} images.")
        return int(count)
    if ratio is None or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"{what} ratio {ratio} must be in [0, 1] (or give a count).")
    return 0 if ratio == 0 else max(1, int(round(ratio * total)))


def split_counts(group_sizes: Sequence[int], n: int) -> list[int]:
    """Spread ``n`` picks over groups in proportion to their sizes (largest remainder, ties to the first group)."""
    total = sum(group_sizes)
    exact = [n * size / total for size in group_sizes]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_pick(names: Sequence[str], groups: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` names drawn without replacement, in proportion to each group's size, reproducibly from ``seed``."""
    by_group: dict[str, list[str]] = {}
    for name, group in zip(names, groups):
        by_group.setdefault(group, []).append(name)
    keys = sorted(by_group)
    counts = split_counts([len(by_group[k]) for k in keys], n)
    rng = np.random.default_rng(seed)
    picked = []
    for key, count in zip(keys, counts):
        members = sorted(by_group[key], key=natural_key)
        picked += [members[i] for i in sorted(rng.permutation(len(members))[:count])]
    return sorted(picked, key=natural_key)


def seeded_splits(names: Sequence[str], groups: Sequence[str], seed: int, *,
                  test: tuple[float | None, int | None] | None = None,
                  validation: tuple[float | None, int | None] | None = None,
                  labeled: tuple[float | None, int | None] = (1.0, None)) -> dict[str, list[str]]:
    """Every adapter's split: stratified hold-outs of ``names`` in a fixed order, each step from the next seed.

    ``test`` (when given) is drawn from all names with ``seed``, then ``validation`` (when given) from the rest
    with the next seed, then the ``labeled`` share of what remains with the next one. Each step is
    ``(ratio, count)``; a count, when not None, wins over the ratio. Picks keep the order they were drawn in;
    ``pool`` is what remains after test and validation, in the order of ``names``.

    Raises:
        ConfigError: when a ratio or count is out of range, or no labeled image is left.
    """
    group_of = dict(zip(names, groups))
    rest, out, step_seed = list(names), {"test": [], "validation": []}, seed
    for what, step in (("test", test), ("validation", validation)):
        if step is None:
            continue
        ratio, count = step
        n = 0 if ratio is None and count is None else resolve_count(len(rest), None if count is not None else ratio,
                                                                   count, what)
        out[what] = stratified_pick(rest, [group_of[name] for name in rest], n, step_seed) if n else []
        taken = set(out[what])
        rest = [name for name in rest if name not in taken]
        step_seed += 1
    ratio, count = labeled
    n = resolve_count(len(rest), None if count is not None else ratio, count, "labeled")
    if n == 0:
        raise ConfigError(f"No labeled training images are left ({len(names)} images, {len(out['test'])} held out for "
                          f"testing, {len(out['validation'])} for validation); raise --labeled_ratio or --labeled_count.")
    out["labeled"] = stratified_pick(rest, [group_of[name] for name in rest], n, step_seed)
    out["pool"] = rest
    return out


def report_problems(what: str, problems: Sequence[str], limit: int = 20) -> None:
    """Stops with one error listing every problem an adapter found in ``what`` (e.g. ``GlaS folder '/data/GlaS'``),
    at most ``limit`` of them by line; does nothing when there are none."""
    if problems:
        shown = "\n  ".join(problems[:limit]) + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")
        raise ConfigError(f"{what} has {len(problems)} problem(s):\n  {shown}")


def write_datalist(sections: dict[str, list[dict]], out: str | os.PathLike, extra: dict | None = None) -> Path:
    """Writes a datalist whose paths are relative to its own folder (the default ``dataset_dir``)."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    content: dict = {}
    for key, entries in sections.items():
        content[key] = [
            {k: (os.path.relpath(v, out.parent) if k in ("image", "label") else v) for k, v in entry.items()}
            for entry in entries
        ]
    if extra:
        content.update(extra)
    write_text_atomically(out, json.dumps(content, indent=2) + "\n")
    return out


def load_sections(path: str | os.PathLike) -> dict[str, list[dict]]:
    """The four sections of a datalist with absolute paths (relative ones start from the datalist's folder)."""
    path = Path(path)
    content = json.loads(path.read_text())
    sections = {}
    for key in SECTIONS:
        entries = []
        for entry in content.get(key, []):
            item = dict(entry)
            for name in ("image", "label"):
                if name in item:
                    item[name] = os.path.normpath(str(path.parent / item[name]))
            entries.append(item)
        sections[key] = entries
    return sections


@dataclass
class StudyData:
    """What the label-efficiency study knows about a data set before splitting it (an adapter's ``study_scan``).

    Args:
        pool: annotated training images (``image``, ``label``, ``group`` and the adapter's fields), absolute paths;
            ``group`` stratifies the test images the study holds out.
        unlabeled: training images without annotation, kept unlabeled in every datalist.
        test: the test entries when they come from ``--test_root`` (or the demo's own section), else None.
        extra: data-set specific paths (the KPI validation folder, the demo's validation section).
    """

    pool: list[dict]
    unlabeled: list[dict] = field(default_factory=list)
    test: list[dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def scan_with_adapter(adapter: Callable, group: Callable[[dict], str], root: Path, test_root: Path | None,
                      scratch: Path, **kwargs) -> StudyData:
    """The study's view of a data set its own adapter lists: the adapter runs with every image labeled and nothing
    held out, so it lists (and checks) the whole set; annotated images form the pool, each with ``group(entry)``,
    unlabeled ones stay unlabeled, and every annotated image of ``test_root`` is the test set."""
    def listed(folder: Path) -> dict[str, list[dict]]:
        return load_sections(adapter(folder, scratch / "scan.json", labeled_ratio=1.0, validation_ratio=0.0, **kwargs))

    def annotated(sections: dict[str, list[dict]]) -> list[dict]:
        return [dict(entry, group=group(entry)) for entry in sections["training"]]

    sections = listed(root)
    test = annotated(listed(test_root)) if test_root is not None else None
    return StudyData(annotated(sections), unlabeled=sections["unlabeled"], test=test)


def link_into_view(target: str, link: Path) -> None:
    """One file of the study's view of a data set: a symbolic link at ``link`` to ``target``."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        raise ConfigError(f"Two images of the data set map to '{link}'; the study cannot tell them apart.")
    link.symlink_to(os.path.realpath(target))
