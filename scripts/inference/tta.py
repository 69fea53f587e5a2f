"""Flip test-time augmentation around any MONAI inferer."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.inferers import Inferer

from scripts.config import as_bool

__all__ = ["FlipTTAInferer"]


class FlipTTAInferer(Inferer):
    """Runs ``inferer`` on the image and on its flips, flips each result back and averages the logits.

    Args:
        inferer: the inferer to wrap, e.g. a ``SlidingWindowInferer``.
        flips: the spatial flips, as lists of dims of the B x C x H x W input (``[]`` is the image itself).
            Defaults to identity, vertical, horizontal and both.
        enabled: with False this is the plain inferer (config key ``tta``). Defaults to True.
    """

    def __init__(self, inferer: Inferer, flips: Sequence[Sequence[int]] = ((), (2,), (3,), (2, 3)), enabled: bool = True):
        super().__init__()
        self.inferer = inferer
        self.flips = [tuple(f) for f in flips] if as_bool(enabled, "tta") else [()]

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = None
        for dims in self.flips:
            view = torch.flip(inputs, dims) if dims else inputs
            out = self.inferer(view, network, *args, **kwargs)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        return total / len(self.flips)
