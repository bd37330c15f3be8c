"""VQA as classification over the answer vocabulary: per-answer BCE scaled by ``|A|`` (UMD_SPEC 4.1), open /
closed / overall accuracy, and the top answers with sigmoid probabilities in each prediction row."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from umd_lightning.metrics.vqa import VQAAccuracy
from umd_lightning.stages.tasks.base import LabelTask

TOP_ANSWERS = 5
"""Answers (with probabilities) in each ``umd predict`` row of a VQA model."""


class VQATask(LabelTask):
    name = "vqa"

    def build_metrics(self, num_outputs: int | None) -> tuple[Metric, Metric]:
        return VQAAccuracy(), VQAAccuracy()

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        targets = batch["targets"].to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
        return loss, targets.argmax(dim=-1)

    def update(self, metric: Metric, logits: Tensor, batch: dict[str, Any]) -> None:
        metric.update(logits.argmax(-1), batch["answer_index"], batch["is_closed"])

    def computed(self, metric: Metric, stage: str) -> dict[str, Any]:
        return {f"{stage}/{k}": v for k, v in metric.compute().items()}

    def describe(self, logits: Tensor, batch: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
        """``{"qid", "question", "answer", "top5": [[answer, probability], ...]}`` per question (sigmoid
        probabilities, as the head is trained with a per-answer BCE)."""
        probabilities = logits.sigmoid()
        top = probabilities.topk(min(TOP_ANSWERS, probabilities.shape[-1]), dim=-1)
        rows = []
        for i in range(logits.shape[0]):
            pairs = [[names[j], round(float(p), 6)] for p, j in zip(top.values[i], top.indices[i])]
            rows.append(
                {
                    "qid": batch["qids"][i],
                    "question": batch["questions"][i],
                    "answer": pairs[0][0],
                    "top5": pairs,
                }
            )
        return rows
