"""Stages the folder that ``monai-deploy package`` turns into a MONAI Application Package (MAP).

``python -m scripts.deploy.app.stage --out dist/map`` writes ``__main__.py`` (the application's entry point),
``scripts/`` (the package it imports), ``bundle/configs/inference.json`` (the segmentation recipe, where
``scripts`` looks for it), ``app.yaml`` and ``requirements.txt`` (the repository's pins plus the SDK's), which is
the layout the packager expects of a Python application folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scripts.errors import ConfigError
from scripts.inference.pipeline import INFERENCE_CONFIG
from scripts.paths import REPO, SCRIPTS_DIR

__all__ = ["stage_app"]

APP_DIR = Path(__file__).resolve().parent
REQUIREMENTS = REPO / "requirements.txt"


def stage_app(out: str | os.PathLike = "dist/map") -> Path:
    """Writes the MAP source folder ``out`` (replacing an earlier staging there) and returns its path.

    Raises:
        ConfigError: when ``out`` exists but is not an earlier staging, or the repository's requirements.txt is missing.
    """
    target = Path(out).expanduser()
    if target.exists():
        if not (target / "scripts" / "deploy" / "app" / "__main__.py").is_file():
            raise ConfigError(f"'{target}' exists and is not a staged application (--out); choose a new folder.")
        shutil.rmtree(target)
    if not REQUIREMENTS.is_file():
        raise ConfigError(f"'{REQUIREMENTS}' is missing; stage the application from a checkout of the repository.")
    shutil.copytree(SCRIPTS_DIR, target / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    configs = target / "bundle" / "configs"
    configs.mkdir(parents=True)
    shutil.copy2(INFERENCE_CONFIG, configs / "inference.json")
    for name in ("__main__.py", "app.yaml"):
        shutil.copy2(APP_DIR / name, target / name)
    (target / "requirements.txt").write_text(
        REQUIREMENTS.read_text().rstrip() + "\n" + (APP_DIR / "requirements.txt").read_text()
    )
    return target


if __name__ == "__main__":
    import fire

    fire.Fire(stage_app)
