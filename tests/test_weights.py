"""Strict loading of local encoder weights in every supported format, and the errors for files that do not fit."""

import pytest
import torch
from safetensors.torch import save_file

from scripts.errors import ConfigError
from scripts.networks import UNITransUNet, build_encoder, load_encoder_weights
from tests.helpers import TINY_DECODER


def encoder_state(name="vit_tiny", **kwargs):
    torch.manual_seed(1)
    return build_encoder(name, depth=2, **kwargs).state_dict()


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".safetensors"])
def test_weights_load_into_network(tmp_path, suffix):
    state = encoder_state()
    path = tmp_path / f"encoder{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    net = UNITransUNet(encoder_name="vit_tiny", encoder_weights=str(path), encoder_kwargs={"depth": 2}, **TINY_DECODER)
    for key, value in state.items():
        torch.testing.assert_close(net.encoder.state_dict()[key], value)


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    state = encoder_state()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    encoder = build_encoder("vit_tiny", depth=2)
    load_encoder_weights(encoder, path, "vit_tiny")
    torch.testing.assert_close(encoder.pos_embed, state["pos_embed"])
    # a wrapped wrapper: DataParallel around a model that held the encoder; both prefixes come off
    torch.save({f"module.encoder.{k}": v * 2 for k, v in state.items()}, path)
    load_encoder_weights(encoder, path, "vit_tiny")
    torch.testing.assert_close(encoder.pos_embed, state["pos_embed"] * 2)


def test_weights_of_other_architecture_listed(tmp_path):
    path = tmp_path / "reg.bin"
    torch.save(encoder_state("vit_tiny_reg_p14"), path)
    encoder = build_encoder("vit_tiny", depth=2)
    with pytest.raises(ConfigError) as err:
        load_encoder_weights(encoder, path, "vit_tiny")
    message = str(err.value)
    assert "does not fit encoder preset 'vit_tiny'" in message
    assert "unexpected keys (5): blocks.0.ls1.gamma" in message and "reg_token" in message
    assert "patch_embed.proj.weight (file (192, 3, 14, 14), model (192, 3, 16, 16))" in message


def test_missing_keys_listed(tmp_path):
    state = encoder_state()
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing keys \(1\): blocks.1.mlp.fc2.bias"):
        load_encoder_weights(build_encoder("vit_tiny", depth=2), path, "vit_tiny")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"blocks": object()}, path)
    with pytest.raises(ConfigError, match="Cannot read weights file"):
        load_encoder_weights(build_encoder("vit_tiny", depth=2), path, "vit_tiny")


def test_missing_file_and_bad_suffix(tmp_path):
    encoder = build_encoder("vit_tiny", depth=2)
    with pytest.raises(ConfigError, match="does not exist.*encoder_weights"):
        load_encoder_weights(encoder, tmp_path / "absent.bin", "vit_tiny")
    (tmp_path / "weights.ckpt").write_bytes(b"0")
    with pytest.raises(ConfigError, match="suffix '.ckpt'"):
        load_encoder_weights(encoder, tmp_path / "weights.ckpt", "vit_tiny")
