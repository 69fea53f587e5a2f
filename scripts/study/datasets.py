"""The study's datalists: one fixed test set for every run, and per labeled ratio the adapter's own validation and
labeled / unlabeled split of the remaining images.

How each ``--data`` is split:

- The **test set** is the same for every run. With ``--test_root`` it is that folder's images (GlaS: its
  ``testA_`` / ``testB_`` images, or all its annotated images when it has none; KPI: its ``test`` split; EBHI and
  folders: every annotated image; demo: its ``test`` section). Without it, ``test_count`` annotated training
  images are held out with :data:`TEST_SEED` (0, independent of the run seeds and of ``split_seed``), stratified
  by the adapter's group (GlaS grade, EBHI class, KPI disease model; folders have none). The demo data set
  keeps its own ``test`` section.
- The remaining images are laid out as a private copy of the data set made of symbolic links (test images
  left out) and given to the data set's adapter, which forms validation and the labeled / unlabeled split with
  its own rules and ``split_seed``; the written paths point at the original files. So the test images can never
  reach training, unlabeled training or model selection, and runs differ only in method, ratio and seed.
- Held-out images are whole images or patches: KPI patches of one case, or GlaS images of one patient, can fall on
  both sides. Pass the data set's official test split as ``--test_root`` (GlaS: the folder with ``testA_`` /
  ``testB_``; KPI: the folder with ``Task1_patch_level/test``) for a test set that shares no case with training.
- Validation does not depend on the labeled ratio (the adapters pick it before the labeled share), and the
  labeled sets of the ratios are nested when the strata allow it (same seed, same shuffled order).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from scripts.data.adapters import Adapter, study_adapters
from scripts.data.adapters.common import StudyData, load_sections, resolve_count, stratified_pick, write_datalist
from scripts.errors import ConfigError

__all__ = ["data_names", "TEST_SEED", "StudyData", "build_datalists", "datalist_path", "ratio_label", "load_sections",
           "scan_data", "check_adapter_args"]

logger = logging.getLogger(__name__)



def data_names() -> tuple[str, ...]:
    """The study's ``--data`` names: the adapters' study names (scripts/data/adapters/registry.py), then the
    generated demo set."""
    return (*study_adapters(), "demo")
TEST_SEED = 0
# Adapter arguments the study sets itself; --adapter_args may not change them.
_STUDY_ARGS = {"root", "out", "labeled_ratio", "labeled_count", "seed", "test_ratio", "preset"}


def ratio_label(ratio: float) -> str:
    """The ratio as written in file and run names: ``0.1``, ``0.25``, ``1``."""
    return f"{ratio:g}"


def datalist_path(out: Path, ratio: float) -> Path:
    """Where the study keeps the datalist of one labeled ratio."""
    return Path(out) / "datalists" / f"ratio_{ratio_label(ratio)}.json"


def _demo_sections(root: Path) -> dict[str, list[dict]]:
    """The demo data set's sections, generating the default demo set under ``root`` when it holds none."""
    from scripts.data import ensure_demo_dataset

    path = root / "datalist.json"
    if not path.is_file():
        path = Path(ensure_demo_dataset(root))
    return load_sections(path)


def _adapter(data: str) -> tuple[Adapter, dict]:
    """The adapter of ``data`` and the arguments the study fixes for it."""
    adapters = study_adapters()
    if data not in adapters:
        raise ConfigError(f"--data '{data}' is not one of {list(data_names())}.")
    return adapters[data]


def scan_data(data: str, root: Path, test_root: Path | None, scratch: Path) -> StudyData:
    """Lists the annotated training images of ``root`` (and the test images of ``test_root``) for ``data``, by
    its adapter's ``study_scan`` (the demo set: its own sections).

    Args:
        data: one of :func:`data_names`.
        root: the data set's folder.
        test_root: a folder in the same layout whose images form the test set, or None.
        scratch: an empty folder for the adapters' scratch files.
    """
    if data == "demo":
        sections = _demo_sections(root)
        test = _demo_sections(test_root)["test"] if test_root is not None else sections["test"]
        return StudyData([dict(e, group="all") for e in sections["training"]], unlabeled=sections["unlabeled"],
                         test=test, extra={"validation": sections["validation"]})
    adapter, fixed = _adapter(data)
    return adapter.study_scan(root, test_root, scratch, **fixed)


def _hold_out_test(data: StudyData, test_count: int) -> tuple[list[dict], list[dict]]:
    """(test, rest): ``test_count`` pool images picked with TEST_SEED, stratified by group."""
    if not 1 <= test_count < len(data.pool):
        raise ConfigError(f"--test_count {test_count} is out of range: the data set has {len(data.pool)} annotated "
                          "training images, and validation and training need some of them.")
    names = [e["image"] for e in data.pool]
    picked = set(stratified_pick(names, [e["group"] for e in data.pool], test_count, TEST_SEED))
    return [e for e in data.pool if e["image"] in picked], [e for e in data.pool if e["image"] not in picked]


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
    allowed = sorted(set(inspect.signature(adapter.datalist).parameters) - _STUDY_ARGS)
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


def _demo_datalist(source: StudyData, ratio: float, split_seed: int) -> dict[str, list[dict]]:
    total = len(source.pool) + len(source.unlabeled)
    n_labeled = resolve_count(total, ratio, None, "labeled")
    if n_labeled > len(source.pool):
        raise ConfigError(f"--labeled_ratios {ratio} asks for {n_labeled} labeled images, but the demo data set has "
                          f"masks for {len(source.pool)} of its {total} training images; use a ratio of at most "
                          f"{len(source.pool) / total:g} (or generate a larger demo set with "
                          "`python -m scripts.cli demo-data`).")
    names = [e["image"] for e in source.pool]
    chosen = set(stratified_pick(names, ["all"] * len(names), n_labeled, split_seed))
    return {
        "training": [e for e in source.pool if e["image"] in chosen],
        "unlabeled": [{"image": e["image"]} for e in source.pool if e["image"] not in chosen] + list(source.unlabeled),
        "validation": list(source.extra["validation"]),
        "test": [],
    }


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
        adapter_args: further keyword arguments for the adapter (e.g. ``{"validation_ratio": 0.2}``).

    Returns:
        ``{ratio: datalist path}``.
    """
    adapter_args = dict(adapter_args or {})
    check_adapter_args(data, adapter_args)
    root = Path(root).expanduser().resolve()
    out = Path(out)
    paths = {r: datalist_path(out, r) for r in ratios}
    missing = [r for r, p in paths.items() if not p.is_file()]
    if not missing:
        return paths
    scratch = out / "datalists" / ".work"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        source = scan_data(data, root, Path(test_root).expanduser().resolve() if test_root else None, scratch)
        if source.test is not None:
            test, pool = list(source.test), list(source.pool)
            test_note = f"{len(test)} images of {test_root}" if test_root else f"the demo's test section ({len(test)} images)"
        else:
            test, pool = _hold_out_test(source, test_count)
            test_note = f"{len(test)} training images held out (seed {TEST_SEED}, stratified by group)"
        if not test:
            raise ConfigError(f"The test set is empty ({test_note}); check --test_root.")
        for ratio in missing:
            if data == "demo":
                sections = _demo_datalist(source, ratio, split_seed)
                extra = {}
            else:
                view = scratch / f"view_{ratio_label(ratio)}"
                adapter, fixed = _adapter(data)
                adapter.study_layout(view, pool, source.unlabeled, test, source, root)
                written = adapter.datalist(view, paths[ratio], labeled_ratio=ratio, seed=split_seed, **fixed,
                                           **adapter_args)
                extra = {"source": {**json.loads(Path(written).read_text()).get("source", {}), "root": str(root)}}
                sections = load_sections(written)
                for entries in sections.values():  # from the links back to the original files
                    for entry in entries:
                        for key in ("image", "label"):
                            if key in entry:
                                entry[key] = os.path.realpath(entry[key])
            if data == "demo" or not _adapter(data)[0].test_through_adapter:  # else: converted with the view
                sections["test"] = [{k: (os.path.realpath(v) if k in ("image", "label") else v) for k, v in e.items()}
                                    for e in test]
            _mask_names(sections["test"])
            for entries in sections.values():
                for entry in entries:
                    entry.pop("group", None)
                    entry.pop("case", None)
            _check_disjoint(sections, paths[ratio])
            extra["study"] = {"data": data, "labeled_ratio": ratio, "split_seed": split_seed, "test": test_note}
            write_datalist(sections, paths[ratio], extra=extra)
            logger.info("[study] datalist %s: %s", paths[ratio], {k: len(v) for k, v in sections.items()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return paths
