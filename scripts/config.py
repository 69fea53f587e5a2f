"""Reading config values that come from JSON files and from the command line alike, and checking them early."""

from __future__ import annotations

import numpy as np

from scripts.errors import ConfigError

__all__ = ["as_bool", "check_training_config", "stderr_is_terminal"]


def stderr_is_terminal() -> bool:
    """Whether standard error is a terminal: the default of the ``progress_bar`` keys (no bar in log files)."""
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


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


def _number(value, key: str, example: str, integer: bool = False, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    bad = not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero)
    if integer and not bad:
        bad = number != int(number)
    if bad:
        kind = "a positive whole number" if integer else ("a number >= 0" if allow_zero else "a positive number")
        raise ConfigError(f"Config key '{key}' is {value!r}; it must be {kind}, e.g. {example}.")
    return number


def check_training_config(*, method_config, learning_rate, encoder_lr_scale, num_epochs, num_iterations,
                          labeled_batch_size, unlabeled_batch_size, num_classes, class_descriptions, text_source,
                          datalists: dict, datalist: str = "datalist", processes: int = 1) -> None:
    """Refuses a training config that cannot work, before any image is read or any step is taken.

    Each problem stops with one message naming the key, its value and a valid example. The checks that need a
    built object stay with it: encoder names and weights files (``scripts.networks``), ``roi_size``
    (``scripts.data.check_roi_size``), datalist entries (``scripts.data.checked_datalist``).

    Args:
        method_config: the resolved method preset (``scripts.engines.resolve_method``).
        learning_rate, encoder_lr_scale, num_epochs, num_iterations, labeled_batch_size, unlabeled_batch_size,
            num_classes, class_descriptions, text_source: the config keys of the same names.
        datalists: the checked datalist sections.
        datalist: the datalist's path, for the messages. Defaults to ``"datalist"``.
        processes: training processes (torchrun), each of which draws its batches from its share of a section.
            Defaults to 1.
    """
    _number(learning_rate, "learning_rate", "0.01")
    _number(encoder_lr_scale, "encoder_lr_scale", "0.1 (pretrained encoder) or 1.0 (random weights)", allow_zero=True)
    if num_iterations is None:
        _number(num_epochs, "num_epochs", "6", integer=True)
    else:
        _number(num_iterations, "num_iterations", "600 (or null to train 'num_epochs')", integer=True)
    _number(num_classes, "num_classes", "2", integer=True)
    if int(num_classes) < 2:
        raise ConfigError(f"Config key 'num_classes' is {num_classes!r}; a segmentation needs at least 2 (background "
                          "and one tissue class), e.g. 2.")
    sections = [("labeled_batch_size", labeled_batch_size, "training")]
    if method_config.unsupervised:
        sections.append(("unlabeled_batch_size", unlabeled_batch_size, "unlabeled"))
    for key, value, section in sections:
        size = int(_number(value, key, "4", integer=True))
        count = len(datalists.get(section) or [])
        share = count // max(1, int(processes))
        if size > share:
            where = f"the {count} images" if processes <= 1 else f"the {share} images each of {processes} processes gets of the {count}"
            raise ConfigError(
                f"Config key '{key}' is {size}, more than {where} in the '{section}' section of "
                f"'{datalist}'; use at most {share}, e.g. --{key} {max(1, min(share, 4))}, or add images."
            )
    if method_config.lambda_txt > 0 and text_source == "prompt" and len(class_descriptions or []) != int(num_classes):
        raise ConfigError(
            f"Config key 'class_descriptions' has {len(class_descriptions or [])} entries for num_classes={num_classes}; "
            "give one description per class, e.g. [\"background stroma and lumen\", \"colon gland epithelium\"]."
        )
