"""Reading config values that come from JSON files and from the command line alike."""

from __future__ import annotations

import numpy as np

from scripts.errors import ConfigError

__all__ = ["as_bool"]


def as_bool(value: bool | str | None, key: str) -> bool:
    """A yes / no config value as a bool.

    ``python -m monai.bundle run ... --resume false`` hands the config the string ``'false'``, which Python would
    take for true; every yes / no key goes through this function so that both spellings mean what they say.

    Args:
        value: True, False, or the strings ``true`` / ``false`` (any case).
        key: the config key, named in the error.

    Raises:
        ConfigError: for any other value.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"Config key '{key}' is {value!r}; use true or false.")
