"""The image-prototype memory bank: one EMA-updated, L2-normalised vector per class."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrototypeBank"]


class PrototypeBank(nn.Module):
    """Class prototypes pooled from pixel embeddings and kept as an exponential moving average.

    The prototypes are buffers: they are saved in checkpoints, move with ``.to(device)`` and never receive
    gradients. A class is updated only when the batch holds pixels of it; its first update sets it directly.

    Args:
        num_classes: number of classes.
        dim: embedding width.
        momentum: EMA momentum m in ``P <- normalise(m P + (1 - m) P_batch)``. Defaults to 0.99.

    Examples::

        bank = PrototypeBank(num_classes=2, dim=512)
        means, present = bank.batch_prototypes(embeddings, target, keep)   # N x D, N, N
        bank.update(means, present)
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1) (config key 'prototype_momentum').")
        self.num_classes = num_classes
        self.momentum = momentum
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("updates", torch.zeros(num_classes, dtype=torch.long))

    @property
    def ready(self) -> bool:
        """True once every class has a prototype."""
        return bool(self.initialized.all())

    @torch.no_grad()
    def batch_prototypes(self, embeddings: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                         reduce: Callable[..., None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised per-class mean of the kept embeddings (C x D) and which classes were present (C bool).

        Args:
            embeddings: N x D pixel embeddings.
            target: N class indices.
            keep: N bool, the pixels that count.
            reduce: called as ``reduce(sums, counts)`` on the per-class sums (C x D) and pixel counts (C) before
                the division, to add in place those of the other processes (``scripts.engines.all_reduce_sum_``),
                so that every process gets the means of the global batch. Defaults to None (this batch alone).
        """
        embeddings, target = embeddings[keep].float(), target[keep]
        onehot = F.one_hot(target, self.num_classes).float()  # N x C
        counts = onehot.sum(0)
        sums = onehot.t() @ embeddings  # C x D
        if reduce is not None:
            reduce(sums, counts)
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1)
        return means, counts > 0

    @torch.no_grad()
    def update(self, means: torch.Tensor, present: torch.Tensor) -> None:
        """EMA update of the classes in ``present`` with the batch prototypes ``means``."""
        means = means.to(self.prototypes)
        fresh = present & ~self.initialized
        blend = F.normalize(self.momentum * self.prototypes + (1.0 - self.momentum) * means, dim=1)
        updated = torch.where(fresh[:, None], means, blend)
        self.prototypes.copy_(torch.where(present[:, None], updated, self.prototypes))
        self.initialized |= present
        self.updates += present.long()

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Numbers worth logging: the largest cosine similarity between two classes' prototypes and update counts."""
        stats = {f"proto_updates_{c}": float(n) for c, n in enumerate(self.updates.tolist())}
        if self.ready and self.num_classes > 1:
            cos = self.prototypes @ self.prototypes.t()
            off_diagonal = cos[~torch.eye(self.num_classes, dtype=torch.bool, device=cos.device)]
            stats["proto_max_cosine"] = float(off_diagonal.max())
        return stats
