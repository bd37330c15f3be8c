"""Image-text classification metrics (UMD_SPEC 4.1): accuracy, macro-F1 and macro AUROC."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score


def classification_metrics(num_classes: int, prefix: str = "") -> MetricCollection:
    """Accuracy (micro: fraction correct), macro-F1 and macro one-vs-rest AUROC over ``num_classes`` classes.

    A binary task goes through the same multiclass metrics with ``num_classes=2`` and two logits, so every
    data set is scored the same way. Update the collection with ``(logits (N, C), target (N,) int64)``; logits
    are fine for all three (AUROC applies a softmax to inputs outside [0, 1]).

    Args:
        num_classes: ``C``, at least 2.
        prefix: put before each key, e.g. ``"val/"`` gives ``val/acc``, ``val/f1_macro``, ``val/auroc_macro``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (binary tasks use 2), got {num_classes}")
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "auroc_macro": MulticlassAUROC(num_classes, average="macro"),
        },
        prefix=prefix,
    )
