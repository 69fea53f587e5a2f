"""Assembles ``dist/<bundle_name>/``: the layout MONAI's bundle tools expect (configs/, scripts/, models/, docs/)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from scripts.errors import ConfigError
from scripts.paths import REPO

__all__ = ["BUNDLE_NAME", "META_SCHEMA", "pack_bundle"]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "mpamatch_gland_segmentation"
META_SCHEMA = Path(__file__).resolve().parent / "meta_schema.json"


def pack_bundle(out_dir: str = "dist", name: str = BUNDLE_NAME, model: str | None = None) -> Path:
    """Copies configs, the ``scripts`` package, docs, LICENSE and (if given or present) ``models/model.pt``.

    Args:
        out_dir: parent folder of the bundle. Defaults to ``dist``.
        name: bundle folder name. Defaults to ``mpamatch_gland_segmentation``.
        model: checkpoint to ship as ``models/model.pt``. Defaults to the repository's ``models/model.pt`` if any.
            Weights fine-tuned from UNI carry UNI's CC-BY-NC-ND terms: check them before sharing a bundle.
    """
    target = Path(out_dir).expanduser() / name
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "bundle" / "configs", target / "configs", ignore=shutil.ignore_patterns("datasets"))
    shutil.copytree(REPO / "bundle" / "configs" / "datasets", target / "configs" / "datasets")
    shutil.copytree(REPO / "scripts", target / "scripts", ignore=ignore)
    shutil.copytree(REPO / "bundle" / "docs", target / "docs")
    for doc in (REPO / "docs").glob("*.md"):
        shutil.copy2(doc, target / "docs" / doc.name)
    if (REPO / "docs" / "study").is_dir():  # the study outputs and plots that results.md shows
        shutil.copytree(REPO / "docs" / "study", target / "docs" / "study")
    shutil.copy2(REPO / "LICENSE", target / "LICENSE")
    (target / "models").mkdir()
    checkpoint = Path(model) if model else REPO / "models" / "model.pt"
    if model and not checkpoint.is_file():
        raise ConfigError(f"Model '{model}' does not exist (--model).")
    if checkpoint.is_file():
        shutil.copy2(checkpoint, target / "models" / "model.pt")
    else:
        logger.warning("No models/model.pt to ship; the bundle has no trained weights.")
    logger.info("Bundle assembled in %s", target)
    return target
