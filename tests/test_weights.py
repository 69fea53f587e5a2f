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


# ------------------------------------------------------------------------------------- check-weights before a run
def published_vit(width, patch, positions, mlp_hidden, mlp_out_in, reg_tokens=0, depth=24):
    """Key names and shapes of a published UNI-family state dict, written from the model cards' architectures (not
    from our presets), filled with one expanded constant per tensor so that a full-size file takes kilobytes."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, positions, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    if reg_tokens:
        shapes["reg_token"] = (1, reg_tokens, width)
    for i in range(depth):
        block = f"blocks.{i}."
        shapes.update({block + name: shape for name, shape in {
            "norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
            "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
            "ls1.gamma": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
            "mlp.fc1.weight": (mlp_hidden, width), "mlp.fc1.bias": (mlp_hidden,),
            "mlp.fc2.weight": (width, mlp_out_in), "mlp.fc2.bias": (width,), "ls2.gamma": (width,)}.items()})
    return {key: torch.tensor(0.5).expand(shape) for key, shape in shapes.items()}


# UNI: ViT-L/16 with layer scale, a class token whose position is embedded (14 x 14 + 1 positions at 224).
UNI_STATE = published_vit(1024, 16, 197, 4096, 4096)
# UNI2-h: ViT-H/14, SwiGLU MLP packed in one fc1 (2 x 4096), 8 register tokens, no class position (16 x 16 at 224).
UNI2H_STATE = published_vit(1536, 14, 256, 8192, 4096, reg_tokens=8)


@pytest.mark.parametrize("name,state,patch,window", [("uni", UNI_STATE, 16, 256), ("uni2-h", UNI2H_STATE, 14, 252)])
def test_check_accepts_the_published_layouts_and_describes_them(tmp_path, name, state, patch, window):
    from scripts.networks import check_encoder_weights

    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    report = check_encoder_weights(path, name)
    values = sum(value.numel() for value in state.values())
    assert values == {"uni": 303_350_784, "uni2-h": 681_394_176}[name]  # the model cards' 303 M and 681 M
    assert f"fit encoder '{name}'" in report and f"{len(state)} tensors, {values:,} values, dtype float32" in report
    assert f"patch {patch}" in report and f"multiples of {patch}, e.g. [{window},{window}]" in report


def test_check_refuses_a_file_of_another_architecture_by_name(tmp_path):
    from scripts.networks import check_encoder_weights

    path = tmp_path / "uni2h.bin"
    torch.save(UNI2H_STATE, path)
    with pytest.raises(ConfigError) as err:
        check_encoder_weights(path, "uni")
    message = str(err.value)
    assert f"Weights file '{path}' does not fit encoder preset 'uni'" in message
    assert "unexpected keys (1): reg_token" in message
    assert "shape mismatches (342): blocks.0.attn.proj.bias (file (1536,), model (1024,))" in message
    assert "It fits preset 'uni2-h': set 'encoder_name' to 'uni2-h'." in message

    torch.manual_seed(0)  # a real small ViT of UNI's key layout, with random values, is not UNI either
    torch.save(build_encoder("vit_tiny").state_dict(), path)
    with pytest.raises(ConfigError, match=r"missing keys \(192\): blocks.0.ls1.gamma.*It fits preset 'vit_tiny'"):
        check_encoder_weights(path, "uni")


def test_check_loads_a_small_vit_and_refuses_damaged_values(tmp_path):
    from scripts.networks import check_encoder_weights

    torch.manual_seed(0)
    state = build_encoder("vit_tiny").state_dict()
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    assert "fit encoder 'vit_tiny' (timm vit_tiny_patch16_224: 12 blocks, width 192, 3 heads" in \
        check_encoder_weights(path, "vit_tiny")
    state["blocks.3.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=r"NaN or infinite values in 1 tensors \(blocks.3.attn.qkv.weight\)"):
        check_encoder_weights(path, "vit_tiny")


def test_check_weights_command_prints_the_report_or_exits_with_the_error(tmp_path):
    from scripts.cli import check_weights
    from tests.helpers import run_python

    good, bad = tmp_path / "uni.bin", tmp_path / "uni2h.bin"
    torch.save(UNI_STATE, good)
    torch.save(UNI2H_STATE, bad)
    assert check_weights(str(good), "uni").startswith(f"Encoder weights '{good}' fit encoder 'uni'")
    result = run_python(["-m", "scripts.cli", "check-weights", "--encoder_name", "uni", "--encoder_weights", bad])
    assert result.returncode == 1
    assert f"ERROR: Weights file '{bad}' does not fit encoder preset 'uni'" in result.stderr


def test_check_of_conch_files(tmp_path):
    from scripts.cli import check_weights
    from scripts.networks.conch import CONCH_TEXT_CFG
    from tests.helpers import CONCH_TINY, conch_state, write_conch_tokenizer

    folder = tmp_path / "conch"
    folder.mkdir()
    torch.save(conch_state(CONCH_TEXT_CFG, constant=True), folder / "pytorch_model.bin")  # the full-size layout
    with pytest.raises(ConfigError, match=r"has no conch_byte_level_bpe_uncased.json; .*CONCH's code repository"):
        check_weights(conch_dir=str(folder))
    write_conch_tokenizer(folder / "conch_byte_level_bpe_uncased.json")
    report = check_weights(conch_dir=str(folder))
    assert "fit CONCH's text tower (12 layers, width 768, 12 heads, 512-d output)" in report
    assert "CONCH's special tokens present" in report

    torch.save(conch_state(CONCH_TINY), folder / "pytorch_model.bin")  # a tiny tower is not CONCH's
    with pytest.raises(ConfigError, match=r"do not fit CONCH's text tower .*shape mismatches \(\d+\): text.cls_emb "
                                          r"\(file \(32,\), model \(768,\)\)"):
        check_weights(conch_dir=str(folder))
    with pytest.raises(ConfigError, match="needs a file to check"):
        check_weights()
