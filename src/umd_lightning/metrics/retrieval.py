"""Image-text retrieval recall from a full score matrix (UMD_SPEC 4.1, the reference protocol).

Relevance is string equality of captions: a data set may give several images the same caption, and then each
of those images is a correct answer for that caption (and the caption, wherever it occurs in the text list,
for each of them).

Ties are resolved pessimistically: a query's rank is the number of irrelevant candidates scoring **at least**
as high as its best relevant candidate, and it is a hit at ``k`` when that rank is below ``k``. The result
thus does not depend on the order of the lists, and a model that gives every pair the same score gets no hits
(unless fewer than ``k`` irrelevant candidates exist).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK = 1024
"""Queries ranked at a time, so a ROCO-sized test split (about 8k x 8k) does not build several N x N masks."""


def recall_at_k(
    scores: Tensor, image_captions: Sequence[str], texts: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions.

    Args:
        scores: (N_img, N_txt) cross-encoder score of every image-text pair, higher = better match.
        image_captions: N_img captions, one per image (its ground truth).
        texts: N_txt candidate texts (usually the split's captions, repeats allowed).
        ks: the cut-offs.

    Returns:
        ``i2t_r{k}`` (fraction of images with a text equal to their caption among the top k texts),
        ``t2i_r{k}`` (fraction of texts with an image whose caption equals the text among the top k images),
        for each ``k``, and ``rsum``, the sum of all of them; fractions in [0, 1].

    Raises:
        ValueError: shapes disagree, or an image or text has no relevant candidate at all.
    """
    if scores.dim() != 2 or scores.shape != (len(image_captions), len(texts)):
        raise ValueError(
            f"scores must be (N_img, N_txt) = ({len(image_captions)}, {len(texts)}), got {tuple(scores.shape)}"
        )
    ids: dict[str, int] = {}
    image_ids = torch.tensor([ids.setdefault(caption, len(ids)) for caption in image_captions])
    text_ids = torch.tensor([ids.setdefault(text, len(ids)) for text in texts])
    scores = scores.detach().float().cpu()
    i2t_rank = _ranks(scores, image_ids, text_ids)
    t2i_rank = _ranks(scores.T, text_ids, image_ids)
    if (i2t_rank < 0).any() or (t2i_rank < 0).any():
        raise ValueError("every image caption must occur among the texts and every text among the image captions")
    result = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_r{k}"] = (rank < k).float().mean().item()
    result["rsum"] = sum(result.values())
    return result


def _ranks(scores: Tensor, query_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """Per query (row of ``scores``), how many irrelevant candidates score >= its best relevant one.

    Relevant means the same caption id. Returns (N_query,) int64, ``-1`` for a query without a relevant one.
    """
    ranks = []
    for start in range(0, scores.shape[0], _CHUNK):
        block = scores[start : start + _CHUNK]
        relevant = query_ids[start : start + _CHUNK, None] == candidate_ids[None, :]
        best = block.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((block >= best) & ~relevant).sum(dim=1)
        ranks.append(torch.where(relevant.any(dim=1), rank, torch.full_like(rank, -1)))
    return torch.cat(ranks)
