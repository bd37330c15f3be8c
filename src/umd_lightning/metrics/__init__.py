"""Task metrics (UMD_SPEC 4.1, 5): VQA accuracy, retrieval recall@k, classification accuracy / F1 / AUROC."""

from umd_lightning.metrics.classification import classification_metrics
from umd_lightning.metrics.retrieval import recall_at_k
from umd_lightning.metrics.vqa import QuestionTypeAccuracy, VQAAccuracy

__all__ = ["QuestionTypeAccuracy", "VQAAccuracy", "classification_metrics", "recall_at_k"]
