"""Loading a trained checkpoint into the network a config builds, with errors that say what to change."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from scripts.errors import ConfigError

__all__ = ["load_trained_weights"]


def load_trained_weights(network: nn.Module, ckpt: str | os.PathLike, key: str = "ckpt_path") -> nn.Module:
    """Loads ``ckpt`` (a bundle ``model.pt``, or a checkpoint dict with a ``model`` entry) strictly into ``network``.

    Args:
        network: the network the config builds.
        ckpt: the checkpoint file.
        key: the config key or option that named ``ckpt``, for the error messages. Defaults to ``"ckpt_path"``.
    """
    if not Path(ckpt).is_file():
        raise ConfigError(f"Checkpoint '{ckpt}' does not exist ('{key}'). Train first "
                          "(python -m monai.bundle run training --config_file bundle/configs/train.json) or point "
                          f"'{key}' at a trained model.pt.")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"Checkpoint '{ckpt}' does not fit the network built from the config: {str(err).splitlines()[0]} Pass the "
            "network overrides used in training (e.g. --encoder_name, --skip_channels)."
        ) from err
    return network
