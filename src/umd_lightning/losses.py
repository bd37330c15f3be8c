"""The MR-Pretrain / TD-Calib losses (UMD_SPEC 2.3) as small functions with their shapes.

Each masked loss averages over masked positions only: padding and visible positions never count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Label of the positions that the MLM loss ignores (PyTorch's cross-entropy default); the collate writes it."""


def _masked_mean(per_position: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_position`` (B, N) over the positions where ``mask`` (B, N) is true; 0 when none is."""
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L_MIM: mean squared error over the masked patches only.

    Args:
        pred: (B, N, P) predicted pixels per patch.
        target: (B, N, P) per-patch normalised pixels.
        mask: (B, N) bool, true where the patch was masked.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return _masked_mean(per_patch, mask)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_MLM: cross-entropy over the masked token positions (labels != -100).

    Args:
        logits: (..., V), e.g. (B, L, V), or (M, V) for the masked positions only.
        labels: (...), the original token id at masked positions and -100 elsewhere.
    """
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def mlm_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of masked positions whose argmax is the original token (0 when nothing is masked)."""
    masked = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & masked
    return correct.sum().float() / masked.sum().clamp_min(1).float()


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_ITM: cross-entropy of the ITM head. ``logits`` (B, 2), ``labels`` (B,) with 1 = matched, 0 = swapped."""
    return F.cross_entropy(logits.float(), labels)


def feature_target(features: Tensor) -> Tensor:
    """Teacher features through a LayerNorm without learnable affine, detached. (..., D) -> (..., D)."""
    features = features.detach().float()
    return F.layer_norm(features, features.shape[-1:])


def feature_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L_FeaMIM / L_FeaMLM (predictive form): MSE averaged over the masked positions only.

    Args:
        pred: (B, N, D) student predictions.
        target: (B, N, D) from :func:`feature_target`.
        mask: (B, N) bool, true at masked positions.
    """
    per_position = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return _masked_mean(per_position, mask)


def reference_feamlm(projection: nn.Linear, student: Tensor, teacher: Tensor) -> Tensor:
    """The reference FeaMLM, kept for reproduction only (UMD_SPEC 2.3, ``feature_loss: reference``).

    A trainable Linear is applied to both the student's and the (detached) teacher's final text features and the
    MSE is averaged over every position, padding included. Known defect: the loss can fall by shrinking the
    projection.

    Args:
        projection: Linear D -> D.
        student: (B, L, D).
        teacher: (B, L, D).
    """
    return F.mse_loss(projection(student).float(), projection(teacher.detach()).float())


def reference_feamim(embed: nn.Linear, student_sequence: Tensor, teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """The reference FeaMIM, kept for reproduction only (UMD_SPEC 2.3, ``feature_loss: reference``).

    The student side is the decoder input after the input Linear with mask tokens inserted, so at masked
    positions it is just the mask token and no gradient reaches the encoders (the documented defect).

    Args:
        embed: the MIM decoder's input Linear D -> d_dec.
        student_sequence: (B, 1+N, d_dec) decoder input with mask tokens, class token first.
        teacher_tokens: (B, 1+N, D) teacher image stream, class token first.
        mask: (B, N) bool, true at masked patches.
    """
    target = embed(teacher_tokens.detach())[:, 1:]
    per_position = (student_sequence[:, 1:].float() - target.float()).pow(2).mean(dim=-1)
    return _masked_mean(per_position, mask)
