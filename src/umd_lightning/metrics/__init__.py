"""Task metrics (UMD_SPEC 4.1, 5): VQA accuracy, retrieval recall@k, classification accuracy / F1 / AUROC."""

from umd_lightning.metrics.classification import classification_metrics
from umd_lightning.metrics.retrieval import recall_at_k
from umd_lightning.metrics.vqa import VQAAccuracy

__all__ = ["VQAAccuracy", "classification_metrics", "recall_at_k"]
