"""One training per output folder: a lock file that names the process holding it.

Two trainings writing the same ``checkpoint.pt`` and ``model.pt`` would overwrite each other's files and resume
from each other's epochs. ``acquire_run_lock`` creates ``training.lock`` in the checkpoint folder with the
holder's process id, host, start time and command; a second run on the same folder stops at once with a message
naming the lock and that process. A lock left behind by a killed run (its process is gone, or the process id now
belongs to another program) is taken over with a warning. The lock is removed when the process exits.
"""

from __future__ import annotations

import atexit
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


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), telling a live holder from a reused process id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return False
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _release(path: Path, owner: str) -> None:
    try:
        if json.loads(path.read_text()).get("token") == owner:
            path.unlink()
    except (OSError, ValueError):
        pass


def acquire_run_lock(folder: str | os.PathLike) -> Path:
    """Takes the training lock of ``folder`` for this process, or stops if a live run holds it.

    Args:
        folder: the run's checkpoint folder (config key ``ckpt_dir``); created if missing.

    Returns:
        The lock file's path.

    Raises:
        ConfigError: another live process holds the lock (the message names it, and what to do).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    mine = {
        "pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500], "token": token,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder and holder.get("token") == token:
                return path
            if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                path.unlink(missing_ok=True)  # an earlier run in this same process (e.g. a server that retrains)
                continue
            if holder and _holder_alive(holder):
                raise ConfigError(
                    f"Another training is writing to '{folder}': lock '{path}' is held by process {holder.get('pid')} "
                    f"on {holder.get('host')}, started {holder.get('started')} ({holder.get('command', '')[:200]}). "
                    "Wait for it to finish or stop it, or give this run another 'ckpt_dir' / 'bundle_root'. If that "
                    "process is gone (e.g. another machine that was switched off), delete the lock file."
                )
            logger.warning("Taking over the lock %s left by process %s (no longer running).", path,
                           holder.get("pid", "unknown"))
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(mine, handle)
        atexit.register(_release, path, token)
        return path
    raise ConfigError(f"Could not take the training lock '{path}'; another run keeps taking it. Give this run "
                      "another 'ckpt_dir'.")
