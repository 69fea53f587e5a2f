"""One training per output folder: a lock file that names the process holding it.

Two trainings writing the same ``checkpoint.pt`` and ``model.pt`` would overwrite each other's files and resume
from each other's epochs. ``acquire_run_lock`` takes an exclusive ``flock`` on ``training.lock`` in the checkpoint
folder for the life of the process and writes the holder's process id, host, start time and command into it. A
second run on the same folder finds the file locked and stops at once with a message naming the holder. The
kernel releases the lock when the holder exits or is killed, so a lock file left by a killed run is simply taken
over (with a warning naming the old holder); no process id is trusted, so a reused id or another container with
the same host name cannot mislead it. The file is removed when the run ends.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from scripts.errors import ConfigError

__all__ = ["acquire_run_lock", "LOCK_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = "training.lock"

# Locks this process holds: path -> open file (closing it would release the lock).
_HELD: dict[str, object] = {}


def _read(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


def _release(path: str) -> None:
    handle = _HELD.pop(path, None)
    if handle is None:
        return
    try:
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            os.unlink(path)
    finally:
        handle.close()


def acquire_run_lock(folder: str | os.PathLike) -> Path:
    """Takes the training lock of ``folder`` for this process, or stops if another live run holds it.

    Args:
        folder: the run's checkpoint folder (config key ``ckpt_dir``); created if missing.

    Returns:
        The lock file's path.

    Raises:
        ConfigError: another process holds the lock (the message names it, and what to do).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:  # an earlier run in this same process (e.g. a server that retrains)
        return path
    for _ in range(5):
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(handle)
            handle.close()
            raise ConfigError(
                f"Another training is writing to '{folder}': lock '{path}' is held by process {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, started {holder.get('started', '?')} "
                f"({str(holder.get('command', ''))[:200]}). Wait for it to finish or stop it, or give this run another "
                "'ckpt_dir' / 'bundle_root'."
            ) from None
        # The file may have been removed and re-created by a run that ended meanwhile: lock the current one.
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            handle.close()
            continue
        previous = _read(handle)
        if previous:
            logger.warning("Taking over the lock %s left by process %s on %s (no longer running).", path,
                           previous.get("pid", "unknown"), previous.get("host", "unknown"))
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)[:500]}, handle)
        handle.flush()
        _HELD[key] = handle
        atexit.register(_release, key)
        return path
    raise ConfigError(f"Could not take the training lock '{path}'; other runs keep re-creating it. Give this run "
                      "another 'ckpt_dir'.")
