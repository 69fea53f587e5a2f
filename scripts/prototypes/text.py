"""Text prototypes: one vector per class from a frozen text encoder fed learnable (CoOp) prompts.

Three sources, chosen by the config key ``text_source``:

- ``prompt``: a frozen text tower built offline, weights from a local file: CONCH's (``text_arch: conch``,
  ``scripts/networks/conch.py``) or an open_clip architecture by name whose checkpoint is in open_clip's own layout
  (``scripts/networks/text_towers.py``; PLIP and QuiltNet are published as Hugging Face CLIP models, which the
  strict load refuses, docs/method.md); M learnable context vectors are prepended to each class description
  ("[V1]...[VM] colon gland.") and the prototypes are recomputed at every step, so the context learns; the tower
  runs over the prompt positions its pooled feature depends on only (``pooled_positions``), not its whole context;
- ``file``: fixed prototypes read from a ``.pt`` file (``python -m scripts.cli text-prototypes`` writes one);
- ``random``: learnable random vectors. They carry no language prior, and the run says so loudly.

Every source returns L2-normalised C x D prototypes, mapped by a learnable linear layer when the encoder's width
differs from the pixel-embedding width. Export and inference never touch this module.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.config import as_bool
from scripts.errors import ConfigError
from scripts.networks.text_towers import build_text_tower, encode_text_features, pooled_positions
from scripts.networks.weights import state_misfit

__all__ = ["save_text_prototypes", "TextPrototypes", "PromptTextPrototypes", "FixedTextPrototypes", "RandomTextPrototypes",
           "build_text_prototypes"]

logger = logging.getLogger(__name__)


class TextPrototypes(nn.Module):
    """Base class: ``forward()`` returns C x ``embed_dim`` L2-normalised prototypes; ``temperature()`` their tau.

    Args:
        embed_dim: pixel-embedding width the prototypes must match.
        source_dim: width of the raw prototypes; a learnable linear map bridges a difference.
        temperature: InfoNCE temperature tau_txt. Defaults to 0.07.
        learnable_scale: learn the logit scale (CLIP-style, initialised at 1 / temperature) instead. Defaults to False.
    """

    def __init__(self, embed_dim: int, source_dim: int, temperature: float = 0.07, learnable_scale: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"text temperature={temperature} must be positive (config key 'text_temperature').")
        self.projection = nn.Linear(source_dim, embed_dim, bias=False) if source_dim != embed_dim else nn.Identity()
        self.fixed_temperature = temperature
        learnable = as_bool(learnable_scale, "text_learnable_scale")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature))) if learnable else None

    def raw_prototypes(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        return F.normalize(self.projection(self.raw_prototypes()), dim=-1)

    def temperature(self) -> torch.Tensor | float:
        if self.logit_scale is None:
            return self.fixed_temperature
        return 1.0 / self.logit_scale.clamp(max=math.log(100.0)).exp()

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """Only what training changes: a frozen text tower is rebuilt from its file, not stored in every checkpoint."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        frozen = {prefix + name for name, p in self.named_parameters() if not p.requires_grad}
        frozen |= {prefix + name for name, _ in self.named_buffers() if name.startswith("model.")}
        for key in frozen & set(full):
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        problems = state_misfit(self.state_dict(), state_dict)
        if strict and problems:
            raise KeyError(f"Text-prototype state does not fit: {problems}.")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def parameter_groups(self, lr: float) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": "text"}] if params else []


class _ContextEmbedding(nn.Module):
    """Token embedding that writes the learnable context vectors over positions 1..M of every prompt."""

    def __init__(self, embedding: nn.Embedding, ctx: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.ctx = nn.Parameter(ctx)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(token_ids)
        n_ctx = self.ctx.shape[0]
        ctx = self.ctx.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens[:, :1], ctx, tokens[:, 1 + n_ctx:]], dim=1)


class PromptTextPrototypes(TextPrototypes):
    """CoOp prompts through a frozen text tower (docs/method.md, "Text prototypes").

    Args:
        class_descriptions: one description per class, e.g. ``["background stroma", "colon gland"]``.
        embed_dim: pixel-embedding width. Defaults to 512.
        arch: ``"conch"`` or an open_clip architecture of the text tower. Defaults to ``"ViT-B-16"``.
        weights: local weights file of that architecture; None means a random tower (reported loudly).
        n_ctx: number of learnable context vectors M, shared by all classes. Defaults to 8.
        ctx_init: words whose token embeddings initialise the context (their token count sets M), or None for
            Gaussian initialisation. Defaults to None.
        ctx_std: standard deviation of the Gaussian initialisation. Defaults to 0.02.
        temperature: tau_txt. Defaults to 0.07.
        learnable_scale: learn the logit scale instead of the fixed temperature. Defaults to False.
        text_cfg: overrides of the tower's text config (tests use a 1-layer tower). Defaults to None.
        tokenizer_file: CONCH's tokenizer JSON, for ``arch="conch"`` only. Defaults to None.
    """

    def __init__(self, class_descriptions: Sequence[str], embed_dim: int = 512, arch: str = "ViT-B-16",
                 weights: str | os.PathLike | None = None, n_ctx: int = 8, ctx_init: str | None = None,
                 ctx_std: float = 0.02, temperature: float = 0.07, learnable_scale: bool = False,
                 text_cfg: dict | None = None, tokenizer_file: str | os.PathLike | None = None):
        model, tokenizer = build_text_tower(arch, weights, text_cfg, tokenizer_file)
        custom = getattr(model, "text", None) is not None
        tower = model.text if custom else model
        width = tower.token_embedding.embedding_dim
        with torch.no_grad():
            out_dim = encode_text_features(model, custom, tokenizer(["tissue"])).shape[-1]
        super().__init__(embed_dim, out_dim, temperature, learnable_scale)
        if not class_descriptions:
            raise ConfigError("class_descriptions is empty (config key 'class_descriptions'); give one per class.")
        pad_id = getattr(tokenizer, "pad_id", 0)  # open_clip's tokenizers pad with 0
        if int((tokenizer(["X"])[0] != pad_id).sum()) != 3:
            raise ConfigError(f"The '{arch}' tokenizer splits the placeholder 'X' into several tokens, so the "
                              "context vectors would not line up with the prompt; use another text_arch.")
        if ctx_init:
            init_ids = tokenizer([ctx_init])[0]
            n_ctx = int((init_ids != pad_id).sum()) - 2  # without start and end tokens
            with torch.no_grad():
                ctx = tower.token_embedding(init_ids[None])[0, 1:1 + n_ctx].clone()
        else:
            if n_ctx < 1:
                raise ConfigError(f"n_ctx={n_ctx} must be at least 1 (config key 'text_n_ctx').")
            ctx = torch.randn(n_ctx, width) * ctx_std
        prompts = [" ".join(["X"] * n_ctx) + f" {description.strip().rstrip('.')}." for description in class_descriptions]
        token_ids = tokenizer(prompts)
        self.register_buffer("token_ids", token_ids, persistent=False)
        tower.token_embedding = _ContextEmbedding(tower.token_embedding, ctx)
        # The tower runs over the positions the prototypes depend on only: the same prototypes, most of the cost gone.
        positions = pooled_positions(model, custom, token_ids)
        self.register_buffer("encoded_positions", None if positions is None else positions[0], persistent=False)
        self.register_buffer("pooled_index", None if positions is None else positions[1], persistent=False)
        self.model = model
        self.custom_text = custom
        self.has_language_prior = weights is not None
        self.class_descriptions = list(class_descriptions)
        if not self.has_language_prior:
            _warn_no_prior(f"the '{arch}' text tower has random weights (config key 'text_weights' is null)")

    @property
    def ctx(self) -> nn.Parameter:
        tower = self.model.text if self.custom_text else self.model
        return tower.token_embedding.ctx

    def raw_prototypes(self) -> torch.Tensor:
        positions = None if self.encoded_positions is None else (self.encoded_positions, self.pooled_index)
        return encode_text_features(self.model, self.custom_text, self.token_ids, positions).float()

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the frozen tower always runs as at inference
        return self


class FixedTextPrototypes(TextPrototypes):
    """Prototypes read once from a ``.pt`` file holding a C x D tensor (or ``{"prototypes": tensor}``).

    Args:
        path: the file, e.g. written by ``python -m scripts.cli text-prototypes``.
        num_classes: expected C; a file with another count is refused.
        embed_dim: pixel-embedding width (a learnable linear map bridges a different D).
        temperature, learnable_scale: as in ``TextPrototypes``.
    """

    def __init__(self, path: str | os.PathLike, num_classes: int, embed_dim: int = 512, temperature: float = 0.07,
                 learnable_scale: bool = False):
        if not os.path.isfile(path):
            raise ConfigError(
                f"Text prototype file '{path}' does not exist (config key 'text_prototype_file'); write it with "
                "python -m scripts.cli text-prototypes, or choose text_source 'prompt' or 'random'."
            )
        content = torch.load(path, map_location="cpu", weights_only=True)
        vectors = content["prototypes"] if isinstance(content, dict) else content
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] != num_classes:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ConfigError(f"Text prototype file '{path}' holds {shape}; expected a {num_classes} x D tensor.")
        super().__init__(embed_dim, vectors.shape[1], temperature, learnable_scale)
        self.register_buffer("vectors", F.normalize(vectors.float(), dim=1))
        self.has_language_prior = True

    def raw_prototypes(self) -> torch.Tensor:
        return self.vectors


class RandomTextPrototypes(TextPrototypes):
    """Learnable random prototypes: the text branch's loss without any language prior (an ablation)."""

    def __init__(self, num_classes: int, embed_dim: int = 512, temperature: float = 0.07, learnable_scale: bool = False):
        super().__init__(embed_dim, embed_dim, temperature, learnable_scale)
        self.vectors = nn.Parameter(F.normalize(torch.randn(num_classes, embed_dim), dim=1))
        self.has_language_prior = False
        _warn_no_prior("text_source is 'random'")

    def raw_prototypes(self) -> torch.Tensor:
        return self.vectors


def _warn_no_prior(reason: str) -> None:
    banner = "!" * 100
    message = (f"\n{banner}\nTEXT PROTOTYPES HAVE NO LANGUAGE PRIOR: {reason}. The text-prototype loss still runs, "
               f"but it cannot bring knowledge from language.\nGive 'text_weights' (CONCH's text tower, or an "
               f"open_clip checkpoint) or 'text_prototype_file' for the real method.\n{banner}")
    logger.warning(message)


def build_text_prototypes(source: str | None, num_classes: int, embed_dim: int, class_descriptions: Sequence[str] = (),
                          arch: str = "ViT-B-16", weights: str | None = None, prototype_file: str | None = None,
                          n_ctx: int = 8, ctx_init: str | None = None, temperature: float = 0.07,
                          learnable_scale: bool = False, text_cfg: dict | None = None,
                          tokenizer_file: str | None = None, device: str | torch.device | None = None
                          ) -> TextPrototypes | None:
    """The text-prototype module for config key ``text_source`` (``prompt``, ``file``, ``random`` or None), on
    ``device`` when given."""
    if source is None or source == "none":
        return None
    if source == "prompt":
        if len(class_descriptions) != num_classes:
            raise ConfigError(
                f"class_descriptions has {len(class_descriptions)} entries for {num_classes} classes; give one per class."
            )
        module = PromptTextPrototypes(class_descriptions, embed_dim, arch, weights, n_ctx, ctx_init,
                                      temperature=temperature, learnable_scale=learnable_scale, text_cfg=text_cfg,
                                      tokenizer_file=tokenizer_file)
    elif source == "file":
        module = FixedTextPrototypes(prototype_file or "", num_classes, embed_dim, temperature, learnable_scale)
    elif source == "random":
        module = RandomTextPrototypes(num_classes, embed_dim, temperature, learnable_scale)
    else:
        raise ConfigError(f"text_source='{source}' is not one of 'prompt', 'file', 'random' or 'none'.")
    return module.to(device) if device is not None else module


def save_text_prototypes(out: str, class_descriptions: Sequence[str], arch: str = "ViT-B-16", weights: str | None = None,
                    template: str = "a histopathology image of {}.", allow_random: bool = False,
                    tokenizer_file: str | None = None) -> str:
    """Encodes one prompt per class with a frozen text tower and saves the C x D prototypes.

    Args:
        out: output ``.pt`` file, then given to training as ``text_prototype_file``.
        class_descriptions: one description per class, e.g. ``"['background stroma','colon gland']"``.
        arch: ``conch`` or an open_clip architecture of the text tower. Defaults to ``ViT-B-16``.
        weights: local weights file of that architecture.
        template: prompt template; ``{}`` is replaced by each description.
        allow_random: permit a random tower (for testing the pipeline only). Defaults to False.
        tokenizer_file: CONCH's ``conch_byte_level_bpe_uncased.json``, for ``--arch conch`` only.
    """
    if isinstance(class_descriptions, str):
        class_descriptions = [class_descriptions]
    if not weights and not allow_random:
        raise ConfigError(
            "text-prototypes needs --weights (a local text encoder file); prototypes from a random tower carry no "
            "language prior. Pass --allow_random true only to test the pipeline."
        )
    model, tokenizer = build_text_tower(arch, weights, tokenizer_file=tokenizer_file)
    custom = getattr(model, "text", None) is not None
    prompts = [template.format(d) for d in class_descriptions]
    with torch.no_grad():
        vectors = F.normalize(encode_text_features(model, custom, tokenizer(prompts)).float(), dim=-1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prototypes": vectors, "class_descriptions": list(class_descriptions), "prompts": prompts,
                "arch": arch}, path)
    logger.info("Saved %d text prototypes of width %d to %s", *vectors.shape, path)
    return str(path)
