"""Frozen text towers for the text prototypes: an open_clip architecture by name, or CONCH's (``conch.py``).

Only the text branch is built (no image tower), offline (``pretrained=None``), with weights from a local file. The
towers are networks like the encoders, so they live here; ``scripts.prototypes.text`` turns their features into
class prototypes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scripts.errors import ConfigError

from .conch import build_conch_text_tower
from .weights import read_state_dict, state_misfit

__all__ = ["build_text_tower", "encode_text_features"]


def build_text_tower(arch: str, weights: str | os.PathLike | None = None, text_cfg: dict | None = None,
                     tokenizer_file: str | os.PathLike | None = None):
    """A frozen text tower without any image tower, weights from a local file. Returns (model, tokenizer).

    Nothing is downloaded: open_clip architectures whose text model or tokenizer comes from the Hugging Face Hub
    (``hf_model_name`` / ``hf_tokenizer_name`` in their text config: RoBERTa, mT5, NLLB, SigLIP, ...) are refused.

    Args:
        arch: ``"conch"`` for CONCH's text tower, or an open_clip architecture name, e.g. ``"ViT-B-16"``.
        weights: local checkpoint of the whole model or of its text tower; image-tower keys are ignored.
        text_cfg: overrides of the architecture's text config (e.g. fewer layers for tests).
        tokenizer_file: CONCH's tokenizer JSON; required for ``"conch"``, refused otherwise (open_clip
            architectures bring their own tokenizer).
    """
    if arch == "conch":
        return build_conch_text_tower(weights, tokenizer_file, text_cfg)
    if tokenizer_file:
        raise ConfigError(f"text_tokenizer is set, but only text_arch 'conch' reads a tokenizer file; '{arch}' "
                          "brings its own. Set text_tokenizer to null, or text_arch to 'conch'.")
    import open_clip

    if arch not in open_clip.list_models():
        raise ConfigError(
            f"Unknown text encoder architecture '{arch}' (config key 'text_arch'); use 'conch' or an open_clip name "
            "such as 'ViT-B-16' (python -c \"import open_clip; print(open_clip.list_models())\" lists them)."
        )
    base = open_clip.get_model_config(arch)["text_cfg"]
    hub_name = base.get("hf_model_name") or base.get("hf_tokenizer_name")
    if hub_name:  # open_clip would fetch this text model or tokenizer from the Hugging Face Hub
        raise ConfigError(
            f"text_arch '{arch}' takes its text model or tokenizer from the Hugging Face Hub ('{hub_name}'), and this "
            "bundle reads local files only. Use an open_clip architecture with the built-in CLIP tokenizer (e.g. "
            "'ViT-B-16'), or text_arch 'conch' with its local text_tokenizer file."
        )
    kwargs = {"text_cfg": {**base, **text_cfg}} if text_cfg else {}
    model = open_clip.create_model(arch, pretrained=None, **kwargs)
    model.visual = None  # the image tower is never used; free its memory
    if weights:
        state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("visual.")}
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
        problems = state_misfit(expected, state)
        if problems:
            raise ConfigError(
                f"Text weights '{weights}' do not fit open_clip architecture '{arch}': {problems}. Check "
                "'text_arch' (CONCH's checkpoint needs text_arch 'conch' and text_tokenizer, see docs/method.md)."
            )
        model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return model, tokenizer


def encode_text_features(model: nn.Module, custom_text: bool, token_ids: torch.Tensor) -> torch.Tensor:
    """Pooled, projected text features; CoCa-style towers also return token features, which are dropped."""
    features = model.text(token_ids) if custom_text else model.encode_text(token_ids)
    return features[0] if isinstance(features, tuple) else features
