"""Fine-tuning losses of the official BEiT-3 recipes (§2 of the reference), as plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vqa_loss(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Official VQAv2 loss: ``BCEWithLogits(mean) * num_answers`` = the per-answer BCE summed over answers,
    averaged over the batch. logits, soft_targets: (B, num_answers)."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets.float()) * soft_targets.shape[1]


def captioning_loss(
    logits: Tensor,
    targets: Tensor,
    step: int = 0,
    label_smoothing: float = 0.1,
    drop_worst_ratio: float = 0.2,
    drop_worst_after: int = 12000,
) -> Tensor:
    """Official captioning loss (``BertCaptioningLoss``) at the masked positions.

    Target distribution ``onehot·(1-ε) + (1-onehot)·ε/(V-1)``; per-token loss ``KL(target || softmax(logits))``
    summed over the vocabulary; once ``step > drop_worst_after`` only the ``(1 - drop_worst_ratio)`` fraction of
    tokens with the smallest losses is kept; then the mean. logits: (M, V); targets: (M,) token ids.
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} masked logits but {targets.shape[0]} targets")
    vocab = logits.shape[1]
    eps = label_smoothing
    log_probs = F.log_softmax(logits.float(), dim=-1)
    one_hot = torch.zeros_like(log_probs).scatter_(1, targets.view(-1, 1), 1.0)
    target_dist = one_hot * (1 - eps) + (1 - one_hot) * eps / (vocab - 1)
    loss = F.kl_div(log_probs, target_dist, reduction="none").sum(1)
    if drop_worst_ratio > 0 and step > drop_worst_after:
        keep = max(1, int(loss.shape[0] * (1 - drop_worst_ratio)))
        loss = loss.topk(keep, largest=False).values
    return loss.mean()


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """``mean(sum(-target · log_softmax(logits)))`` — the ImageNet loss under mixup/cutmix (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-soft_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with hard (B,) or soft (B, C) targets; ``label_smoothing`` applies to hard targets."""
    if targets.dim() == 2:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


__all__ = ["captioning_loss", "classification_loss", "soft_target_cross_entropy", "vqa_loss"]
