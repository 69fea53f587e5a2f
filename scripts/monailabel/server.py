"""Starting and stopping a MONAI Label server over this app from Python (the tests and the benchmark use it).

Users start the server from the shell (docs/monailabel.md); this helper does the same in a process group of its
own, waits until ``/info`` answers, and stops the whole group (the server and its task processes) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scripts.paths import REPO

__all__ = ["APP_DIR", "free_port", "running_server"]

APP_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(studies: str | os.PathLike, conf: dict, log: str | os.PathLike, port: int | None = None,
                   timeout: float = 120.0) -> Iterator[dict]:
    """Runs ``python -m monailabel.main start_server`` over ``studies`` until the block ends.

    Args:
        studies: the datastore folder.
        conf: the app's ``--conf`` keys (values that are not strings are written as JSON).
        log: file that receives the server's output.
        port: the port on 127.0.0.1. Defaults to a free one.
        timeout: seconds to wait for ``/info``. Defaults to 120.

    Yields: ``{"url": ..., "pid": ...}``.
    """
    import requests

    port = port or free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    with open(log, "w") as handle:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"The MONAI Label server exited with {process.returncode}; see {log}:\n"
                                   + Path(log).read_text()[-3000:])
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"The MONAI Label server did not answer within {timeout:.0f} s; see {log}.")
            time.sleep(1)
        yield {"url": url, "pid": process.pid}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
