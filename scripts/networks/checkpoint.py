"""Reading checkpoint files safely, and loading a trained checkpoint into the network a config builds.

Every checkpoint the product reads (``model.pt``, ``checkpoint.pt``, a colleague's file) goes through
``read_checkpoint``: ``torch.load(weights_only=True)``, so a file cannot run code, and a truncated, corrupt or
foreign file stops with an error that names it and says what to do instead of an unpickling traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from scripts.errors import ConfigError

__all__ = ["read_checkpoint", "load_trained_weights", "initialised"]

logger = logging.getLogger(__name__)

TRAIN_FIRST = ("Train first (python -m monai.bundle run training --config_file bundle/configs/train.json) or point "
               "'{key}' at a trained model.pt.")


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
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        if isinstance(full.get("config"), dict):
            advice = (f"The file records its network ({full['config']}); build the network from that record "
                      "(evaluate.json, inference.json and export-onnx do) or check the file was not altered.")
        else:
            advice = "Pass the network overrides used in training (e.g. --encoder_name, --skip_channels)."
        raise ConfigError(
            f"Checkpoint '{ckpt}' does not fit the network built from the config ({details[:400]}). {advice}"
        ) from err
    return network


def initialised(network: nn.Module, init_weights: str | os.PathLike | None = None) -> nn.Module:
    """``network`` with the weights of a trained ``model.pt`` when ``init_weights`` names one (fine-tuning a trained
    model on new labels; config key ``init_weights``), else unchanged. The file must fit the network exactly."""
    if init_weights:
        load_trained_weights(network, init_weights, "init_weights")
        logger.info("Network initialised from %s", init_weights)
    return network
