"""Image-text retrieval (UMD_SPEC 4.1): cross-entropy over each image's candidate captions (the true one first) of
a ``Linear(2D, 1)`` head; evaluation scores every image against every caption of the split (R@1/5/10 both ways);
prediction ranks the test captions for each image.

Everything the evaluation needs arrives explicitly: the split and its tokenised captions from the DataModule's
``eval_captions(stage)``, the backbone and head from the stage."""

from __future__ import annotations

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


class RetrievalTask(FineTuneTask):
    """Holds the evaluation split, its encoded captions and the scores gathered over an epoch."""

    name = "retrieval"

    def __init__(self) -> None:
        self.split: Any = None
        self.text: tuple[Tensor, Tensor] | None = None
        self.scores: list[tuple[Tensor, Tensor]] = []

    def build_head(self, joint: int, num_outputs: int | None) -> nn.Module:
        return RetrievalHead(joint)

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), target), target

    def gm_coord_features(self, h_t: Tensor, h_v: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        # One row per image, its candidates side by side.
        return h_t.view(batch_size, -1, h_t.shape[-1]), h_v.view(batch_size, -1, h_v.shape[-1])

    def prepare_evaluation(self, module: FineTune, stage: str) -> None:
        split, input_ids, attention_mask = module.trainer.datamodule.eval_captions(
            "validate" if stage == "val" else "test"
        )
        self.split = split
        self.text = (input_ids.to(module.device), attention_mask.to(module.device))
        self.scores = []

    @torch.no_grad()
    def score_images(self, module: FineTune, batch: dict[str, Any]) -> Tensor:
        """Cross-encoder scores (B, T) of each image in the batch against every caption of the split."""
        input_ids, attention_mask = self.text
        chunk = module.hparams.text_chunk
        images = module.backbone.embed_image(batch["pixel_values"])
        rows = []
        for image in images:
            row = []
            for start in range(0, input_ids.shape[0], chunk):
                ids = input_ids[start : start + chunk]
                mask = attention_mask[start : start + chunk]
                text = module.backbone.embed_text(ids, mask)
                out = module.backbone.fuse(text, mask, image.unsqueeze(0).expand(ids.shape[0], -1, -1))
                row.append(module.head(out.pooled).float())
            rows.append(torch.cat(row))
        scores = torch.stack(rows)
        self.scores.append((batch["image_index"], scores))
        return scores

    def evaluation_step(self, module: FineTune, batch: dict[str, Any], stage: str) -> None:
        self.score_images(module, batch)

    def evaluation_results(self, module: FineTune, stage: str) -> dict[str, float]:
        indices = torch.cat([i for i, _ in self.scores]).to(module.device)
        scores = torch.cat([s for _, s in self.scores]).to(module.device)
        if module.trainer.world_size > 1:
            indices, scores = gather_rows(indices), gather_rows(scores)
        # Keep one row per image, in image order (a padding sampler would repeat some).
        order = torch.argsort(indices, stable=True)
        indices, scores = indices[order], scores[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        scores = scores[first].cpu()
        split = self.split
        if scores.shape[0] != len(split.image_captions):
            raise StageError(f"scored {scores.shape[0]} images but the {stage} split has {len(split.image_captions)}")
        results = recall_at_k(scores, list(split.image_captions), list(split.captions))
        self.scores = []
        return {f"{stage}/{k}": float(v) for k, v in results.items()}

    def predict_step(self, module: FineTune, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """``{"image_index", "top10": [[caption id, score], ...]}`` per image."""
        scores = self.score_images(module, batch).detach().float().cpu()
        self.scores = []
        names = list(self.split.caption_ids)
        top = scores.topk(min(TOP_CAPTIONS, scores.shape[-1]), dim=-1)
        return [
            {
                "image_index": int(batch["image_index"][i]),
                "top10": [[names[j], round(float(s), 6)] for s, j in zip(top.values[i], top.indices[i])],
            }
            for i in range(scores.shape[0])
        ]
