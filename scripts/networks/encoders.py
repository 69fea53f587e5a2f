"""ViT encoders for UNI-TransUNet: named presets kept as data, one factory, strict local weight loading.

A preset is a timm model name plus the keyword arguments that give the architecture of a published
checkpoint. Weights are never downloaded: ``pretrained=False`` always, and a local file is loaded on request.
``check_encoder_weights`` (``python -m scripts.cli check-weights``) checks a downloaded file against a preset without
allocating the network: the encoder is built on the meta device and the file's tensors are assigned to it.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from scripts.errors import ConfigError

from .weights import describe_state, nonfinite_keys, read_state_dict, state_misfit, strip_prefix

__all__ = ["ENCODER_PRESETS", "build_encoder", "load_encoder_weights", "check_encoder_weights", "encoder_patch_size"]

# Each preset: the timm architecture name and the kwargs that reproduce a checkpoint's layout.
# `dynamic_img_size=True` and `num_classes=0` are added to every preset by `build_encoder`.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # UNI v1 (MahmoodLab): ViT-L/16, 1024-d tokens, 24 blocks, layer scale 1e-5.
    "uni": {"model_name": "vit_large_patch16_224", "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5}},
    # UNI2-h: ViT-H/14 with SwiGLU MLPs and 8 register tokens, 1536-d tokens.
    "uni2-h": {
        "model_name": "vit_giant_patch14_224",
        "kwargs": {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
        },
    },
    # CPU presets: random-initialised demos and tests.
    "vit_small": {"model_name": "vit_small_patch16_224", "kwargs": {"img_size": 224, "patch_size": 16}},
    "vit_tiny": {"model_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 224, "patch_size": 16}},
    # The UNI2-h token layout (patch 14, register tokens) at tiny width, so CPU tests cover it.
    "vit_tiny_reg_p14": {
        "model_name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 224, "patch_size": 14, "reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5},
    },
}

# Layer classes cannot live in JSON configs; presets name them and this table resolves the names.
_LAYERS = {"swiglu_packed": SwiGLUPacked}


def _is_timm_vit(name: str) -> bool:
    return name in timm.list_models("vit_*") or name in timm.list_models("*_vit_*")


def build_encoder(name: str, **overrides: Any) -> VisionTransformer:
    """Builds a randomly initialised timm ViT from a preset name or a timm ViT model name.

    Args:
        name: a key of ``ENCODER_PRESETS`` (``uni``, ``uni2-h``, ``vit_small``, ``vit_tiny``, ``vit_tiny_reg_p14``)
            or any timm ViT architecture name such as ``vit_base_patch16_224``.
        overrides: keyword arguments merged over the preset's (for example ``depth=2`` for a quick test).

    Raises:
        ConfigError: when the name is neither a preset nor a timm ViT, or the model built is not a ViT.
    """
    if name in ENCODER_PRESETS:
        preset = ENCODER_PRESETS[name]
        model_name, kwargs = preset["model_name"], {**preset["kwargs"], **overrides}
    elif _is_timm_vit(name):
        model_name, kwargs = name, dict(overrides)
    else:
        raise ConfigError(
            f"Unknown encoder name '{name}' (config key 'encoder_name'). Use one of the presets "
            f"{sorted(ENCODER_PRESETS)} or a timm ViT architecture name, e.g. 'vit_base_patch16_224' "
            "(python -c \"import timm; print(timm.list_models('vit_*'))\" lists them)."
        )
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = _LAYERS[kwargs["mlp_layer"]]
    kwargs.update(dynamic_img_size=True, num_classes=0)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"Encoder '{name}' builds a {type(model).__name__}, not a plain timm VisionTransformer; "
            "UNI-TransUNet needs a ViT encoder (config key 'encoder_name')."
        )
    return model


def encoder_patch_size(encoder: VisionTransformer) -> int:
    """The square patch size of a timm ViT (16 for UNI, 14 for UNI2-h)."""
    patch = encoder.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ConfigError(f"Encoder patch size {tuple(patch)} is not square; UNI-TransUNet supports square patches.")
    return int(patch[0])


def load_encoder_weights(encoder: torch.nn.Module, path: str | os.PathLike, preset: str) -> None:
    """Loads a local weights file into ``encoder`` strictly: every key present, none extra, every shape equal.

    Args:
        encoder: the timm ViT built by ``build_encoder``.
        path: the local weights file.
        preset: the encoder name the file is expected to match; named in the error.

    Raises:
        ConfigError: listing missing keys, unexpected keys and shape mismatches when the file does not fit, and the
            preset the file fits instead when there is one.
    """
    encoder.load_state_dict(_fitting_state(encoder.state_dict(), path, preset), strict=True)


def check_encoder_weights(path: str | os.PathLike, name: str = "uni") -> str:
    """Checks that a local weights file loads strictly into encoder ``name`` and describes it, without allocating the
    encoder (it is built on the meta device and takes the file's tensors): what ``check-weights`` prints.

    Args:
        path: the local weights file, e.g. UNI's ``pytorch_model.bin``.
        name: a preset of ``ENCODER_PRESETS`` or a timm ViT name. Defaults to ``"uni"``.

    Raises:
        ConfigError: the file is missing or unreadable, does not fit (missing, unexpected and mis-shaped keys, and
            the preset it fits instead when there is one), or holds NaN / infinite values.
    """
    with torch.device("meta"):
        encoder = build_encoder(name)
    state = _fitting_state(encoder.state_dict(), path, name)
    damaged = nonfinite_keys(state)
    if damaged:
        raise ConfigError(f"Weights file '{path}' fits encoder '{name}' but holds NaN or infinite values in "
                          f"{len(damaged)} tensors ({', '.join(damaged[:5])}); download it again.")
    encoder.load_state_dict(state, strict=True, assign=True)  # the strict load that training does
    patch = encoder_patch_size(encoder)
    model_name = ENCODER_PRESETS[name]["model_name"] if name in ENCODER_PRESETS else name
    return (f"Encoder weights '{path}' fit encoder '{name}' (timm {model_name}: {len(encoder.blocks)} blocks, "
            f"width {encoder.embed_dim}, {encoder.blocks[0].attn.num_heads} heads, patch {patch}, "
            f"{encoder.num_reg_tokens} register tokens): {describe_state(path, state)}. Windows (roi_size) must be "
            f"multiples of {patch}, e.g. [{patch * round(256 / patch)},{patch * round(256 / patch)}].")


def _fitting_state(expected: dict[str, torch.Tensor], path: str | os.PathLike, preset: str) -> dict[str, torch.Tensor]:
    """The file's state dict when it has exactly the keys and shapes of ``expected``; else a ConfigError."""
    # UNI checkpoints are saved from the bare encoder; a few exporters prefix the keys.
    state = strip_prefix(read_state_dict(path), ("module.", "encoder.", "model."))
    problems = state_misfit(expected, state)
    if problems:
        fits = _preset_of(state)
        hint = (f"It fits preset '{fits}': set 'encoder_name' to '{fits}'." if fits else
                "Check that 'encoder_name' names the architecture the weights were trained with (presets: "
                f"{sorted(ENCODER_PRESETS)}) and that 'encoder_kwargs' is {{}} for a published file.")
        raise ConfigError(f"Weights file '{path}' does not fit encoder preset '{preset}': {problems}. {hint}")
    return state


def _preset_of(state: dict[str, torch.Tensor]) -> str | None:
    """The preset whose keys and shapes ``state`` has exactly, if any (built on the meta device: no memory)."""
    for name in ENCODER_PRESETS:
        with torch.device("meta"):
            expected = build_encoder(name).state_dict()
        if not state_misfit(expected, state):
            return name
    return None
