"""The study's datalists: one fixed test set for every run, and per labeled ratio the adapter's own validation and
labeled / unlabeled split of the remaining images.

How each ``--data`` is split:

- The **test set** is the same for every run. With ``--test_root`` it is that folder's own test section (GlaS: its
  ``testA_`` / ``testB_`` images; KPI: its ``test`` split; demo: its ``test`` section), or all its annotated images
  when it has none (EBHI, folders). Without it, ``test_count`` annotated training images are held out with
  :data:`TEST_SEED` (0, independent of the run seeds and of ``split_seed``), stratified by the adapter's group (GlaS
  grade, EBHI class, KPI disease model; folders have one). The demo data set keeps its own ``test`` section.
- The remaining annotated images, with the data set's unlabeled images and its validation split (KPI), form the
  listing the adapter's own split receives, the same ``split`` as ``prepare <name>`` with ``split_seed``, the
  study's test set in its test section: so the test images can never reach training, unlabeled training or model
  selection, and runs differ only in method, ratio and seed. Paths name the files themselves (symbolic links
  resolved).
- Held-out images are whole images or patches: KPI patches of one case, or GlaS images of one patient, can fall on
  both sides. Pass the data set's official test split as ``--test_root`` (GlaS: the folder with ``testA_`` /
  ``testB_``; KPI: the folder with ``Task1_patch_level/test``) for a test set that shares no case with training.
- Validation does not depend on the labeled ratio (the adapters pick it before the labeled share), and the
  labeled sets of the ratios are nested when the strata allow it (same seed, same shuffled order).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from scripts.data.adapters import Adapter, Listing, Split, split_listing, study_adapters
from scripts.data.adapters.common import load_sections, resolve_count, stratified_pick, write_datalist
from scripts.errors import ConfigError

__all__ = ["data_names", "TEST_SEED", "build_datalists", "datalist_path", "ratio_label", "load_sections",
           "study_listing", "check_adapter_args"]

logger = logging.getLogger(__name__)

TEST_SEED = 0
# Arguments of an adapter's split the study sets itself; --adapter_args may not change them.
_STUDY_ARGS = {"listing", "out", "labeled_ratio", "labeled_count", "seed", "test_ratio"}


def data_names() -> tuple[str, ...]:
    """The study's ``--data`` names: the adapters' study names (scripts/data/adapters/registry.py), then the
    generated demo set."""
    return (*study_adapters(), "demo")


def ratio_label(ratio: float) -> str:
    """The ratio as written in file and run names: ``0.1``, ``0.25``, ``1``."""
    return f"{ratio:g}"


def datalist_path(out: Path, ratio: float) -> Path:
    """Where the study keeps the datalist of one labeled ratio."""
    return Path(out) / "datalists" / f"ratio_{ratio_label(ratio)}.json"


def _demo_listing(root: Path) -> Listing:
    """The demo data set's sections as a listing (one group), generating the default demo set under ``root`` when
    it holds none."""
    from scripts.data import ensure_demo_dataset

    path = root / "datalist.json"
    if not path.is_file():
        path = Path(ensure_demo_dataset(root))
    sections = load_sections(path)
    return Listing([(e["image"], dict(e, group="all")) for e in sections["training"]], sections["unlabeled"],
                   {"validation": sections["validation"], "test": sections["test"]})


def _adapter(data: str) -> tuple[Adapter, dict]:
    """The adapter of ``data`` and the listing arguments the study fixes for it."""
    adapters = study_adapters()
    if data not in adapters:
        raise ConfigError(f"--data '{data}' is not one of {list(data_names())}.")
    return adapters[data]


def _resolved(entry: dict) -> dict:
    """The entry with its image and label as the files themselves (symbolic links resolved)."""
    return {k: (os.path.realpath(v) if k in ("image", "label") else v) for k, v in entry.items()}


def _listing(data: str, root: Path) -> Listing:
    """``root`` listed by the adapter of ``data`` (the demo set: its own sections), paths resolved."""
    if data == "demo":
        listing = _demo_listing(root)
    else:
        adapter, fixed = _adapter(data)
        listing = adapter.listing(root, **fixed)
    return Listing([(name, _resolved(e)) for name, e in listing.annotated], [_resolved(e) for e in listing.unlabeled],
                   {key: [_resolved(e) for e in entries] for key, entries in listing.fixed.items()}, listing.source)


def _hold_out_test(pool: list[tuple[str, dict]], test_count: int) -> tuple[list[dict], list[tuple[str, dict]]]:
    """(test, rest): ``test_count`` pool images picked with TEST_SEED, stratified by group."""
    if not 1 <= test_count < len(pool):
        raise ConfigError(f"--test_count {test_count} is out of range: the data set has {len(pool)} annotated "
                          "training images, and validation and training need some of them.")
    picked = set(stratified_pick([e["image"] for _, e in pool], [e["group"] for _, e in pool], test_count, TEST_SEED))
    return [e for _, e in pool if e["image"] in picked], [(n, e) for n, e in pool if e["image"] not in picked]


def study_listing(data: str, root: Path, test_root: Path | None, test_count: int) -> tuple[Listing, str]:
    """What the study splits for every ratio: the annotated images of ``root`` less the test set, with its unlabeled
    images and validation split, and the test set as the test section; and a note saying where the test set is from.

    Args:
        data: one of :func:`data_names`.
        root: the data set's folder.
        test_root: a folder in the same layout whose test section (else its annotated images) is the test set, or
            None.
        test_count: annotated images of ``root`` held out for testing when there is no ``test_root``.
    """
    listing = _listing(data, root)
    own_test = listing.fixed.get("test", [])
    if not listing.annotated:
        raise ConfigError(f"--root '{root}' holds no annotated training images for --data {data}; see docs/data.md "
                          "for its layout.")
    if test_root is not None:
        other = _listing(data, test_root)
        test, pool = other.fixed.get("test") or [e for _, e in other.annotated], listing.annotated
        note = f"{len(test)} images of {test_root}"
    elif data == "demo":
        test, pool = own_test, listing.annotated
        note = f"the demo's test section ({len(test)} images)"
    else:
        if own_test:
            logger.info("[study] %s has its own test images (%d); they are not used. Pass --test_root %s to test on "
                        "them instead of held-out training images.", root, len(own_test), root)
        test, pool = _hold_out_test(listing.annotated, test_count)
        note = f"{len(test)} training images held out (seed {TEST_SEED}, stratified by group)"
    if not test:
        raise ConfigError(f"The test set is empty ({note}); check --test_root.")
    return Listing(pool, listing.unlabeled, {**listing.fixed, "test": test}, listing.source), note


def check_adapter_args(data: str, adapter_args: dict) -> None:
    """Stops with the allowed names when ``--adapter_args`` holds a key the adapter of ``data`` does not take.

    Args:
        data: one of :func:`data_names`.
        adapter_args: extra keyword arguments for the adapter (e.g. ``validation_ratio``, KPI's ``rule``).
    """
    if data == "demo":
        if adapter_args:
            raise ConfigError(f"--adapter_args {adapter_args} is not used with --data demo (its splits are fixed); "
                              "leave it out.")
        return
    adapter, _ = _adapter(data)
    allowed = sorted(set(inspect.signature(adapter.split).parameters) - _STUDY_ARGS)
    wrong = sorted(set(adapter_args) - set(allowed))
    if wrong:
        raise ConfigError(f"--adapter_args has key(s) {wrong} that the {data} adapter does not take or that the study "
                          f"sets itself (ratio, seed, test split); allowed: {allowed}.")


def _mask_names(test: list[dict]) -> None:
    """Gives every test entry a unique ``mask_name`` (its file stem; prefixed by its group when stems repeat)."""
    stems = [Path(e["image"]).stem for e in test]
    repeated = {s for s in stems if stems.count(s) > 1}
    used: set[str] = set()
    for entry, stem in zip(test, stems):
        group = entry.get("group") or entry.get("class") or entry.get("model") or entry.get("subset") or "image"
        name = stem if stem not in repeated else re.sub(r"[^A-Za-z0-9._-]+", "_", f"{group}_{stem}")
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        entry["mask_name"] = name


def _check_disjoint(sections: dict[str, list[dict]], path: Path) -> None:
    test = {os.path.realpath(e["image"]) for e in sections["test"]}
    leaked = [e["image"] for k in ("training", "unlabeled", "validation") for e in sections[k]
              if os.path.realpath(e["image"]) in test]
    if leaked:
        raise ConfigError(f"Datalist '{path}' would train or select models on {len(leaked)} test image(s), e.g. "
                          f"{leaked[0]}; --test_root must not hold the training images of --root.")


def _demo_split(listing: Listing, ratio: float, split_seed: int) -> Split:
    """The demo's split: a labeled share of all its training images (masked or not) picked from the masked ones;
    validation and test as listed."""
    masked, total = len(listing.annotated), len(listing.annotated) + len(listing.unlabeled)
    n_labeled = resolve_count(total, ratio, None, "labeled")
    if n_labeled > masked:
        raise ConfigError(f"--labeled_ratios {ratio} asks for {n_labeled} labeled images, but the demo data set has "
                          f"masks for {masked} of its {total} training images; use a ratio of at most "
                          f"{masked / total:g} (or generate a larger demo set with "
                          "`python -m scripts.cli demo-data`).")
    return Split(split_listing(listing, split_seed, labeled=(None, n_labeled)), {})


def build_datalists(data: str, root: str | os.PathLike, out: str | os.PathLike, ratios: Sequence[float],
                    test_root: str | os.PathLike | None = None, test_count: int = 20, split_seed: int = 0,
                    adapter_args: dict | None = None) -> dict[float, Path]:
    """Writes (or reuses) ``OUT/datalists/ratio_<r>.json`` for every labeled ratio; all share one test section.

    Args:
        data: one of :func:`data_names`.
        root: the data set's folder.
        out: the study's output folder.
        ratios: labeled ratios, each in (0, 1].
        test_root: a folder in the same layout whose images form the test set; None holds out ``test_count``
            training images instead (seed 0, stratified), or uses the demo's own test section.
        test_count: images held out for testing when ``test_root`` is None. Defaults to 20.
        split_seed: seed of the adapter's validation and labeled splits. Defaults to 0.
        adapter_args: further keyword arguments for the adapter's split (e.g. ``{"validation_ratio": 0.2}``).

    Returns:
        ``{ratio: datalist path}``.
    """
    adapter_args = dict(adapter_args or {})
    check_adapter_args(data, adapter_args)
    root = Path(root).expanduser().resolve()
    paths = {r: datalist_path(Path(out), r) for r in ratios}
    missing = [r for r, p in paths.items() if not p.is_file()]
    if not missing:
        return paths
    listing, test_note = study_listing(data, root, Path(test_root).expanduser().resolve() if test_root else None,
                                       test_count)
    for ratio in missing:
        if data == "demo":
            split = _demo_split(listing, ratio, split_seed)
        else:
            adapter, _ = _adapter(data)
            no_test = {"test_ratio": 0.0} if "test_ratio" in inspect.signature(adapter.split).parameters else {}
            split = adapter.split(listing, paths[ratio], labeled_ratio=ratio, seed=split_seed, **no_test,
                                  **adapter_args)
        sections = split.sections
        _mask_names(sections["test"])
        _check_disjoint(sections, paths[ratio])
        study = {"data": data, "labeled_ratio": ratio, "split_seed": split_seed, "test": test_note}
        source = {"source": split.source} if split.source else {}  # the demo set has none
        write_datalist(sections, paths[ratio], extra={**source, "study": study})
        logger.info("[study] datalist %s: %s", paths[ratio], {k: len(v) for k, v in sections.items()})
    return paths
