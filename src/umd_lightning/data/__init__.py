"""Data: one dataset per publisher layout, transforms, collates (tokenisation and masking) and thin DataModules."""

from umd_lightning.data.datamodule import PackedPretrainDataModule, PretrainDataModule, SourceSpec
from umd_lightning.data.datamodules import ClassificationDataModule, RetrievalDataModule, VQADataModule
from umd_lightning.data.scan import ScanReport
from umd_lightning.errors import DataError

__all__ = [
    "ClassificationDataModule",
    "DataError",
    "PackedPretrainDataModule",
    "PretrainDataModule",
    "RetrievalDataModule",
    "ScanReport",
    "SourceSpec",
    "VQADataModule",
]
