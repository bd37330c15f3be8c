"""VQA as classification over the answer vocabulary: per-answer BCE scaled by ``|A|`` (UMD_SPEC 4.1), open /
closed / overall accuracy (and per question type at test), and the top answers with sigmoid probabilities in each
prediction row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from umd_lightning.metrics.vqa import QuestionTypeAccuracy, VQAAccuracy
from umd_lightning.stages.tasks.base import LabelTask

if TYPE_CHECKING:
    from umd_lightning.stages.finetune import FineTune

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

    # At test, accuracy per question type as well (``test/type/<T>/accuracy`` and ``/n``), the types being the
    # DataModule's test split's; validation keeps to open / closed / overall.
    def prepare_evaluation(self, module: FineTune, stage: str) -> None:
        datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
        types = getattr(datamodule, "question_types", None) if stage == "test" else None
        module.test_by_type = QuestionTypeAccuracy(types).to(module.device) if types else None

    def evaluation_step(self, module: FineTune, batch: dict[str, Any], stage: str) -> Tensor:
        logits = super().evaluation_step(module, batch, stage)
        by_type = getattr(module, "test_by_type", None)
        if stage == "test" and by_type is not None and "question_types" in batch:
            by_type.update(logits.argmax(-1), batch["answer_index"], batch["question_types"])
        return logits

    def evaluation_results(self, module: FineTune, stage: str) -> dict[str, float]:
        results = super().evaluation_results(module, stage)
        by_type = getattr(module, "test_by_type", None)
        if stage == "test" and by_type is not None:
            results.update({f"test/{k}": v for k, v in by_type.compute().items()})
            by_type.reset()
        return results

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
