"""Writing files so that a reader never sees a half-written one: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_files", "write_text_atomically"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s folder; when the block ends without error it replaces ``path``.

    On an error (or a kill) the temporary file is removed (or left as a hidden ``.partial`` file), and ``path``
    keeps its previous content. The rename is atomic on one file system.

    Args:
        path: the file to write.
        suffix: ending of the temporary name, for writers that pick the format from it (e.g. ``".png"``).
        fsync: flush the written file to the disk before the rename, so that a power cut cannot leave ``path``
            renamed but empty (checkpoints). Defaults to False.

    Examples::

        with atomic_path("results.csv") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path, suffix)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder in ``path``'s folder, for a file written with companion files that it names by
    their relative path (an ONNX model and its external data file). The block writes ``path``'s file into the
    folder under ``path.name`` and the companions beside it; when it ends without error they move into ``path``'s
    folder, ``path`` last.

    Two renames cannot happen at once, so when there are companions the old ``path`` is deleted before they
    replace theirs: whenever ``path`` exists it is complete and its companions are those written with it (a kill
    between the renames leaves no ``path``, never an old one beside new companions). On an error nothing beside
    ``path`` changes; the folder of a killed writer is removed by the next write of ``path``.

    Args:
        path: the main file to write; companions are plain files (no sub-folders).

    Examples::

        with atomic_files("models/model.onnx") as folder:
            onnx_ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path, "")
    folder = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
        main = folder / path.name
        if not main.is_file():
            raise FileNotFoundError(f"'{main}' was not written: the block writes the main file as '{path.name}'.")
        companions = sorted(p for p in folder.iterdir() if p != main)
        if companions:
            path.unlink(missing_ok=True)
            for companion in companions:
                os.replace(companion, path.parent / companion.name)
        os.replace(main, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_orphans(path: Path, suffix: str) -> None:
    """Deletes temporaries (files or folders) of ``path`` left by killed processes (their process id no longer runs on
    this host), so a killed run does not leave a half-written copy of, say, a large slide mask behind for good."""
    for orphan in path.parent.glob(f".{path.name}.*.partial{suffix}"):
        pid = orphan.name[len(path.name) + 2:-len(f".partial{suffix}")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if orphan.is_dir():  # the folder of atomic_files
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` through ``atomic_path``; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
