"""CONCH's text tower and tokenizer, loaded offline as the frozen encoder of ``text_source: prompt``.

CONCH (Lu et al., Nature Medicine 2024) is a CoCa model. Its text tower is a causal transformer whose input gets a
learnt class embedding appended after the last token; the text feature is that last position, layer-normed and
projected to 512. open_clip's ``TextTransformer`` with ``embed_cls`` computes the same function with the same
parameter names, so the tower is built from it and the ``text.*`` tensors of CONCH's ``pytorch_model.bin`` load
into it unchanged (image tower, caption decoder and logit scale are ignored). CONCH's tokenizer is a byte-level BPE
stored as a Hugging Face ``tokenizers`` JSON file; the ``tokenizers`` package reads it, with no hub access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from scripts.errors import ConfigError

from .weights import read_state_dict, state_misfit, strip_prefix

__all__ = ["CONCH_TEXT_CFG", "ConchTokenizer", "ConchText", "build_conch_text_tower", "load_conch_text_weights"]

# CONCH's published text config (conch_ViT-B-16.json). context_length counts the appended class-embedding slot.
CONCH_TEXT_CFG = {"context_length": 128, "vocab_size": 32007, "width": 768, "heads": 12, "layers": 12, "embed_dim": 512}
# Parts of the CONCH checkpoint that the text branch never uses.
IGNORED_PREFIXES = ("visual.", "text_decoder.", "logit_scale")
SPECIAL_TOKENS = {"bos": "<start_of_text>", "eos": "<end_of_text>", "pad": "<pad>"}
TOKENIZER_HINT = ("CONCH's tokenizer file is conch_byte_level_bpe_uncased.json, in the "
                  "conch/open_clip_custom/tokenizers/ folder of CONCH's code repository")


class ConchTokenizer:
    """CONCH's byte-level BPE: ``<start_of_text> words <end_of_text>`` padded with ``<pad>`` to ``length`` ids.

    Normalisation (lower-casing, accent stripping) comes from the file. Long texts are cut so that the end token is
    kept, as CONCH's own tokenizer does.

    Args:
        path: CONCH's ``conch_byte_level_bpe_uncased.json``.
        length: ids per text: CONCH's context length less the slot of the appended class embedding. Defaults to 127.

    Examples::

        tokenizer = ConchTokenizer("/models/conch/conch_byte_level_bpe_uncased.json")
        ids = tokenizer(["a histopathology image of colon gland."])  # 1 x 127, int64
    """

    def __init__(self, path: str | os.PathLike, length: int = 127):
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Tokenizer file '{path}' does not exist (config key 'text_tokenizer'); {TOKENIZER_HINT}.")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise ConfigError(f"Tokenizer file '{path}' is not a tokenizers JSON file: {err}") from err
        ids = {name: self._tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
        absent = [SPECIAL_TOKENS[name] for name, token_id in ids.items() if token_id is None]
        if absent:
            raise ConfigError(f"Tokenizer file '{path}' lacks the special tokens {absent}; {TOKENIZER_HINT}.")
        if length < 3:
            raise ConfigError(f"Tokenizer length {length} leaves no room for text between start and end tokens.")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.length = length
        self.vocab_size = self._tokenizer.get_vocab_size()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        token_ids = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):  # one by one: encode_batch's thread pool warns when data workers fork
            words = self._tokenizer.encode(text, add_special_tokens=False).ids[:self.length - 2]
            ids = [self.bos_id, *words, self.eos_id]
            token_ids[row, :len(ids)] = torch.tensor(ids)
        return token_ids


class ConchText(nn.Module):
    """Holds the tower as ``.text``, so its parameter names are CONCH's checkpoint keys (``text.cls_emb``, ...)."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text


def build_conch_text_tower(weights: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                           text_cfg: dict | None = None) -> tuple[ConchText, ConchTokenizer]:
    """CONCH's text tower, weights from a local file, frozen. Returns (model, tokenizer).

    Args:
        weights: CONCH's ``pytorch_model.bin`` (the whole CoCa model); None means a random tower.
        tokenizer: CONCH's ``conch_byte_level_bpe_uncased.json``; required.
        text_cfg: overrides of ``CONCH_TEXT_CFG`` (tests use a tiny tower); leave None for the real weights.
    """
    from open_clip.transformer import TextTransformer

    if not tokenizer:
        raise ConfigError(f"text_arch 'conch' needs the tokenizer file: set 'text_tokenizer'. {TOKENIZER_HINT}.")
    unknown = sorted(set(text_cfg or {}) - set(CONCH_TEXT_CFG))
    if unknown:
        raise ConfigError(f"text_cfg keys {unknown} do not apply to text_arch 'conch'; use {sorted(CONCH_TEXT_CFG)}.")
    cfg = {**CONCH_TEXT_CFG, **(text_cfg or {})}
    n_tokens = cfg["context_length"] - 1  # the last position holds the appended class embedding
    token_ids = ConchTokenizer(tokenizer, n_tokens)
    if token_ids.vocab_size > cfg["vocab_size"]:
        raise ConfigError(f"Tokenizer '{tokenizer}' has {token_ids.vocab_size} tokens, more than the tower's "
                          f"vocab_size {cfg['vocab_size']}; use CONCH's own tokenizer file.")
    tower = TextTransformer(context_length=n_tokens, vocab_size=cfg["vocab_size"], width=cfg["width"],
                            heads=cfg["heads"], layers=cfg["layers"], output_dim=cfg["embed_dim"], embed_cls=True,
                            pad_id=token_ids.pad_id, act_layer=nn.GELU, norm_layer=nn.LayerNorm)
    model = ConchText(tower)
    if weights:
        load_conch_text_weights(model, weights)
    model.requires_grad_(False)
    model.eval()
    return model, token_ids


def load_conch_text_weights(model: ConchText, path: str | os.PathLike) -> None:
    """Loads the ``text.*`` tensors of a CONCH checkpoint strictly; other parts of the CoCa model are ignored.

    Raises:
        ConfigError: naming the missing, unexpected and mis-shaped keys when the file does not fit.
    """
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"Text weights file '{path}' does not exist (config key 'text_weights'); give CONCH's "
                          "pytorch_model.bin downloaded from its publisher, or null for a random tower.")
    state = strip_prefix(read_state_dict(path), ("module.",))  # module.: saved from a DataParallel wrapper
    state = {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)}
    problems = state_misfit(model.state_dict(), state)
    if problems:
        raise ConfigError(
            f"Text weights '{path}' do not fit CONCH's text tower (text_arch 'conch'): {problems}. Give CONCH's "
            "pytorch_model.bin as downloaded, with 'text_cfg' null."
        )
    model.load_state_dict(state, strict=True)
