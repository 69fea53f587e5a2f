"""What a trained model remembers: the network keys it was built with and the window it was trained at.

``model.pt`` stores, beside the weights, a ``config`` record of the keys that shape the network
(``NETWORK_KEYS``) and the sliding window and image scale it was trained at (``WINDOW_KEYS``), written by the
training config (``model_record``). Evaluation, inference, whole-slide inference and ONNX export build the network
and the window from that record (``trained_settings``), so a model trained with ``--encoder_name vit_tiny`` or the
CPU recipe runs without repeating those overrides. A value given on the command line that contradicts the record
is refused; a different value from a config file is replaced by the model's, with a log line. Files written before
the record existed load with the config's keys, as before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from scripts.bundle_args import check_command_line_keys, command_line_keys
from scripts.config import as_bool
from scripts.errors import ConfigError

from .weights import read_checkpoint

__all__ = ["NETWORK_KEYS", "WINDOW_KEYS", "LABEL_KEYS", "RECORD_KEYS", "ONNX_RECORD_KEY", "model_record", "stored_record",
           "trained_settings"]

logger = logging.getLogger(__name__)

NETWORK_KEYS = ("num_classes", "encoder_name", "encoder_kwargs", "n_skip", "skip_channels", "decoder_channels",
                "embed_dim", "hybrid")
WINDOW_KEYS = ("roi_size", "image_scale")
# What the classes are called (background first): whole-slide GeoJSON names its features by them. Unlike the keys
# above, a value given on the command line wins over the record, since renaming classes changes no computation.
LABEL_KEYS = ("class_names",)
RECORD_KEYS = NETWORK_KEYS + WINDOW_KEYS + LABEL_KEYS
# Name of the ONNX metadata entry that holds the record as JSON.
ONNX_RECORD_KEY = "mpamatch_config"


def _normalised(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in ("skip_channels", "decoder_channels", "roi_size"):
        return [int(v) for v in value]
    if key == "encoder_kwargs":
        return dict(value or {})
    if key == "hybrid":
        return as_bool(value, key)
    if key == "image_scale":
        return float(value)
    if key in ("num_classes", "n_skip", "embed_dim"):
        return int(value)
    if key == "class_names":
        return [str(v) for v in value]
    return value


def model_record(**settings: Any) -> dict:
    """The record stored in ``model.pt`` under ``config``: the given network and window keys, normalised.

    Example (train.json): ``"$scripts.networks.model_record(encoder_name=@encoder_name, roi_size=@roi_size, ...)"``
    """
    unknown = sorted(set(settings) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"model_record: {unknown} are not network, window or label keys ({RECORD_KEYS}).")
    return {key: _normalised(key, value) for key, value in settings.items()}


def stored_record(path: str | os.PathLike, key: str = "ckpt_path") -> dict | None:
    """The record of a ``model.pt`` (its ``config`` entry) or of an exported ``.onnx`` file (its metadata), or None."""
    if str(path).lower().endswith(".onnx"):
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as err:
            raise ConfigError(f"ONNX model '{path}' ('{key}') cannot be read: it is truncated, corrupt or not an ONNX "
                              "file. Export it again with python -m scripts.cli export-onnx.") from err
        text = {entry.key: entry.value for entry in model.metadata_props}.get(ONNX_RECORD_KEY)
        return json.loads(text) if text else None
    record = read_checkpoint(path, key).get("config")
    return dict(record) if isinstance(record, Mapping) else None


def _shown(settings: Mapping[str, Any], keys) -> str:
    return ", ".join(f"{key}={settings.get(key)!r}" for key in keys)


def trained_settings(ckpt_path: str | os.PathLike, settings: Mapping[str, Any], key: str = "ckpt_path",
                     enabled: bool | str = True, argv: list[str] | None = None) -> dict:
    """The config's network, window and label keys, with those recorded in ``ckpt_path`` in their place (a label
    key given on the command line keeps its value).

    Args:
        ckpt_path: the trained ``model.pt`` or exported ``.onnx``; when it does not exist (yet) or ``enabled`` is
            false, ``settings`` are returned as they are.
        settings: the config's values of ``RECORD_KEYS`` (or some of them).
        key: the config key naming ``ckpt_path``, for the messages. Defaults to ``"ckpt_path"``.
        enabled: false for a backend that does not read ``ckpt_path`` (ONNX). Defaults to True.
        argv: the arguments to look for explicit keys in (after ``python -m monai.bundle``, or overrides alone).
            Defaults to this process's ``monai.bundle`` command line (``scripts.bundle_args``), whose keys are
            checked first: MONAI's export commands (``onnx_export``, ...) run no ``initialize``, and with
            ``inference.json`` this is the first code of ours they reach.

    Raises:
        ConfigError: a key given on the command line contradicts the record or is defined by no config file, or
            ``num_classes`` differs (the post-processing and outputs are built from it, so it is never replaced
            silently).
    """
    if argv is None:
        check_command_line_keys()
    settings = {name: _normalised(name, value) for name, value in settings.items()}
    if not as_bool(enabled, "enabled") or not Path(ckpt_path).is_file():
        return settings
    stored = stored_record(ckpt_path, key)
    if stored is None:
        logger.info("%s holds no network record (written by an older version); the config's network keys are used.",
                    ckpt_path)
        return settings
    stored = {name: _normalised(name, value) for name, value in stored.items() if name in settings}
    differing = [name for name, value in stored.items() if settings[name] != value]
    explicit = command_line_keys(argv)
    renamed = [name for name in differing if name in explicit and name in LABEL_KEYS]
    for name in renamed:  # the command line's names win; nothing is computed from them
        logger.info("%s was trained with %s; %s from the command line is used.", ckpt_path, _shown(stored, [name]),
                    _shown(settings, [name]))
        del stored[name]
    differing = [name for name in differing if name not in renamed]
    refused = [name for name in differing if name in explicit or name == "num_classes"]
    if refused:
        raise ConfigError(
            f"Model '{ckpt_path}' was trained with {_shown(stored, refused)}, but this run asks for "
            f"{_shown(settings, refused)}. The model rebuilds its own network and window: drop "
            f"{', '.join('--' + name for name in refused if name != 'num_classes') or 'these overrides'}"
            f"{' and set num_classes to the trained count' if 'num_classes' in refused else ''}, or point '{key}' at "
            "a model trained with the values you want."
        )
    if differing:
        logger.info("Network and window from %s: %s (the config had %s).", ckpt_path, _shown(stored, differing),
                    _shown(settings, differing))
    return {**settings, **stored}
