"""Every weights file the product reads: published weights (encoders, text towers) and its own checkpoints.

- ``read_state_dict``: a published state dict (``.bin``, ``.pth``, ``.pt``, ``.safetensors``), unwrapped from a
  single ``state_dict`` / ``model`` / ``network`` key; ``strip_prefix`` drops a prefix that all keys share;
  ``state_misfit`` is the one report of missing, unexpected and mis-shaped keys that every strict load gives.
- ``read_checkpoint``: a checkpoint this product wrote (``model.pt``, ``checkpoint.pt``) or a colleague's file;
  ``load_trained_weights`` loads its network weights strictly, ``initialised`` starts training from one.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors), so a file cannot run code, and a
missing, truncated, corrupt or foreign file stops with an error that names it and says what to do instead of an
unpickling traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from scripts.errors import ConfigError

__all__ = ["read_state_dict", "strip_prefix", "state_misfit", "nonfinite_keys", "describe_state", "read_checkpoint",
           "load_trained_weights", "initialised", "TRAIN_FIRST"]

logger = logging.getLogger(__name__)

TRAIN_FIRST = ("Train first (python -m monai.bundle run training --config_file bundle/configs/train.json) or point "
               "'{key}' at a trained model.pt.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a published state dict from ``.bin``, ``.pth``, ``.pt`` or ``.safetensors`` without executing
    pickled code.

    A checkpoint that wraps its weights under a single ``state_dict``, ``model`` or ``network`` key is unwrapped.

    Raises:
        ConfigError: for a missing file, an unsupported suffix or a file that holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Weights file '{path}' does not exist. Download the weights yourself (UNI's are gated on the "
            "Hugging Face hub) and set 'encoder_weights' to the local file's path, or set it to null to train "
            "from random initialisation."
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif suffix in (".bin", ".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated file or a pickle with non-tensor objects
            raise ConfigError(f"Cannot read weights file '{path}': {err}") from err
    else:
        raise ConfigError(f"Weights file '{path}' has suffix '{suffix}'; use .bin, .pth, .pt or .safetensors.")
    for wrapper in ("state_dict", "model", "network"):
        if isinstance(state, Mapping) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"Weights file '{path}' does not hold a state dict of tensors.")
    return dict(state)


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` without the ``prefixes`` that every key starts with, taken off in their order (exporters and
    DataParallel wrappers add ``module.``, ``encoder.``, ``model.``; ``module.encoder.x`` loses both); a prefix not
    shared by all keys is left alone."""
    for prefix in prefixes:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def state_misfit(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    """Empty when ``state`` has exactly the keys and shapes of ``expected``; else its missing, unexpected and
    mis-shaped keys (at most ``limit`` of each named), for the error of a strict load."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
                        for key in set(expected) & set(state) if state[key].shape != expected[key].shape)
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return "; ".join(f"{kind} ({len(keys)}): " + ", ".join(keys[:limit])
                     + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                     for kind, keys in kinds if keys)


def nonfinite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` whose floating-point tensor holds a NaN or an infinity (a damaged download or export)."""
    def distinct(value: torch.Tensor) -> torch.Tensor:  # a broadcast (stride-0) dimension repeats one value
        return value[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in value.stride())]

    return sorted(key for key, value in state.items()
                  if value.is_floating_point() and not bool(torch.isfinite(distinct(value)).all()))


def describe_state(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> str:
    """One line on a weights file: its size, how many tensors and values it holds and their dtypes."""
    size = Path(path).expanduser().stat().st_size
    dtypes = sorted({str(value.dtype).removeprefix("torch.") for value in state.values()})
    values = sum(value.numel() for value in state.values())
    return (f"a {size / 2 ** 20:,.1f} MiB file; {len(state)} tensors, {values:,} values, "
            f"dtype {', '.join(dtypes) or 'none'}")


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path", remedy: str | None = None) -> dict:
    """Reads the dict saved in ``path`` with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        key: the config key or option that named ``path``, for the error messages. Defaults to ``"ckpt_path"``.
        remedy: what the user should do when the file is unusable. Defaults to training a model first.

    Raises:
        ConfigError: the file is missing, empty, truncated or corrupt, holds Python objects other than tensors and
            plain types (which could run code), or is not a dict.
    """
    remedy = remedy or TRAIN_FIRST.format(key=key)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Checkpoint '{path}' does not exist ('{key}'). {remedy}")
    if path.stat().st_size == 0:
        raise ConfigError(f"Checkpoint '{path}' is empty (0 bytes; a copy or a save was cut short). {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise ConfigError(f"Checkpoint '{path}' cannot be read: {err.strerror}. Fix its permissions.") from err
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err):  # torch names the class it refused to unpickle
            reason = ("holds Python objects besides tensors and plain values, which are not unpickled because they "
                      "can run code; re-save it as torch.save({'model': network.state_dict()}, path)")
        else:
            reason = f"is truncated, corrupt or not a PyTorch file ({type(err).__name__}: {first[:200]})"
        raise ConfigError(f"Checkpoint '{path}' {reason}. {remedy}") from err
    if not isinstance(state, dict):
        raise ConfigError(f"Checkpoint '{path}' holds a {type(state).__name__}, not a dict of weights. {remedy}")
    return state


def load_trained_weights(network: nn.Module, ckpt: str | os.PathLike, key: str = "ckpt_path") -> nn.Module:
    """Loads ``ckpt`` (a bundle ``model.pt``, or a checkpoint dict with a ``model`` entry) strictly into ``network``.

    Args:
        network: the network the config builds.
        ckpt: the checkpoint file.
        key: the config key or option that named ``ckpt``, for the error messages. Defaults to ``"ckpt_path"``.
    """
    full = read_checkpoint(ckpt, key)
    state = full.get("model", full)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(f"Checkpoint '{ckpt}' ('{key}') has no network weights (no 'model' entry of tensors). "
                          + TRAIN_FIRST.format(key=key))
    problems = state_misfit(network.state_dict(), state, limit=4)
    if problems:
        if isinstance(full.get("config"), dict):
            advice = (f"The file records its network ({full['config']}); build the network from that record "
                      "(evaluate.json, inference.json and export-onnx do) or check the file was not altered.")
        else:
            advice = ("It holds no record of its network (written by an older version): give the network keys used "
                      "in training, e.g. --encoder_name, --skip_channels (training, evaluation, export-onnx) or "
                      "--model_overrides \"{'encoder_name': ..., 'skip_channels': ...}\" (inference).")
        raise ConfigError(f"Checkpoint '{ckpt}' does not fit the network built from the config ({problems}). {advice}")
    network.load_state_dict(state, strict=True)
    return network


def initialised(network: nn.Module, init_weights: str | os.PathLike | None = None) -> nn.Module:
    """``network`` with the weights of a trained ``model.pt`` when ``init_weights`` names one (fine-tuning a trained
    model on new labels; config key ``init_weights``), else unchanged. The file must fit the network exactly."""
    if init_weights:
        load_trained_weights(network, init_weights, "init_weights")
        logger.info("Network initialised from %s", init_weights)
    return network
