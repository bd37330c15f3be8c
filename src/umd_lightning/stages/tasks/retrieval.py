"""Image-text retrieval (UMD_SPEC 4.1): cross-entropy over each image's candidate captions (the true one first) of
a ``Linear(2D, 1)`` head; evaluation scores the images against the captions of the split (R@1/5/10 both ways);
prediction ranks the test captions for each image.

Two evaluation protocols (``FineTune(retrieval_eval=...)``):

- ``exhaustive`` (the paper's): the cross-encoder scores every image-caption pair, ``N x T`` fusion passes.
- ``topk`` (ALBEF's): the ITC head's cosine ranks all pairs from one tower pass per image and per caption; the
  cross-encoder re-scores each image's ``k`` best captions (image-to-text) and each caption's ``k`` best images
  (text-to-image), each pair once, about ``2 N k`` passes at most. Pairs outside a direction's top-k score
  ``-inf`` in that direction, so they rank below every re-scored one (and count as misses, as the metric breaks
  ties pessimistically).

Either way every caption goes through the text tower once per evaluation (its embedded tokens are kept for the
epoch, ``T x L x D``), not once per image. The caption-side ranking for text-to-image needs every image's ITC
feature before the first step, so ``topk`` starts an evaluation with one vision pass over the split's images
(the DataModule's ``eval_image_loader``, sharded over the DDP processes).

Everything the evaluation needs arrives explicitly: the split and its tokenised captions from the DataModule's
``eval_captions(stage)``, the backbone and heads from the stage."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from umd_lightning.errors import StageError
from umd_lightning.metrics.retrieval import recall_at_k
from umd_lightning.models.heads import RetrievalHead
from umd_lightning.stages.tasks.base import FineTuneTask

if TYPE_CHECKING:
    from umd_lightning.stages.finetune import FineTune

TOP_CAPTIONS = 10
"""Captions (with scores) in each ``umd predict`` row of a retrieval model."""


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's rows (ranks may hold different numbers of rows: evaluation samplers do not pad)."""
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(gathered, counts)])


def top_k_mask(similarity: Tensor, k: int, dim: int) -> Tensor:
    """Bool mask of the ``k`` highest entries along ``dim`` of ``similarity`` (all of them when ``k`` exceeds
    its length)."""
    k = min(k, similarity.shape[dim])
    mask = torch.zeros_like(similarity, dtype=torch.bool)
    return mask.scatter_(dim, similarity.topk(k, dim=dim).indices, True)


class RetrievalTask(FineTuneTask):
    """Holds the evaluation split, its encoded captions and the scores gathered over an epoch.

    Attributes:
        last_evaluation: the protocol and the number of pairs the cross-encoder scored in the last completed
            evaluation (``None`` before one).
    """

    name = "retrieval"

    def __init__(self) -> None:
        self.split: Any = None
        self.text: tuple[Tensor, Tensor] | None = None
        self.text_tokens: Tensor | None = None
        self.text_features: Tensor | None = None
        self.t2i_candidates: Tensor | None = None
        self.scores: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self.pairs_scored = 0
        self.last_evaluation: dict[str, Any] | None = None

    def build_head(self, joint: int, num_outputs: int | None) -> nn.Module:
        return RetrievalHead(joint)

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), target), target

    def gm_coord_features(self, h_t: Tensor, h_v: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        # One row per image, its candidates side by side.
        return h_t.view(batch_size, -1, h_t.shape[-1]), h_v.view(batch_size, -1, h_v.shape[-1])

    # ------------------------------------------------------------------------------------ evaluation
    @staticmethod
    def _top_k(module: FineTune) -> int | None:
        return module.hparams.retrieval_top_k if module.hparams.retrieval_eval == "topk" else None

    def protocol(self, module: FineTune) -> dict[str, Any]:
        """The evaluation protocol of ``module`` (and, after an evaluation, how many pairs it fused)."""
        top_k = self._top_k(module)
        described: dict[str, Any] = {
            "retrieval_eval": module.hparams.retrieval_eval,
            "retrieval_top_k": top_k,
            "ranked_by": "cross-encoder on every pair" if top_k is None else "ITC cosine, top-k re-scored",
        }
        return {**described, **(self.last_evaluation or {})}

    @staticmethod
    def _step_context(module: FineTune, stage: str) -> contextlib.AbstractContextManager:
        """The precision context the stage's steps run in (autocast under ``bf16-mixed``), so that what is
        computed when an epoch starts matches what the steps would compute."""
        plugin = getattr(module.trainer, "precision_plugin", None)
        if plugin is None:
            return contextlib.nullcontext()
        return {"val": plugin.val_step_context, "test": plugin.test_step_context}.get(
            stage, plugin.predict_step_context
        )()

    @torch.no_grad()
    def prepare_evaluation(self, module: FineTune, stage: str) -> None:
        datamodule = module.trainer.datamodule
        split, input_ids, attention_mask = datamodule.eval_captions("validate" if stage == "val" else "test")
        self.split = split
        self.text = (input_ids.to(module.device), attention_mask.to(module.device))
        self.scores = []
        self.pairs_scored = 0
        self.t2i_candidates = None
        self.text_features = None
        chunk = module.hparams.text_chunk
        with self._step_context(module, stage):
            ids, mask = self.text
            # The same chunks as the fusion's, so exhaustive scores equal those of embedding per image.
            self.text_tokens = torch.cat(
                [
                    module.backbone.embed_text(ids[start : start + chunk], mask[start : start + chunk])
                    for start in range(0, ids.shape[0], chunk)
                ]
            )
            top_k = self._top_k(module)
            if top_k is not None:
                self.text_features = module.itc_head.text_features(self.text_tokens, mask)
                if stage != "predict":  # prediction ranks captions per image only
                    self.t2i_candidates = self._caption_candidates(module, datamodule, stage, top_k)

    def _caption_candidates(self, module: FineTune, datamodule: Any, stage: str, top_k: int) -> Tensor:
        """(N, T) bool: for each caption (column), its ``top_k`` images by ITC cosine, from one vision pass over
        the split's images (each process embeds its share, then every process holds all features)."""
        rank, world = module.global_rank, module.trainer.world_size
        loader = datamodule.eval_image_loader("validate" if stage == "val" else "test", shard=(rank, world))
        dim = self.text_features.shape[1]
        indices = [torch.zeros(0, dtype=torch.long, device=module.device)]
        features = [torch.zeros(0, dim, device=module.device)]
        for batch in loader:
            pixels = batch["pixel_values"].to(module.device, non_blocking=True)
            features.append(module.itc_head.image_features(module.backbone.embed_image(pixels)))
            indices.append(batch["image_index"].to(module.device))
        index, feature = torch.cat(indices), torch.cat(features)
        if world > 1:
            index, feature = gather_rows(index), gather_rows(feature)
        count = len(self.split.image_captions)
        if index.numel() != count or set(index.tolist()) != set(range(count)):
            raise StageError(f"the ITC pass embedded {index.numel()} images but the {stage} split has {count}")
        images = torch.empty(count, dim, device=module.device)
        images[index] = feature
        return top_k_mask(images @ self.text_features.T, top_k, dim=0)

    def _fuse_rows(self, module: FineTune, images: Tensor) -> Tensor:
        """Cross-encoder scores (B, T) of each embedded image (B, M, D) against every caption."""
        _, attention_mask = self.text
        chunk = module.hparams.text_chunk
        rows = []
        for image in images:
            row = []
            for start in range(0, attention_mask.shape[0], chunk):
                text = self.text_tokens[start : start + chunk]
                mask = attention_mask[start : start + chunk]
                out = module.backbone.fuse(text, mask, image.unsqueeze(0).expand(text.shape[0], -1, -1))
                row.append(module.head(out.pooled).float())
            rows.append(torch.cat(row))
        self.pairs_scored += images.shape[0] * attention_mask.shape[0]
        return torch.stack(rows)

    def _fuse_pairs(self, module: FineTune, images: Tensor, wanted: Tensor) -> Tensor:
        """Cross-encoder scores (B, T) of the pairs where ``wanted`` (B, T) is true, ``-inf`` elsewhere; pairs of
        different images share fusion passes of ``text_chunk`` pairs."""
        _, attention_mask = self.text
        chunk = module.hparams.text_chunk
        scores = torch.full(wanted.shape, float("-inf"), device=images.device)
        rows, columns = wanted.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), chunk):
            row, column = rows[start : start + chunk], columns[start : start + chunk]
            out = module.backbone.fuse(self.text_tokens[column], attention_mask[column], images[row])
            scores[row, column] = module.head(out.pooled).float()
        self.pairs_scored += rows.numel()
        return scores

    @torch.no_grad()
    def score_images(self, module: FineTune, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Scores of each image in the batch against the split's captions: ``(i2t, t2i)``, each (B, T).

        ``exhaustive``: the cross-encoder on every pair, one matrix for both directions (``t2i`` is ``None``).
        ``topk``: ``i2t`` holds the image's top-k captions' cross-encoder scores, ``t2i`` those of the captions
        that rank this image in their top-k (``None`` when predicting), ``-inf`` elsewhere."""
        images = module.backbone.embed_image(batch["pixel_values"])
        top_k = self._top_k(module)
        if top_k is None:
            i2t, t2i = self._fuse_rows(module, images), None
        else:
            i2t_wanted = top_k_mask(module.itc_head.image_features(images) @ self.text_features.T, top_k, dim=1)
            t2i_wanted = None if self.t2i_candidates is None else self.t2i_candidates[batch["image_index"]]
            wanted = i2t_wanted if t2i_wanted is None else i2t_wanted | t2i_wanted
            scores = self._fuse_pairs(module, images, wanted)
            i2t = scores.masked_fill(~i2t_wanted, float("-inf"))
            t2i = None if t2i_wanted is None else scores.masked_fill(~t2i_wanted, float("-inf"))
        self.scores.append((batch["image_index"], i2t, t2i))
        return i2t, t2i

    def evaluation_step(self, module: FineTune, batch: dict[str, Any], stage: str) -> None:
        self.score_images(module, batch)

    def _in_image_order(self, module: FineTune, indices: Tensor, scores: Tensor) -> Tensor:
        """One row per image of the split, in image order (a padding sampler would repeat some)."""
        if module.trainer.world_size > 1:
            indices, scores = gather_rows(indices), gather_rows(scores)
        order = torch.argsort(indices, stable=True)
        indices, scores = indices[order], scores[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        return scores[first].cpu()

    def evaluation_results(self, module: FineTune, stage: str) -> dict[str, float]:
        device = module.device
        indices = torch.cat([i for i, _, _ in self.scores]).to(device)
        i2t = self._in_image_order(module, indices, torch.cat([s for _, s, _ in self.scores]).to(device))
        split = self.split
        if i2t.shape[0] != len(split.image_captions):
            raise StageError(f"scored {i2t.shape[0]} images but the {stage} split has {len(split.image_captions)}")
        captions, image_captions = list(split.captions), list(split.image_captions)
        results = recall_at_k(i2t, image_captions, captions)
        if self.scores[0][2] is not None:
            t2i = self._in_image_order(module, indices, torch.cat([s for _, _, s in self.scores]).to(device))
            by_caption = recall_at_k(t2i, image_captions, captions)
            results = {
                **{k: v for k, v in results.items() if k.startswith("i2t_")},
                **{k: v for k, v in by_caption.items() if k.startswith("t2i_")},
            }
            results["rsum"] = sum(results.values())
        pairs = torch.tensor([self.pairs_scored], device=device)
        if module.trainer.world_size > 1:
            pairs = gather_rows(pairs)
        self.last_evaluation = {
            "pairs": len(image_captions) * len(captions),
            "pairs_cross_encoded": int(pairs.sum()),
        }
        self.scores, self.text_tokens, self.text_features, self.t2i_candidates = [], None, None, None
        return {f"{stage}/{k}": float(v) for k, v in results.items()}

    def predict_step(self, module: FineTune, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """``{"image_index", "top10": [[caption id, score], ...]}`` per image (under ``topk``, the image's
        re-scored captions only, so at most ``k``)."""
        scores = self.score_images(module, batch)[0].detach().float().cpu()
        self.scores = []
        names = list(self.split.caption_ids)
        top = scores.topk(min(TOP_CAPTIONS, scores.shape[-1]), dim=-1)
        return [
            {
                "image_index": int(batch["image_index"][i]),
                "top10": [
                    [names[j], round(float(s), 6)] for s, j in zip(top.values[i], top.indices[i]) if s > float("-inf")
                ],
            }
            for i in range(scores.shape[0])
        ]
