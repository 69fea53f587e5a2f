"""Reading a MONAI-style datalist JSON, with every problem reported by file and key."""

from __future__ import annotations

import json
import os
from pathlib import Path

from scripts.errors import ConfigError

__all__ = ["load_datalist", "demo_cache_dir", "list_images", "IMAGE_SUFFIXES"]


def demo_cache_dir(name: str = "demo") -> str:
    """Where the generated demo data lives: ``$MPAMATCH_CACHE/<name>``, by default ``~/.cache/mpamatch/<name>``."""
    root = os.environ.get("MPAMATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mpamatch")
    return os.path.join(root, name)


def load_datalist(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    key: str = "training",
    require_label: bool = True,
    check_files: bool = True,
) -> list[dict]:
    """Reads one section of a datalist and resolves its paths, checking that every file exists.

    The datalist is ``{"training": [{"image": ..., "label": ...}], "unlabeled": [{"image": ...}],
    "validation": [...], "test": [...]}``; relative paths are taken from ``dataset_dir``.

    Args:
        datalist: path of the JSON file (config key ``datalist``).
        dataset_dir: folder that relative paths start from (config key ``dataset_dir``). Defaults to the
            datalist's own folder.
        key: the section to read. Defaults to ``"training"``.
        require_label: whether every entry needs a ``label``. Defaults to True.
        check_files: report files that do not exist. Defaults to True; ``checked_datalist`` reports them itself,
            together with every other problem.

    Raises:
        ConfigError: for a missing file or folder, malformed JSON, a missing or empty section, entries without
            ``image`` / ``label``, or files that do not exist (all of them listed).
    """
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Datalist '{path}' does not exist (config key 'datalist'). Point 'datalist' at a JSON file with "
            "'training' / 'validation' sections (README: 'Your own data'), or leave it at its default to use the "
            "generated demo data."
        )
    base = Path(dataset_dir).expanduser() if dataset_dir else path.parent
    if not base.is_dir():
        raise ConfigError(
            f"Dataset folder '{base}' does not exist (config key 'dataset_dir'); set it to the folder that the "
            f"relative paths in '{path}' start from."
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"Datalist '{path}' is not valid JSON: {err}. Fix the file and run again.") from err
    if not isinstance(content, dict) or key not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"Datalist '{path}' has no '{key}' section (found: {found}).")
    entries = content[key]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"Section '{key}' of datalist '{path}' is empty; it needs at least one entry.")

    required = ("image", "label") if require_label else ("image",)
    resolved, problems = [], []
    for index, entry in enumerate(entries):
        if isinstance(entry, str) and not require_label:
            entry = {"image": entry}
        if not isinstance(entry, dict) or any(k not in entry for k in required):
            problems.append(f"entry {index} of '{key}' needs keys {list(required)}: {entry!r}")
            continue
        item = dict(entry)
        for field in ("image", "label"):
            if field not in item:
                continue
            file = Path(item[field]).expanduser()
            file = file if file.is_absolute() else base / file
            if check_files and not file.is_file():
                problems.append(f"{field} of entry {index} of '{key}' not found: {file}")
            item[field] = os.path.normpath(str(file))
        resolved.append(item)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"Datalist '{path}' has {len(problems)} problem(s):\n  {shown}{more}")
    return resolved


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(input_dir: str | os.PathLike) -> list[dict]:
    """Every image file directly in ``input_dir`` (sorted), as ``[{"image": path}, ...]`` for inference.

    Raises:
        ConfigError: when the folder does not exist or holds no image with a known suffix.
    """
    folder = Path(input_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"Input folder '{folder}' does not exist (config key 'input_dir'); point it at a folder of images.")
    # not is_file(): a broken link or a link loop named like an image is listed, so that reading it reports it
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not files:
        raise ConfigError(
            f"Input folder '{folder}' holds no images with suffixes {list(IMAGE_SUFFIXES)} (config key 'input_dir')."
        )
    return [{"image": str(p)} for p in files]
