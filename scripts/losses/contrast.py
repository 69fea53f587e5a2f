"""Pixel-to-prototype contrast: InfoNCE of pixel embeddings against one prototype per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototype_infonce", "sample_pixels_per_class"]


def sample_pixels_per_class(target: torch.Tensor, keep: torch.Tensor, num_classes: int, max_per_class: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices of at most ``max_per_class`` kept pixels of each class, drawn without replacement.

    Bounding the pixels per class bounds memory and stops the background class from dominating the loss.

    Args:
        target: class index per pixel (any shape).
        keep: bool mask of the same shape, the pixels that may be drawn.
        num_classes: number of classes.
        max_per_class: the bound per class.
        generator: random generator for the draw. Defaults to torch's global one.
    """
    flat_target, flat_keep = target.reshape(-1), keep.reshape(-1)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(flat_keep & (flat_target == c), as_tuple=False).squeeze(1)
        if idx.numel() > max_per_class:
            perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_per_class].to(idx.device)
            idx = idx[perm]
        chosen.append(idx)
    return torch.cat(chosen)


def prototype_infonce(embeddings: torch.Tensor, target: torch.Tensor, prototypes: torch.Tensor,
                      temperature: float | torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``-log softmax_c(z . P_c / temperature)[target]``.

    Args:
        embeddings: N x D L2-normalised pixel embeddings.
        target: N class indices.
        prototypes: C x D L2-normalised prototypes (image or text).
        temperature: a float or a scalar tensor (e.g. ``1 / logit_scale.exp()``).

    Returns a zero that keeps the graph when ``N == 0``.
    """
    if embeddings.shape[0] == 0:
        return embeddings.sum() * 0.0 + prototypes.sum() * 0.0
    logits = embeddings @ prototypes.t() / temperature
    return F.cross_entropy(logits, target)
