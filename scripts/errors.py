"""The project's user-facing error types and a hook that prints them as one clear line.

Every error a user can act on is a ``ProductError`` whose message names the file, key or value at fault and what to
do. Two kinds:

- ``ConfigError``: the configuration, the data or a weights file is wrong (a wrong key, a missing or damaged file,
  an impossible size); fix the input and run again.
- ``RunError``: a run that started correctly cannot go on (training diverged, an exported model does not match its
  PyTorch network, damaged image data found while reading a slide).

MONAI's config parser wraps exceptions raised while it instantiates components, so a long traceback would bury
that message; the hook below finds a ``ProductError`` anywhere in the exception chain and prints just its message.
Set ``MPAMATCH_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ProductError", "ConfigError", "RunError", "install_excepthook"]


class ProductError(Exception):
    """Base of the errors a user can act on; the entry points print its message as one line."""


class ConfigError(ProductError, ValueError):
    """A user-correctable problem with the configuration, the data or a weights file."""


class RunError(ProductError, RuntimeError):
    """A run that started correctly cannot go on: divergence, a failed export check, damaged data met mid-run."""


def _find_product_error(exc: BaseException | None) -> ProductError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ProductError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    found = _find_product_error(exc)
    if found is None or os.environ.get("MPAMATCH_DEBUG"):
        _previous(exc_type, exc, tb)
        return
    print(f"ERROR: {found}", file=sys.stderr)


def install_excepthook() -> None:
    """Prints a ``ProductError`` raised to the top level as one line (the process still exits with status 1).

    Called by the entry points only (each config's ``initialize``, ``python -m scripts.cli``, the Deploy app, the
    benchmarks), never on ``import scripts``, so a program that imports the package keeps its own hook.
    """
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
