"""The downstream DataModules' former module: each now lives in ``data/datamodules/`` (``downstream`` the shared
base, ``vqa``, ``classification``, ``retrieval``); the names stay importable from here."""

from umd_lightning.data.datamodules.classification import ClassificationDataModule
from umd_lightning.data.datamodules.downstream import STAGE_SPLITS, DownstreamDataModule, Mode
from umd_lightning.data.datamodules.retrieval import RetrievalDataModule
from umd_lightning.data.datamodules.vqa import VQADataModule

__all__ = [
    "STAGE_SPLITS",
    "ClassificationDataModule",
    "DownstreamDataModule",
    "Mode",
    "RetrievalDataModule",
    "VQADataModule",
]
