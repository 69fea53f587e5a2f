"""What every data-set adapter shares: what it lists (``Listing``), the one seeded, stratified split of a listing
that ``prepare`` and the study both use, and writing and reading datalists."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from scripts.errors import ConfigError
from scripts.files import write_text_atomically

__all__ = ["natural_key", "split_counts", "stratified_pick", "seeded_splits", "report_problems", "write_datalist",
           "resolve_count", "load_sections", "Listing", "Split", "split_listing", "write_split"]

logger = logging.getLogger(__name__)

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
    """Writes a datalist whose paths are relative to its own folder (the default ``dataset_dir``); an entry's
    ``group`` (the stratum of the split) is not written."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    content: dict = {}
    for key, entries in sections.items():
        content[key] = [
            {k: (os.path.relpath(v, out.parent) if k in ("image", "label") else v) for k, v in entry.items()
             if k != "group"}
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
class Listing:
    """What an adapter finds in a data set, before any split: the one input of its seeded split, for ``prepare``
    and the study alike.

    Args:
        annotated: the images the split shares out, as ``(name, entry)`` in the data set's order. ``name`` is the
            image's key for the split (a seed picks by the natural order of the names); ``entry`` holds ``image``,
            ``label``, ``group`` (the stratum: GlaS grade, EBHI class, KPI disease model, one group for folders)
            and the adapter's own fields.
        unlabeled: images without annotation, unlabeled in every split.
        fixed: sections the data set sets itself (GlaS testA / testB, KPI's validation and test splits, CSV rows
            with a split), added after the split's images of the same section.
        source: what the datalist's ``source`` records of the data set (its name and folder).
    """

    annotated: list[tuple[str, dict]]
    unlabeled: list[dict] = field(default_factory=list)
    fixed: dict[str, list[dict]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


class Split(NamedTuple):
    """A datalist before it is written: its sections and its ``source`` record."""

    sections: dict[str, list[dict]]
    source: dict[str, Any]


def _unlabeled(entry: dict) -> dict:
    """An annotated entry as an unlabeled image: without its label and group."""
    return {k: v for k, v in entry.items() if k not in ("label", "group")}


def split_listing(listing: Listing, seed: int, *, test: tuple[float | None, int | None] | None = None,
                  validation: tuple[float | None, int | None] | None = None,
                  labeled: tuple[float | None, int | None] = (1.0, None)) -> dict[str, list[dict]]:
    """The datalist sections of every adapter: :func:`seeded_splits` over the annotated images, by their groups.

    Held-out test and validation images keep their labels; of the rest, the labeled share goes to ``training``
    and the others to ``unlabeled`` without labels, followed by the listing's unlabeled images. Every section
    keeps the listing's order and ends with the listing's fixed entries of that section. A listing without
    annotated images is not split (its unlabeled and fixed entries only).

    Raises:
        ConfigError: when a ratio or count is out of range, or no labeled image is left.
    """
    sections: dict[str, list[dict]] = {key: [] for key in SECTIONS}
    if listing.annotated:
        names = [name for name, _ in listing.annotated]
        split = seeded_splits(names, [entry["group"] for _, entry in listing.annotated], seed, test=test,
                              validation=validation, labeled=labeled)
        test_set, validation_set, labeled_set = set(split["test"]), set(split["validation"]), set(split["labeled"])
        for name, entry in listing.annotated:
            if name in test_set:
                sections["test"].append(entry)
            elif name in validation_set:
                sections["validation"].append(entry)
            elif name in labeled_set:
                sections["training"].append(entry)
            else:
                sections["unlabeled"].append(_unlabeled(entry))
    sections["unlabeled"] += listing.unlabeled
    for key, entries in listing.fixed.items():
        sections[key] += entries
    return sections


def write_split(split: Split, out: str | os.PathLike) -> Path:
    """Writes the datalist of ``split`` (see :func:`write_datalist`) and logs its section sizes."""
    path = write_datalist(split.sections, out, extra={"source": split.source})
    logger.info("%s datalist %s: %s", split.source["dataset"], path, {k: len(v) for k, v in split.sections.items()})
    return path
