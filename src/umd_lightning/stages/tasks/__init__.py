"""The fine-tuning tasks, one module each; :data:`TASKS` maps a DataModule's ``task`` to its class."""

from umd_lightning.stages.tasks.base import FineTuneTask, LabelTask
from umd_lightning.stages.tasks.classification import ClassificationTask
from umd_lightning.stages.tasks.retrieval import RetrievalTask
from umd_lightning.stages.tasks.vqa import VQATask

TASKS: dict[str, type[FineTuneTask]] = {
    "vqa": VQATask,
    "classification": ClassificationTask,
    "retrieval": RetrievalTask,
}

__all__ = ["TASKS", "ClassificationTask", "FineTuneTask", "LabelTask", "RetrievalTask", "VQATask"]
