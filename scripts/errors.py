"""The project's user-facing error type and a hook that prints it as one clear line.

Configuration mistakes (a wrong key, a missing file, an impossible size) raise ``ConfigError`` with a message
that names the value at fault and what to do. MONAI's config parser wraps exceptions raised while it
instantiates components, so a long traceback would bury that message; the hook below finds a ``ConfigError``
anywhere in the exception chain and prints just its message. Set ``MPAMATCH_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ConfigError", "install_excepthook"]


class ConfigError(ValueError):
    """A user-correctable problem with the configuration, the data or a weights file."""


def _find_config_error(exc: BaseException | None) -> ConfigError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    found = _find_config_error(exc)
    if found is None or os.environ.get("MPAMATCH_DEBUG"):
        _previous(exc_type, exc, tb)
        return
    print(f"ERROR: {found}", file=sys.stderr)


def install_excepthook() -> None:
    """Prints a ``ConfigError`` raised to the top level as one line (the process still exits with status 1).

    Called by the entry points only (each config's ``initialize``, ``python -m scripts.cli``, the Deploy app, the
    benchmarks), never on ``import scripts``, so a program that imports the package keeps its own hook.
    """
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
