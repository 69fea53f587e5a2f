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

__all__ = ["build_text_tower", "encode_text_features", "pooled_positions"]


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


def encode_text_features(model: nn.Module, custom_text: bool, token_ids: torch.Tensor,
                         positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pooled, projected text features; CoCa-style towers also return token features, which are dropped.

    Args:
        model: a tower from ``build_text_tower``.
        custom_text: the tower is ``model.text`` (CONCH, CoCa) rather than ``model.encode_text`` (CLIP).
        token_ids: B x L token ids.
        positions: ``pooled_positions(model, custom_text, token_ids)`` for these ``token_ids``: the transformer runs
            over those positions only, which gives the same features (to float rounding) at a fraction of the cost.
            Defaults to None (the tower's own forward over every position).
    """
    if positions is None:
        features = model.text(token_ids) if custom_text else model.encode_text(token_ids)
        return features[0] if isinstance(features, tuple) else features
    kept, pooled = positions
    tower, x, mask, _, _ = _tower_inputs(model, custom_text, token_ids)
    x = x[:, kept]
    if mask is not None:
        mask = mask[..., kept[:, None], kept]
    x = tower.transformer(x, attn_mask=mask)
    # ln_final normalises each position alone, so pooling before it (CLIP normalises all, then pools) is exact
    x = tower.ln_final(x[torch.arange(x.shape[0], device=x.device), pooled])
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def pooled_positions(model: nn.Module, custom_text: bool,
                     token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The positions the pooled text features depend on, when they are fewer than the tower's whole sequence.

    A tower pools one position per text (CLIP: the end token; CoCa and CONCH: the class embedding appended last),
    and its attention mask decides which positions reach it: with CLIP's causal mask none after the end token, with
    CoCa's causal and padding masks none of the padding but the first. Prompts of a few words in a context of 77
    (CLIP) or 128 (CONCH) positions leave most of them out. The positions kept are the union over the texts of what
    each pooled position attends to, layer after layer, and every kept position attends only to kept ones, so each
    computes in ``encode_text_features`` what it computes in the whole sequence.

    Returns ``(kept, pooled)``: the sorted positions to run (over the token ids, then the appended class embedding if
    any) and, per text, the index of its pooled position among them; None when every position counts or the tower
    is not an open_clip ``CLIP`` / ``TextTransformer`` whose embedding, mask and pooling are read here.
    """
    from open_clip.transformer import text_global_pool

    with torch.no_grad():
        inputs = _tower_inputs(model, custom_text, token_ids)
    if inputs is None:
        return None
    _, x, mask, pool_type, eos_id = inputs
    batch, length = x.shape[:2]
    order = torch.arange(length, device=x.device)
    pooled = text_global_pool(order[None, :, None].expand(batch, -1, 1), token_ids, pool_type, eos_id)
    if mask is None or not mask.is_floating_point() or pooled.ndim != 2:
        return None  # attention over everything, a mask of another form, or features of every position
    allowed = mask > float("-inf")  # query x key: L x L shared, or (B * heads) x L x L as CoCa's
    if allowed.ndim == 2:
        allowed = allowed.expand(batch, -1, -1)
    else:
        allowed = allowed.reshape(batch, -1, length, length).any(1)
    needed = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
    needed[torch.arange(batch, device=x.device), pooled[:, 0]] = True
    while True:  # what the needed positions attend to is needed one layer down
        grown = needed | (needed[:, :, None] & allowed).any(1)
        if torch.equal(grown, needed):
            break
        needed = grown
    keep = needed.any(0)
    if bool(keep.all()) or bool((allowed[:, keep][:, :, ~keep]).any()):
        return None  # nothing to leave out, or a kept position attends to one left out
    kept = order[keep]
    return kept, torch.searchsorted(kept, pooled[:, 0].contiguous())


def _tower_inputs(model: nn.Module, custom_text: bool, token_ids: torch.Tensor):
    """What the tower's transformer blocks receive: ``(tower, x, attn_mask, pool_type, eos_id)``, or None for a tower
    of another kind. ``x`` holds every position (B x L x width, plus CoCa's class embedding)."""
    from open_clip.transformer import TextTransformer

    if custom_text:
        tower = model.text
        if not isinstance(tower, TextTransformer):
            return None
        x, mask = tower._embeds(token_ids)
        pool_type = "last" if tower.cls_emb is not None else tower.pool_type
        return tower, x, mask, pool_type, getattr(tower, "eos_id", None)
    if not all(hasattr(model, name) for name in ("attn_mask", "positional_embedding", "text_pool_type", "ln_final")):
        return None
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(token_ids).to(cast) + model.positional_embedding.to(cast)
    return model, x, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None)
