"""What a fine-tuning task supplies to :class:`~umd_lightning.stages.finetune.FineTune`: its head, loss, metrics,
evaluation and the description of its predictions. One task per module (``vqa``, ``classification``,
``retrieval``); none imports another, and the stage holds the backbone, the optimiser and the hand-off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torchmetrics import Metric

from umd_lightning.models.heads import ClassifierHead

if TYPE_CHECKING:
    from umd_lightning.stages.finetune import FineTune


class FineTuneTask:
    """The task-specific part of fine-tuning. ``module`` is the :class:`FineTune` being trained: the task reads its
    backbone, head and metrics, and logs through it."""

    name = "task"

    def build_head(self, joint: int, num_outputs: int | None) -> nn.Module:
        """The task head over the fused ``joint``-wide pooled pair."""
        raise NotImplementedError

    def build_metrics(self, num_outputs: int | None) -> tuple[Metric | None, Metric | None]:
        """The (validation, test) metrics; ``None`` where the task scores without one."""
        return None, None

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(loss, target index) for the batch."""
        raise NotImplementedError

    def gm_coord_features(self, h_t: Tensor, h_v: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        """The pooled text and image features GM-Coord scores, shaped as the head's input rows."""
        return h_t, h_v

    def prepare_evaluation(self, module: FineTune, stage: str) -> None:
        """Called when a validation, test or predict epoch starts (``stage``: ``val``, ``test`` or ``predict``)."""

    def evaluation_step(self, module: FineTune, batch: dict[str, Any], stage: str) -> Tensor | None:
        """Score a batch into the stage's metric (the logits where the task has them)."""
        raise NotImplementedError

    def evaluation_results(self, module: FineTune, stage: str) -> dict[str, float]:
        """The epoch's metrics, keyed ``<stage>/<name>``."""
        raise NotImplementedError

    def predict_step(self, module: FineTune, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample (what ``umd predict`` writes)."""
        raise NotImplementedError


class LabelTask(FineTuneTask):
    """A task with one output per answer or class (VQA, classification): a ``ClassifierHead``, a metric per
    evaluation stage updated from the logits."""

    def build_head(self, joint: int, num_outputs: int | None) -> nn.Module:
        return ClassifierHead(joint, num_outputs)

    def update(self, metric: Metric, logits: Tensor, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def computed(self, metric: Metric, stage: str) -> dict[str, Any]:
        """The metric's values keyed ``<stage>/<name>``."""
        raise NotImplementedError

    def describe(self, logits: Tensor, batch: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def evaluation_step(self, module: FineTune, batch: dict[str, Any], stage: str) -> Tensor:
        """Score a batch into the stage's metric; returns the logits (for a task's further metrics)."""
        metric = module.val_metric if stage == "val" else module.test_metric
        logits, _ = module._logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss, _ = self.loss(logits, batch)
        module.log(f"{stage}/loss", loss, batch_size=logits.shape[0], sync_dist=True)
        self.update(metric, logits, batch)
        return logits

    def evaluation_results(self, module: FineTune, stage: str) -> dict[str, float]:
        metric = module.val_metric if stage == "val" else module.test_metric
        results = self.computed(metric, stage)
        metric.reset()
        return results

    def predict_step(self, module: FineTune, batch: dict[str, Any]) -> list[dict[str, Any]]:
        logits = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logits = logits.detach().float().cpu()
        labels = module.hparams.labels
        names = list(labels) if labels is not None else [str(i) for i in range(logits.shape[-1])]
        return self.describe(logits, batch, names)
