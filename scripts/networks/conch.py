"""CONCH's text tower and tokenizer, loaded offline as the frozen encoder of ``text_source: prompt``.

CONCH (Lu et al., Nature Medicine 2024) is a CoCa model. Its text tower is a causal transformer whose input gets a
learnt class embedding appended after the last token; the text feature is that last position, layer-normed and
projected to 512. open_clip's ``TextTransformer`` with ``embed_cls`` computes the same function with the same
parameter names, so the tower is built from it and the ``text.*`` tensors of CONCH's ``pytorch_model.bin`` load
into it unchanged (image tower, caption decoder and logit scale are ignored). CONCH's tokenizer is a byte-level BPE
stored as a Hugging Face ``tokenizers`` JSON file; the ``tokenizers`` package reads it, with no hub access.

Both files can sit in one folder (``CONCH_FILES``, config key ``conch_dir`` of the foundation-model recipes);
``check_conch_weights`` (``python -m scripts.cli check-weights --conch_dir``) checks them without allocating the tower.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from scripts.errors import ConfigError

from .weights import describe_state, nonfinite_keys, read_state_dict, state_misfit, strip_prefix

__all__ = ["CONCH_TEXT_CFG", "CONCH_FILES", "ConchTokenizer", "ConchText", "build_conch_text_tower",
           "load_conch_text_weights", "check_conch_weights", "conch_file"]

# CONCH's published text config (conch_ViT-B-16.json). context_length counts the appended class-embedding slot.
CONCH_TEXT_CFG = {"context_length": 128, "vocab_size": 32007, "width": 768, "heads": 12, "layers": 12, "embed_dim": 512}
# Parts of the CONCH checkpoint that the text branch never uses.
IGNORED_PREFIXES = ("visual.", "text_decoder.", "logit_scale")
SPECIAL_TOKENS = {"bos": "<start_of_text>", "eos": "<end_of_text>", "pad": "<pad>"}
TOKENIZER_HINT = ("CONCH's tokenizer file is conch_byte_level_bpe_uncased.json, in the "
                  "conch/open_clip_custom/tokenizers/ folder of CONCH's code repository")
WEIGHTS_HINT = ("CONCH's weights file is pytorch_model.bin, downloaded once from its gated Hugging Face page "
                "(MahmoodLab/conch, README 'UNI and CONCH weights')")
# The two files of a CONCH folder (config key ``conch_dir``): the Hugging Face download and the tokenizer beside it.
CONCH_FILES = {"weights": ("pytorch_model.bin", WEIGHTS_HINT),
               "tokenizer": ("conch_byte_level_bpe_uncased.json", TOKENIZER_HINT)}


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
    if not tokenizer:
        raise ConfigError(f"text_arch 'conch' needs the tokenizer file: set 'text_tokenizer'. {TOKENIZER_HINT}.")
    cfg = _text_cfg(text_cfg)
    token_ids = ConchTokenizer(tokenizer, cfg["context_length"] - 1)  # the last position holds the class embedding
    _check_vocabulary(token_ids, tokenizer, cfg)
    model = _conch_text(cfg, token_ids.pad_id)
    if weights:
        load_conch_text_weights(model, weights)
    model.requires_grad_(False)
    model.eval()
    return model, token_ids


def _text_cfg(text_cfg: dict | None) -> dict:
    unknown = sorted(set(text_cfg or {}) - set(CONCH_TEXT_CFG))
    if unknown:
        raise ConfigError(f"text_cfg keys {unknown} do not apply to text_arch 'conch'; use {sorted(CONCH_TEXT_CFG)}.")
    return {**CONCH_TEXT_CFG, **(text_cfg or {})}


def _check_vocabulary(token_ids: ConchTokenizer, tokenizer: str | os.PathLike, cfg: dict) -> None:
    if token_ids.vocab_size > cfg["vocab_size"]:
        raise ConfigError(f"Tokenizer '{tokenizer}' has {token_ids.vocab_size} tokens, more than the tower's "
                          f"vocab_size {cfg['vocab_size']}; use CONCH's own tokenizer file.")


def _conch_text(cfg: dict, pad_id: int) -> ConchText:
    """The randomly initialised tower of text config ``cfg`` (on the current default device)."""
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=cfg["context_length"] - 1, vocab_size=cfg["vocab_size"],
                            width=cfg["width"], heads=cfg["heads"], layers=cfg["layers"], output_dim=cfg["embed_dim"],
                            embed_cls=True, pad_id=pad_id, act_layer=nn.GELU, norm_layer=nn.LayerNorm)
    return ConchText(tower)


def load_conch_text_weights(model: ConchText, path: str | os.PathLike) -> None:
    """Loads the ``text.*`` tensors of a CONCH checkpoint strictly; other parts of the CoCa model are ignored.

    Raises:
        ConfigError: naming the missing, unexpected and mis-shaped keys when the file does not fit.
    """
    model.load_state_dict(_text_state(model.state_dict(), path), strict=True)


def check_conch_weights(weights: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                        text_cfg: dict | None = None) -> str:
    """Checks that CONCH's weights file loads strictly into the text tower (built on the meta device, so nothing is
    allocated) and that the tokenizer file, when given, is CONCH's; describes both: what ``check-weights`` prints.

    Args:
        weights: CONCH's ``pytorch_model.bin``.
        tokenizer: CONCH's ``conch_byte_level_bpe_uncased.json``, or None to check the weights only.
        text_cfg: overrides of ``CONCH_TEXT_CFG`` (tests use a tiny tower); leave None for the real weights.

    Raises:
        ConfigError: a file is missing or unreadable, the weights do not fit (missing, unexpected and mis-shaped
            keys) or hold NaN / infinite values, or the tokenizer is not CONCH's.
    """
    cfg = _text_cfg(text_cfg)
    lines = []
    pad_id = 0
    if tokenizer:
        token_ids = ConchTokenizer(tokenizer, cfg["context_length"] - 1)
        _check_vocabulary(token_ids, tokenizer, cfg)
        pad_id = token_ids.pad_id
        lines.append(f"CONCH tokenizer '{tokenizer}': {token_ids.vocab_size:,} tokens, CONCH's special tokens present.")
    with torch.device("meta"):
        model = _conch_text(cfg, pad_id)
    state = _text_state(model.state_dict(), weights)
    damaged = nonfinite_keys(state)
    if damaged:
        raise ConfigError(f"Text weights '{weights}' hold NaN or infinite values in {len(damaged)} tensors "
                          f"({', '.join(damaged[:5])}); download CONCH's pytorch_model.bin again.")
    model.load_state_dict(state, strict=True, assign=True)  # the strict load that training does
    lines.insert(0, f"CONCH text weights '{weights}' fit CONCH's text tower ({cfg['layers']} layers, width "
                    f"{cfg['width']}, {cfg['heads']} heads, {cfg['embed_dim']}-d output): {describe_state(weights, state)} "
                    "in the text tower (the image tower and caption decoder are ignored).")
    if not tokenizer:
        lines.append(f"Tokenizer not checked: training with text_arch 'conch' also needs it ({TOKENIZER_HINT}).")
    return "\n".join(lines)


def conch_file(folder: str | os.PathLike | None, kind: str) -> str | None:
    """The path of CONCH's ``kind`` file (``"weights"`` or ``"tokenizer"``, see ``CONCH_FILES``) in ``folder``, or None
    when ``folder`` is None (no CONCH: the recipes then keep a random text tower).

    Raises:
        ConfigError: ``folder`` is not a folder or lacks the file; the message says where the file comes from.
    """
    if not folder:
        return None
    name, hint = CONCH_FILES[kind]
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"CONCH folder '{folder}' (config key 'conch_dir') does not exist; it must hold "
                          f"{' and '.join(file for file, _ in CONCH_FILES.values())}, or set conch_dir to null.")
    if not (path / name).is_file():
        raise ConfigError(f"CONCH folder '{folder}' (config key 'conch_dir') has no {name}; {hint}.")
    return str(path / name)


def _text_state(expected: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``text.*`` tensors of CONCH's checkpoint ``path`` when they fit ``expected`` exactly; else a ConfigError."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"Text weights file '{path}' does not exist (config key 'text_weights'); give CONCH's "
                          "pytorch_model.bin downloaded from its publisher, or null for a random tower.")
    state = strip_prefix(read_state_dict(path), ("module.",))  # module.: saved from a DataParallel wrapper
    state = {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)}
    problems = state_misfit(expected, state)
    if problems:
        raise ConfigError(
            f"Text weights '{path}' do not fit CONCH's text tower (text_arch 'conch'): {problems}. Give CONCH's "
            "pytorch_model.bin as downloaded, with 'text_cfg' null."
        )
    return state
