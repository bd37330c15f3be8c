"""LightningModules for the UMD stages; they share one backbone class (``models.UMDBackbone``)."""

from umd_lightning.errors import NonFiniteLossError, StageError
from umd_lightning.stages.base import UMDStage
from umd_lightning.stages.calib import TDCalib
from umd_lightning.stages.finetune import FineTune
from umd_lightning.stages.pretrain import MRPretrain

__all__ = ["FineTune", "MRPretrain", "NonFiniteLossError", "StageError", "TDCalib", "UMDStage"]
