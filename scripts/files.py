"""Writing files so that a reader never sees a half-written one: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomically"]


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


def _remove_orphans(path: Path, suffix: str) -> None:
    """Deletes temporaries of ``path`` left by killed processes (their process id no longer runs on this host), so a
    killed run does not leave a half-written copy of, say, a large slide mask behind for good."""
    for orphan in path.parent.glob(f".{path.name}.*.partial{suffix}"):
        pid = orphan.name[len(path.name) + 2:-len(f".partial{suffix}")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            orphan.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` through ``atomic_path``; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
