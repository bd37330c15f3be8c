"""The optional image-text contrastive (ITC) term that MR-Pretrain, TD-Calib and retrieval fine-tuning share: the
head's features of a batch's true pairs, gathered over the DDP processes with their gradients, and InfoNCE both
ways (:func:`umd_lightning.losses.itc_loss`)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from umd_lightning import losses
from umd_lightning.models.heads import ITCHead


def gather_with_grad(module: pl.LightningModule, rows: Tensor) -> Tensor:
    """Every process's ``rows`` (B_r, ...) concatenated in rank order, the gradient flowing back to each
    process's own rows (Lightning's ``all_gather(sync_grads=True)``). Processes may hold different numbers of rows
    (a batch that lost samples to ``on_error: skip``): they are padded to the longest for the gather and cut after.
    One process (or no trainer) returns ``rows`` unchanged."""
    if module._trainer is None or module.trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(rows.shape[0], device=rows.device)).flatten()
    longest = int(counts.max())
    padded = F.pad(rows, [0, 0] * (rows.dim() - 1) + [0, longest - rows.shape[0]])
    gathered = module.all_gather(padded, sync_grads=rows.requires_grad)
    return torch.cat([gathered[rank, : int(count)] for rank, count in enumerate(counts)])


def itc_term(
    module: pl.LightningModule,
    head: ITCHead,
    image_tokens: Tensor,
    text_tokens: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    gather: bool,
) -> Tensor:
    """L_ITC of a batch of true pairs.

    Args:
        module: the stage (for the DDP gather).
        head: the ITC head.
        image_tokens: (B, M, D) embedded image tokens (``UMDBackbone.embed_image``).
        text_tokens: (B, L, D) embedded caption tokens (``UMDBackbone.embed_text``) of the same pairs.
        input_ids: (B, L) the captions' token ids (their keys tell equal captions apart from different ones).
        attention_mask: (B, L).
        gather: score against every process's pairs (training); ``False`` keeps to the local batch (evaluation,
            where processes need not run the same number of batches).
    """
    image = head.image_features(image_tokens)
    text = head.text_features(text_tokens, attention_mask)
    keys = losses.caption_keys(input_ids, attention_mask)
    if not gather:
        return losses.itc_loss(image, text, head.scale, keys)
    return losses.itc_loss(
        image,
        text,
        head.scale,
        keys,
        all_image=gather_with_grad(module, image),
        all_text=gather_with_grad(module, text),
        all_keys=gather_with_grad(module, keys),
    )
