"""What a trained model remembers, and the one path from that record to the network and its window.

``RECORD_FIELDS`` is the one description of the keys that shape the network (``NETWORK_KEYS``), the sliding window
and image scale it was trained at (``WINDOW_KEYS``) and what its classes are called (``LABEL_KEYS``): each key's
kind, the value a new training takes when no config sets it, how its value is read and, for a network key, the
``UNITransUNet`` argument it sets. A new key is one more line there: training records it in ``model.pt`` (the
``config`` entry, ``model_record``), evaluation, folder and whole-slide inference, export, the Deploy app and
MONAI Label read it back (``trained_settings``, ``stored_record``) and build the network from it
(``network_from_record``).

Which value wins, for a model file that holds a record (one rule, decided from the values alone):

- A key the run's config does not give (``inference.json`` gives none unless ``model_overrides`` names it): the
  record's.
- ``num_classes``, when given: it must equal the record's (outputs and post-processing are built from it), else the
  run is refused.
- Other network and window keys, when given: the record's. A value that differs from the record and from the
  default of a new training was chosen (on the command line, in a recipe or in a config file of your own) and
  contradicts the model: the run is refused. A default gives way to the record's value, with a log line; in
  ``model_overrides``, where every key was written by the user, a default is a choice too.
- Label keys, when given: a chosen value (not the default) renames the classes and wins, since nothing is computed
  from it; the default gives way to the record's names.

A file written before the record existed, or no file (yet), uses the config's values over the defaults of a new
training. Fine-tuning (``train.json``'s ``init_weights``) follows the same rule, so a fine-tuned model keeps the
network and window of the model it starts from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from scripts.bundle_args import check_command_line_keys
from scripts.config import as_bool
from scripts.errors import ConfigError

from .weights import read_checkpoint

__all__ = ["RecordField", "RECORD_FIELDS", "NETWORK_KEYS", "WINDOW_KEYS", "LABEL_KEYS", "RECORD_KEYS", "ONNX_RECORD_KEY",
           "DEFAULT_RECORD", "model_record", "config_settings", "stored_record", "trained_settings",
           "network_from_record"]

logger = logging.getLogger(__name__)


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value]


def _mapping(value: Any) -> dict:
    return dict(value or {})


def _bool(value: Any) -> bool:
    return as_bool(value, "hybrid")


@dataclass(frozen=True)
class RecordField:
    """One key of a model's record.

    Attributes:
        name: the config key (``--name value`` for a new training) and the record's entry.
        kind: ``"network"`` (shapes the network), ``"window"`` (the sliding window and image scale) or ``"label"``
            (names only).
        default: the value of a new training that sets none (as ``train.json`` shows it).
        read: turns a config or JSON value into the recorded one (``[96, 96]`` from a tuple, ``1.0`` from ``1``).
        argument: the ``UNITransUNet`` argument a network key sets; None for the others.
    """

    name: str
    kind: str
    default: Any
    read: Callable[[Any], Any]
    argument: str | None = None


RECORD_FIELDS: tuple[RecordField, ...] = (
    RecordField("num_classes", "network", 2, int, "out_channels"),
    RecordField("encoder_name", "network", "vit_small", str, "encoder_name"),
    RecordField("encoder_kwargs", "network", {}, _mapping, "encoder_kwargs"),
    RecordField("n_skip", "network", 3, int, "n_skip"),
    RecordField("skip_channels", "network", [256, 128, 64], _ints, "skip_channels"),
    RecordField("decoder_channels", "network", [128, 64, 32, 16], _ints, "decoder_channels"),
    RecordField("embed_dim", "network", 512, int, "embed_dim"),
    RecordField("hybrid", "network", False, _bool, "hybrid"),
    RecordField("roi_size", "window", [96, 96], _ints),
    RecordField("image_scale", "window", 1.0, float),
    # Whole-slide GeoJSON names its features by these (background first).
    RecordField("class_names", "label", ["background", "gland"], _strings),
)


def _fields() -> dict[str, RecordField]:
    return {field.name: field for field in RECORD_FIELDS}


def _keys(kind: str) -> tuple[str, ...]:
    return tuple(field.name for field in RECORD_FIELDS if field.kind == kind)


NETWORK_KEYS = _keys("network")
WINDOW_KEYS = _keys("window")
LABEL_KEYS = _keys("label")
RECORD_KEYS = NETWORK_KEYS + WINDOW_KEYS + LABEL_KEYS
DEFAULT_RECORD = {field.name: field.default for field in RECORD_FIELDS}
# Name of the ONNX metadata entry that holds the record as JSON.
ONNX_RECORD_KEY = "mpamatch_config"


def _normalised(key: str, value: Any) -> Any:
    field = _fields().get(key)
    return value if value is None or field is None else field.read(value)


def model_record(**settings: Any) -> dict:
    """A full record: every key of ``RECORD_FIELDS``, the given values (normalised) over the defaults of a new
    training. Stored in ``model.pt`` under ``config`` and in an exported ONNX file's metadata.

    Example (train.json): ``"$scripts.networks.model_record(encoder_name=@encoder_name, roi_size=@roi_size, ...)"``

    Raises:
        ValueError: a key that is no network, window or label key.
    """
    fields = _fields()
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"model_record: {unknown} are not network, window or label keys ({sorted(fields)}).")
    return {name: _normalised(name, settings.get(name, field.default)) for name, field in fields.items()}


def config_settings(parser, overrides: Mapping[str, Any] | None = None) -> dict:
    """The record keys a parsed config gives: those it (a recipe, a config of your own) sets as top-level keys, then
    those of its ``model_overrides``, then ``overrides`` (None values left out). ``model_record`` of them is the
    record of a new network; ``trained_settings`` takes them as the config's side.

    Args:
        parser: a ``monai.bundle.ConfigParser`` that has read the config files.
        overrides: record keys that win over the config's (e.g. a benchmark's ``encoder_name``).
    """
    given = {key: parser.get_parsed_content(key) for key in _fields() if parser.get(key) is not None}
    if parser.get("model_overrides") is not None:
        given.update(checked_overrides(parser.get_parsed_content("model_overrides")))
    return {**given, **{key: value for key, value in (overrides or {}).items() if value is not None}}


def checked_overrides(overrides: Any, key: str = "model_overrides") -> dict:
    """``overrides`` as a dict of record keys, or a ``ConfigError`` that names ``key`` and the keys it may hold."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"'{key}' is {overrides!r}; give a JSON object of record keys, e.g. "
                          f"{{\"class_names\": [\"background\", \"gland\"]}}.")
    unknown = sorted(set(overrides) - set(_fields()))
    if unknown:
        raise ConfigError(f"'{key}' has {unknown}, which are not network, window or label keys; it takes "
                          f"{list(_fields())}. Other inference keys (e.g. sw_batch_size) are set on their own.")
    return dict(overrides)


def network_from_record(record: Mapping[str, Any], **training: Any):
    """The ``UNITransUNet`` a record describes: its network keys become the network's arguments.

    Args:
        record: a full record (``model_record``, ``trained_settings``); window and label keys are ignored.
        training: arguments that shape no trained weights (``encoder_weights``, ``freeze_encoder``,
            ``freeze_blocks``, ``grad_checkpointing``), for a new training.

    Examples::

        "network_def": "$scripts.networks.network_from_record(@model_settings)"
    """
    from .transunet import UNITransUNet

    arguments = {field.argument: _normalised(field.name, record[field.name])
                 for field in RECORD_FIELDS if field.argument is not None}
    return UNITransUNet(**arguments, **training)


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


def trained_settings(ckpt_path: str | os.PathLike | None, settings: Mapping[str, Any] | None = None,
                     key: str = "ckpt_path", enabled: bool | str = True, explicit: bool = False) -> dict:
    """The record a run builds its network and window from: that of ``ckpt_path``, with the config's values where
    the rule in this module's docstring lets them win.

    Args:
        ckpt_path: the trained ``model.pt`` or exported ``.onnx`` (or, for fine-tuning, ``init_weights``); when it
            is None, does not exist (yet), holds no record or ``enabled`` is false, the config's values (over the
            defaults of a new training) are the record.
        settings: the record keys the config gives (some or all; ``model_record`` of them, ``model_overrides``);
            the keys it leaves out take the record's values. Defaults to none.
        key: the config key naming ``ckpt_path``, for the messages. Defaults to ``"ckpt_path"``.
        enabled: false for a backend that does not read ``ckpt_path`` (ONNX). Defaults to True.
        explicit: every key of ``settings`` was written by the user (``model_overrides``), so a value equal to a
            new training's default is a choice too: it renames, or it is refused when it contradicts the record.
            Defaults to False (``settings`` holds a config's values, defaults included).

    Returns:
        A full record (every key of ``RECORD_FIELDS``).

    Raises:
        ConfigError: a chosen network or window key contradicts the record, a given ``num_classes`` differs (the
            post-processing and outputs are built from it, so it is never replaced silently), or ``settings`` has a
            key that is no record key. MONAI's export commands run no ``initialize`` and reach this first, so the
            unknown keys of their command line are checked here too
            (``scripts.bundle_args.check_command_line_keys``).
    """
    check_command_line_keys(record_keys=RECORD_KEYS)
    given = checked_overrides(settings)
    config = model_record(**given)
    if ckpt_path is None or not as_bool(enabled, "enabled") or not Path(ckpt_path).is_file():
        return config
    stored = stored_record(ckpt_path, key)
    if stored is None:
        logger.warning("%s holds no network record (written by an older version): the network and window are the "
                       "config's (%s). If its training used others, give them in model_overrides.", ckpt_path,
                       _shown(config, [name for name in RECORD_KEYS if name in given] or ["encoder_name", "roi_size"]))
        return config
    fields = _fields()
    stored = {name: _normalised(name, value) for name, value in stored.items() if name in fields}
    differing = [name for name, value in stored.items() if config[name] != value]
    chosen = [name for name in differing if name in given and (explicit or config[name] != model_record()[name])]
    renamed = [name for name in chosen if fields[name].kind == "label"]
    for name in renamed:  # the chosen names win; nothing is computed from them
        logger.info("%s was trained with %s; the config's %s is used.", ckpt_path, _shown(stored, [name]),
                    _shown(config, [name]))
        del stored[name]
    refused = [name for name in differing
               if name not in renamed and (name in chosen or (name == "num_classes" and name in given))]
    if refused:
        raise ConfigError(
            f"Model '{ckpt_path}' was trained with {_shown(stored, refused)}, but this run asks for "
            f"{_shown(config, refused)}. The model rebuilds its own network and window: drop "
            f"{', '.join('--' + name for name in refused if name != 'num_classes') or 'these overrides'}"
            f"{' and set num_classes to the trained count' if 'num_classes' in refused else ''} (from the command "
            f"line, the recipe, model_overrides or your config file), or point '{key}' at a model trained with the "
            "values you want."
        )
    replaced = [name for name in differing if name not in renamed]
    if replaced:
        logger.info("Network and window from %s: %s (a new training's %s).", ckpt_path, _shown(stored, replaced),
                    _shown(config, replaced))
    return {**config, **stored}
