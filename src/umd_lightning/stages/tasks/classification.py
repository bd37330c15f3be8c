"""Image-text classification: cross-entropy over ``C`` classes; accuracy, macro-F1 and macro AUROC; the softmax
probability of every class in each prediction row."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from umd_lightning.metrics.classification import classification_metrics
from umd_lightning.stages.tasks.base import LabelTask


class ClassificationTask(LabelTask):
    name = "classification"

    def build_metrics(self, num_outputs: int | None) -> tuple[Metric, Metric]:
        return classification_metrics(num_outputs, prefix="val/"), classification_metrics(num_outputs, prefix="test/")

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return F.cross_entropy(logits.float(), batch["labels"]), batch["labels"]

    def update(self, metric: Metric, logits: Tensor, batch: dict[str, Any]) -> None:
        metric.update(logits.float().softmax(-1), batch["labels"])

    def computed(self, metric: Metric, stage: str) -> dict[str, Any]:
        return dict(metric.compute())  # the collection's keys carry the stage prefix already

    def describe(self, logits: Tensor, batch: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
        """``{"id", "label", "probabilities": {class: p}}`` per sample (softmax)."""
        probabilities = logits.softmax(-1)
        return [
            {
                "id": batch["ids"][i],
                "label": names[int(probabilities[i].argmax())],
                "probabilities": {name: round(float(p), 6) for name, p in zip(names, probabilities[i])},
            }
            for i in range(logits.shape[0])
        ]
