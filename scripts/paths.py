"""Where the checkout's own files are: one module instead of ``Path(__file__).parents[n]`` in each module that
reads or copies them.

``REPO`` is the folder that holds ``scripts/`` and ``models/``: the repository root, or ``dist/<bundle_name>/`` in a
packed bundle (the configs' ``bundle_root`` by default, ``scripts.BUNDLE_ROOT``). ``CONFIG_DIR`` is the
repository's ``bundle/configs/``. ``scripts/monailabel/main.py`` keeps its own line: MONAI Label loads it by path,
before ``scripts`` can be imported.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO", "SCRIPTS_DIR", "CONFIG_DIR", "config_path"]

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO / "scripts"
CONFIG_DIR = REPO / "bundle" / "configs"


def config_path(name: str) -> Path:
    """A config file of the repository, e.g. ``config_path("train.json")`` or ``config_path("recipes/cpu.json")``."""
    return CONFIG_DIR / name
