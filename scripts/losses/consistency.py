"""Supervised and weak-to-strong consistency losses (docs/method.md, "The losses"; UniMatch's normalisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["supervised_loss", "masked_cross_entropy", "cutmix_targets"]


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                    ce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1e-5) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * Dice`` of logits (B x C x H x W) against class indices (B x H x W).

    The Dice term is the soft Dice per image and class, averaged. Pixels where ``valid`` (B x H x W bool) is False,
    i.e. padding, count in neither term.
    """
    if valid is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    ce = F.cross_entropy(logits, target.masked_fill(~valid, -100), ignore_index=-100)
    weight = valid[:, None].to(logits.dtype)
    probs = logits.softmax(dim=1) * weight
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * weight
    dims = (2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    return ce_weight * ce + dice_weight * dice.mean()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, valid: torch.Tensor,
                         threshold: float) -> torch.Tensor:
    """Cross-entropy on confident, valid pixels, summed and divided by the number of valid pixels.

    Dividing by all valid pixels rather than by the confident ones is UniMatch's normalisation: the loss shrinks
    while few pixels are confident instead of being dominated by them.

    Args:
        logits: B x C x H x W predictions of a strong or perturbed view.
        target: B x H x W pseudo-labels.
        confidence: B x H x W maximum softmax probability behind each pseudo-label.
        valid: B x H x W bool, False where a pixel is padding.
        threshold: confidence needed for a pixel to count (tau).
    """
    loss = F.cross_entropy(logits, target, reduction="none")
    keep = (confidence >= threshold) & valid
    return (loss * keep).sum() / valid.sum().clamp_min(1)


def cutmix_targets(box: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, valid: torch.Tensor,
                   mix_target: torch.Tensor, mix_confidence: torch.Tensor, mix_valid: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inside each CutMix box the pseudo-label, confidence and validity of the mix source replace the image's own.

    All tensors are B x H x W; ``box`` is bool.
    """
    return (
        torch.where(box, mix_target, target),
        torch.where(box, mix_confidence, confidence),
        torch.where(box, mix_valid, valid),
    )
