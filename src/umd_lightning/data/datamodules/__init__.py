"""The DataModules of the downstream tasks, one module each over a shared base (``downstream``); the pre-training
DataModule is ``data/datamodule.py``."""

from umd_lightning.data.datamodules.classification import ClassificationDataModule
from umd_lightning.data.datamodules.downstream import DownstreamDataModule
from umd_lightning.data.datamodules.retrieval import RetrievalDataModule
from umd_lightning.data.datamodules.vqa import VQADataModule

__all__ = ["ClassificationDataModule", "DownstreamDataModule", "RetrievalDataModule", "VQADataModule"]
