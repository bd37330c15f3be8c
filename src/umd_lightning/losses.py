"""The MR-Pretrain / TD-Calib losses (UMD_SPEC 2.3) and the optional image-text contrastive loss, as small
functions with their shapes.

Each masked loss averages over masked positions only: padding and visible positions never count.
"""

from __future__ import annotations

import torch
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


def soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Cross-entropy of each row of ``logits`` (Q, C) against a target spread evenly over the row's positives
    (``positives`` (Q, C) bool, at least one per row); with one positive per row it is plain cross-entropy."""
    target = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def itc_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    keys: Tensor,
    all_image: Tensor | None = None,
    all_text: Tensor | None = None,
    all_keys: Tensor | None = None,
) -> Tensor:
    """L_ITC: InfoNCE both ways over the true pairs, ``(L_i2t + L_t2i) / 2``.

    Image ``i`` and text ``i`` are a pair. Each local image is scored against every candidate text (and each local
    text against every candidate image) by ``scale * cosine``; a candidate is a positive when its caption key
    equals the query's, so a caption that several images share is never a negative for them (ALBEF's soft
    targets over equal ids).

    Args:
        image: (B, d) unit image features of this process's pairs.
        text: (B, d) unit text features of the same pairs.
        scale: 0-d, ``1 / temperature``.
        keys: (B,) int64 caption identity of each pair (equal captions, equal keys).
        all_image: (N, d) the candidate images (every process's batch under DDP); ``None``: ``image``.
        all_text: (N, d) the candidate texts; ``None``: ``text``.
        all_keys: (N,) their keys; ``None``: ``keys``.
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    all_keys = keys if all_keys is None else all_keys
    positives = keys[:, None] == all_keys[None, :]
    i2t = soft_cross_entropy(scale * image.float() @ all_text.float().T, positives)
    t2i = soft_cross_entropy(scale * text.float() @ all_image.float().T, positives)
    return (i2t + t2i) / 2


_KEY_PRIMES = (2_147_483_647, 2_147_483_629)
"""Two moduli below 2^31 for :func:`caption_keys` (each product stays below 2^62)."""


def caption_keys(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) int64 identity of each tokenised caption (B, L): two polynomial hashes of its real tokens, so equal
    captions get equal keys whatever their padding, and different ones collide with negligible probability."""
    ids = input_ids.long() * attention_mask.long()
    positions = torch.arange(ids.shape[-1], device=ids.device)
    halves = []
    for prime, base in zip(_KEY_PRIMES, (1_000_003, 998_244_353)):
        powers = torch.ones_like(positions)
        for i in range(1, ids.shape[-1]):
            powers[i] = powers[i - 1] * base % prime
        halves.append(((ids % prime) * powers % prime).sum(dim=-1) % prime)
    return halves[0] * _KEY_PRIMES[1] + halves[1]


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
