"""UNI-TransUNet: a timm ViT encoder (UNI by default), a CNN skip branch and TransUNet's cascaded decoder.

Layout (docs/architecture.md, "UNI-TransUNet: the network")::

    image ──ViT──> tokens ─reshape─> B x D x H/p x W/p ──conv3x3──> 512 ─┐
      └──CNN stem──> skips at 1/8 (512), 1/4 (256), 1/2 (64) ────────────┤
                                                cascaded decoder (256, 128, 64, 16) ──> head ──> logits
                                                          └─ 1/2-resolution map ──> projection head ──> embeddings

With ``hybrid=True`` the CNN stem runs first and the ViT reads its 1/8-resolution map instead of the image
(TransUNet's own ResNet-ViT layout): the ViT's patch embedding then takes ``p / 8`` patches of CNN features, so the
token grid is still H/p x W/p. A pretrained ViT's patch embedding expects RGB patches, so the hybrid layout is for
encoders trained from random weights (the CPU recipe); pretrained encoders (UNI) keep the parallel stem.

The decoder resizes to each skip's exact size, so patch-14 encoders (whose grids do not double cleanly to the
input size) and non-square inputs work.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.config import as_bool
from scripts.errors import ConfigError
from scripts.networks.encoders import build_encoder, encoder_patch_size, load_encoder_weights

__all__ = ["UNITransUNet", "TransUNetOutput", "SkipStem", "CascadedDecoder", "ProjectionHead"]

_STEM_STRIDE = 8  # the skip stem's coarsest map, which the hybrid ViT reads, is at 1/8 resolution


class TransUNetOutput(NamedTuple):
    """Training-path outputs: logits (B x C x H x W), perturbed-feature logits, pixel embeddings and the projection
    head's hidden map (each None unless asked for)."""

    logits: torch.Tensor
    logits_fp: torch.Tensor | None
    embeddings: torch.Tensor | None
    embed_features: torch.Tensor | None = None


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SkipStem(nn.Module):
    """Small CNN run on the image in parallel with the ViT; returns skips at 1/8, 1/4 and 1/2 resolution.

    Args:
        channels: output channels at 1/8, 1/4 and 1/2 resolution. Defaults to TransUNet's (512, 256, 64).
    """

    def __init__(self, channels: Sequence[int] = (512, 256, 64)):
        super().__init__()
        c8, c4, c2 = channels
        self.stages = nn.ModuleList(
            [
                nn.Sequential(ConvBNReLU(3, c2 // 2, stride=2), ConvBNReLU(c2 // 2, c2)),
                nn.Sequential(ConvBNReLU(c2, c4 // 2, stride=2), ConvBNReLU(c4 // 2, c4)),
                nn.Sequential(ConvBNReLU(c4, c8 // 2, stride=2), ConvBNReLU(c8 // 2, c8)),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[::-1]


class DecoderBlock(nn.Module):
    """Resize to a target size, concatenate an optional skip, then two conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CascadedDecoder(nn.Module):
    """TransUNet's cascaded upsampler: conv3x3 to ``head_channels``, then one block per target size.

    Args:
        in_channels: width of the encoder map.
        head_channels: width after the first conv3x3. Defaults to 512.
        channels: output widths of the blocks. Defaults to (256, 128, 64, 16).
        skip_channels: skip widths fed to the blocks, in order; 0 where a block has no skip.
    """

    def __init__(
        self,
        in_channels: int,
        head_channels: int = 512,
        channels: Sequence[int] = (256, 128, 64, 16),
        skip_channels: Sequence[int] = (512, 256, 64, 0),
    ):
        super().__init__()
        if len(skip_channels) != len(channels):
            raise ConfigError(f"skip_channels {tuple(skip_channels)} must have one entry per decoder block {tuple(channels)}.")
        self.conv_more = ConvBNReLU(in_channels, head_channels)
        widths = [head_channels, *channels]
        self.blocks = nn.ModuleList(
            DecoderBlock(widths[i], widths[i + 1], skip_channels[i]) for i in range(len(channels))
        )

    def forward(
        self, x: torch.Tensor, sizes: Sequence[Sequence[int]], skips: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """Returns the output of every block, coarsest first."""
        x = self.conv_more(x)
        outputs = []
        for block, size, skip in zip(self.blocks, sizes, skips):
            x = block(x, size, skip)
            outputs.append(x)
        return outputs


class ProjectionHead(nn.Module):
    """1x1 conv - BN - ReLU - 1x1 conv, L2-normalised per pixel: the embeddings the contrastive losses use."""

    def __init__(self, in_channels: int, embed_dim: int = 512, hidden_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or in_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, embed_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B x D x h x w) of a whole hidden map."""
        return F.normalize(self.layers[3](hidden), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden map (conv - BN - ReLU, B x hidden x h x w): what ``project`` turns into embeddings."""
        return self.layers[:3](x)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (N x D) of N hidden-map pixels (N x hidden), as ``forward`` gives them.

        The last layer is a per-pixel linear map, so projecting only the pixels a loss uses equals projecting the
        whole map and picking them, without the full D-channel map and its normalisation (most of the cost of the
        contrastive terms in a training step).
        """
        last = self.layers[3]
        return F.normalize(F.linear(rows, last.weight.flatten(1), last.bias), dim=1)


class UNITransUNet(nn.Module):
    """TransUNet whose ViT is a pathology foundation encoder (UNI by default).

    Args:
        out_channels: number of classes (2 for gland / background). Defaults to 2.
        encoder_name: a preset of ``scripts.networks.ENCODER_PRESETS`` or a timm ViT name. Defaults to ``"uni"``.
        encoder_weights: local ``.bin`` / ``.pth`` / ``.safetensors`` file loaded strictly into the encoder, or
            None for random initialisation. Defaults to None.
        encoder_kwargs: extra timm keyword arguments merged over the preset (e.g. ``{"depth": 2}``). Defaults to None.
        n_skip: how many CNN skips feed the decoder, 0..3 (1/8 first, then 1/4, then 1/2). Defaults to 3.
        skip_channels: CNN skip widths at 1/8, 1/4 and 1/2 resolution. Defaults to (512, 256, 64).
        decoder_head_channels: width of the decoder's first conv3x3. Defaults to 512.
        decoder_channels: widths of the four decoder blocks. Defaults to (256, 128, 64, 16).
        embed_dim: width of the L2-normalised pixel embeddings. Defaults to 512 (CONCH / CLIP text width).
        embed_level: decoder block whose output feeds the projection head. Defaults to 2 (the 1/2-resolution map).
        fp_dropout: channel dropout rate of the feature-perturbation stream. Defaults to 0.5.
        freeze_encoder: freeze every encoder parameter. Defaults to False.
        freeze_blocks: freeze the patch embedding, tokens and the first k transformer blocks. Defaults to 0.
        grad_checkpointing: recompute encoder activations in the backward pass to save memory. Defaults to False.
        hybrid: feed the ViT with the CNN stem's 1/8-resolution features (TransUNet's ResNet-ViT hybrid) instead of
            the image; needs a patch size divisible by 8 and no ``encoder_weights``. Defaults to False.

    Examples::

        net = UNITransUNet(out_channels=2, encoder_name="vit_tiny", encoder_kwargs={"depth": 2}).eval()
        logits = net(torch.rand(1, 3, 256, 320))  # 1 x 2 x 256 x 320
        out = net.train()(torch.rand(2, 3, 256, 256), need_fp=True, need_embed=True)
        out.logits, out.logits_fp, out.embeddings  # 2x2x256x256, 2x2x256x256, 2x512x128x128
    """

    def __init__(
        self,
        out_channels: int = 2,
        encoder_name: str = "uni",
        encoder_weights: str | os.PathLike | None = None,
        encoder_kwargs: dict | None = None,
        n_skip: int = 3,
        skip_channels: Sequence[int] = (512, 256, 64),
        decoder_head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        embed_dim: int = 512,
        embed_level: int = 2,
        fp_dropout: float = 0.5,
        freeze_encoder: bool = False,
        freeze_blocks: int = 0,
        grad_checkpointing: bool = False,
        hybrid: bool = False,
    ):
        super().__init__()
        if out_channels < 2:
            raise ConfigError(f"out_channels={out_channels}: use at least 2 classes (background and foreground).")
        if not 0 <= n_skip <= 3:
            raise ConfigError(f"n_skip={n_skip} is out of range; use 0, 1, 2 or 3 CNN skips.")
        if len(skip_channels) != 3:
            raise ConfigError(f"skip_channels={tuple(skip_channels)} needs three widths (1/8, 1/4, 1/2 resolution).")
        if len(decoder_channels) != 4:
            raise ConfigError(f"decoder_channels={tuple(decoder_channels)} needs four widths, one per decoder block.")
        if not 0 <= embed_level < len(decoder_channels):
            raise ConfigError(f"embed_level={embed_level} must index a decoder block (0..{len(decoder_channels) - 1}).")
        if not 0.0 <= fp_dropout < 1.0:
            raise ConfigError(f"fp_dropout={fp_dropout} must be in [0, 1).")

        self.encoder_name = encoder_name
        self.out_channels = out_channels
        self.n_skip = n_skip
        self.embed_level = embed_level
        self.hybrid = as_bool(hybrid, "hybrid")
        freeze_encoder = as_bool(freeze_encoder, "freeze_encoder")
        if self.hybrid:
            self.encoder = self._build_hybrid_encoder(encoder_name, encoder_weights, encoder_kwargs, skip_channels)
            self.patch_size = encoder_patch_size(self.encoder) * _STEM_STRIDE
        else:
            self.encoder = build_encoder(encoder_name, **(encoder_kwargs or {}))
            if encoder_weights:
                load_encoder_weights(self.encoder, encoder_weights, encoder_name)
            self.patch_size = encoder_patch_size(self.encoder)
        if not 0 <= freeze_blocks <= len(self.encoder.blocks):
            raise ConfigError(f"freeze_blocks={freeze_blocks} must be in 0..{len(self.encoder.blocks)} for '{encoder_name}'.")
        self._freeze(freeze_encoder, freeze_blocks)
        if as_bool(grad_checkpointing, "grad_checkpointing"):
            self.encoder.set_grad_checkpointing(True)

        self.skip_stem = SkipStem(skip_channels) if (n_skip > 0 or self.hybrid) else None
        used_skips = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)] + [0]
        self.decoder = CascadedDecoder(self.encoder.embed_dim, decoder_head_channels, decoder_channels, used_skips)
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=3, padding=1)
        self.projection_head = ProjectionHead(decoder_channels[embed_level], embed_dim)
        self.fp_dropout = nn.Dropout2d(fp_dropout)

    @staticmethod
    def _build_hybrid_encoder(encoder_name: str, encoder_weights, encoder_kwargs: dict | None,
                              skip_channels: Sequence[int]):
        """The ViT of the hybrid layout: same blocks as ``encoder_name``, patch embedding over the 1/8 CNN map."""
        if encoder_weights:
            # Only the patch embedding would change, but the pretrained blocks would then read tokens from a random
            # CNN and a random projection instead of the RGB patches they were trained on: what makes UNI worth
            # loading is lost, so the combination is refused rather than half-loaded.
            raise ConfigError(
                f"hybrid=true feeds the ViT with CNN features, so the RGB patch embedding of the weights file "
                f"'{encoder_weights}' cannot be used (and its blocks would read tokens they were not trained on). "
                "A pretrained encoder takes hybrid: false: train with bundle/configs/recipes/uni.json (UNI) or "
                "uni2h.json (UNI2-h) instead of recipes/cpu.json, or set 'encoder_weights' to null to train the "
                "hybrid network from random weights."
            )
        kwargs = dict(encoder_kwargs or {})
        patch = kwargs.pop("patch_size", None) or encoder_patch_size(build_encoder(encoder_name, depth=1))
        if patch % _STEM_STRIDE:
            raise ConfigError(
                f"hybrid=true needs an encoder patch size divisible by {_STEM_STRIDE} (the CNN stem's stride); "
                f"'{encoder_name}' has {patch}. Use e.g. encoder_kwargs {{'patch_size': 16}}."
            )
        img_size = kwargs.pop("img_size", 224)
        return build_encoder(encoder_name, **kwargs, patch_size=patch // _STEM_STRIDE,
                             img_size=img_size // _STEM_STRIDE, in_chans=int(skip_channels[0]))

    def _freeze(self, freeze_encoder: bool, freeze_blocks: int) -> None:
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            return
        if freeze_blocks > 0:
            for name, param in self.encoder.named_parameters():
                if not name.startswith(("blocks.", "norm.", "fc_norm.", "head")):
                    param.requires_grad_(False)  # patch embedding, class / register tokens, position embedding
            for block in self.encoder.blocks[:freeze_blocks]:
                block.requires_grad_(False)

    def parameter_groups(self, lr: float, encoder_lr_scale: float = 0.1) -> list[dict]:
        """Optimizer groups: trainable encoder parameters at ``lr * encoder_lr_scale``, the rest at ``lr``."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        encoder_params = [p for p in self.encoder.parameters() if p.requires_grad]
        other_params = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": other_params, "lr": lr, "name": "decoder"}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": lr * encoder_lr_scale, "name": "encoder"})
        return groups

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` first: refuses it with what works instead of a compiler error deep in timm."""
        side = self._traceable_side()
        raise ConfigError(
            "UNITransUNet cannot be compiled with torch.jit.script: timm's forward_intermediates, which gives the "
            "ViT's token grid, is not scriptable. Export TorchScript by tracing (python -m monai.bundle ckpt_export "
            f"... --use_trace true --input_shape \"[1,3,{side},{side}]\"), or ONNX with python -m scripts.cli "
            "export-onnx."
        )

    def _traceable_side(self) -> int:
        """An image side whose token grid is not the encoder's native one (see ``_check_trace_size``)."""
        return (max(self.encoder.patch_embed.grid_size) + 2) * self.patch_size

    def _check_trace_size(self, x: torch.Tensor) -> None:
        """Refuses a trace at the encoder's native token grid (224 / patch): timm's ViT then leaves the position
        embedding as it is instead of resampling it, so the trace would record no resampling and fail at every
        other size. At any other size the resampling is recorded, and the trace matches the network at all sizes."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # reading the example's size is the point here
            height, width = int(x.shape[-2]), int(x.shape[-1])
        if (height // self.patch_size, width // self.patch_size) == tuple(self.encoder.patch_embed.grid_size):
            side = self._traceable_side()
            raise ConfigError(
                f"Tracing at {height}x{width}, the encoder's native size, would give a model that runs at that size "
                "only (timm's ViT skips resampling its position embedding there, and the trace would keep that). "
                f"Trace at another size, e.g. --input_shape \"[1,3,{side},{side}]\"."
            )

    def _check_size(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():
            self._check_trace_size(x)
            return
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return  # export traces with symbolic sizes; callers there pass valid shapes
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"UNITransUNet expects RGB images B x 3 x H x W, got shape {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(
                f"Input size {h}x{w} is not a multiple of the encoder patch size {self.patch_size} "
                f"('{self.encoder_name}'). Use crop / window sizes that are multiples of {self.patch_size}, "
                f"e.g. {self.patch_size * max(1, round(h / self.patch_size))}."
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The ViT map (B x D x H/p x W/p, prefix tokens dropped) and the skips used by the decoder."""
        features = self.skip_stem(x) if self.skip_stem is not None else []
        vit_input = features[0] if self.hybrid else x
        (tokens,) = self.encoder.forward_intermediates(vit_input, indices=1, norm=True, output_fmt="NCHW",
                                                       intermediates_only=True)
        skips: list[torch.Tensor | None] = [None] * 4
        for i, feature in enumerate(features[: self.n_skip]):
            skips[i] = feature
        return tokens, skips

    @staticmethod
    def _decoder_sizes(height: int, width: int) -> list[tuple[int, int]]:
        # The stem's stride-2 convolutions give ceil(size / 2) at each level; the decoder lands on the same grid.
        sizes, h, w = [], height, width
        for _ in range(3):
            h, w = (h + 1) // 2, (w + 1) // 2  # integer ceil, which also holds for symbolic sizes in export
            sizes.append((h, w))
        return sizes[::-1] + [(height, width)]

    def forward(
        self, x: torch.Tensor, need_fp: bool = False, need_embed: bool = False, need_embed_features: bool = False
    ) -> torch.Tensor | TransUNetOutput:
        """Segments ``x`` (B x 3 x H x W, H and W multiples of the patch size).

        Returns the logits tensor (B x C x H x W) by default, as bundles, ONNX export and inference expect. With
        ``need_fp``, ``need_embed`` or ``need_embed_features`` it returns a ``TransUNetOutput`` whose ``logits_fp``
        come from the same features after channel dropout, whose ``embeddings`` are L2-normalised pixel embeddings
        and whose ``embed_features`` are the projection head's hidden map, for ``projection_head.project`` on the
        pixels a loss samples (the trainer's path).
        """
        self._check_size(x)
        height, width = x.shape[-2:]
        sizes = self._decoder_sizes(height, width)
        tokens, skips = self.encode(x)
        if need_fp:
            tokens = torch.cat([tokens, self.fp_dropout(tokens)])
            skips = [None if s is None else torch.cat([s, self.fp_dropout(s)]) for s in skips]
        features = self.decoder(tokens, sizes, skips)
        logits = self.segmentation_head(features[-1])
        if not (need_fp or need_embed or need_embed_features):
            return logits
        logits_fp = None
        embed_feature = features[self.embed_level]
        if need_fp:
            logits, logits_fp = logits.chunk(2)
            embed_feature = embed_feature[: x.shape[0]]
        hidden = self.projection_head.features(embed_feature) if need_embed or need_embed_features else None
        embeddings = self.projection_head.embed(hidden) if need_embed else None
        return TransUNetOutput(logits, logits_fp, embeddings, hidden if need_embed_features else None)
