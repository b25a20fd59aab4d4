"""Loss functions shared by the bases: soft Dice for the mask, weighted cross-entropy for TI-RADS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -1  # label of a sample without TI-RADS


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice per image on sigmoid probabilities, averaged over the batch.

    ``eps`` smooths both numerator and denominator, so an empty target with an empty
    prediction costs 0 and the loss is defined for every image.
    """
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    denom = prob.sum(1) + target.sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def weighted_ce(logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
    """Cross-entropy with per-class weights; samples labelled ``IGNORE`` do not count.

    Returns 0 (still attached to the graph) for a batch without any labelled sample.
    """
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, weight=class_weights.to(logits.device), ignore_index=IGNORE)


def class_weights(labels: torch.Tensor | list[int], num_classes: int) -> Tensor:
    """Inverse-frequency weights normalised to mean 1 over the classes present; 0 for absent ones."""
    labels = torch.as_tensor(labels)
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    present = counts > 0
    return weights / weights[present].mean() if present.any() else torch.ones(num_classes)
