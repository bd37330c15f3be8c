"""TD-Calib (UMD_SPEC 3): the reconstruction objectives on the downstream training split's own image-text pairs."""

from __future__ import annotations

from typing import Any

from umd_lightning.stages.base import Schedule
from umd_lightning.stages.reconstruction import FeatureLoss, MaskMode, ReconstructionStage


class TDCalib(ReconstructionStage):
    """TD-Calib: ``L = L_MIM + L_MLM + w_fea * (L_FeaMIM + L_FeaMLM)``, no ITM, starting from an MR-Pretrain
    checkpoint given as ``pretrained`` (backbone, MIM decoder, MLM head and feature predictor; the EMA teacher is
    re-made from the loaded student). The ITM head passes through untouched (frozen with the poolers when
    ``w_itm = 0``), so retrieval fine-tuning after TD-Calib still starts its head from the ITM positive row.
    Pair it with a downstream DataModule in ``mode: calib`` and keep the checkpoint with the lowest ``val/recon``
    (MIM loss + 1 - MLM accuracy). An MR-Pretrain ITC head passes on only when TD-Calib trains it too
    (``itc_weight > 0``); otherwise retrieval fine-tuning with ITC starts a fresh one (and says so).

    Args:
        w_feamim: weight of feature MIM (reference ``w_fea = 1e-5``).
        w_feamlm: weight of feature MLM (reference ``w_fea = 1e-5``).
        alpha: weight of all reconstruction terms (1 in TD-Calib).
        w_itm: weight of ITM (0: TD-Calib has none).
        w_mim: weight of pixel MIM.
        w_mlm: weight of MLM.
        mask_ratio_image: fraction of patches masked per sample.
        mask_mode: ``joint`` or ``separate``.
        feature_loss: ``predictive`` (default) or ``reference``.
        ema_momentum: EMA teacher momentum per optimiser step.
        lr: base learning rate (reference 5e-6).
        schedule: decay after warm-up (reference cosine).
        **kwargs: see :class:`~umd_lightning.stages.base.UMDStage`.
    """

    stage_name = "calib"
    accepts_pretrained_from = ("pretrain", "calib")
    carries_itm_head = True

    def __init__(
        self,
        w_feamim: float = 1e-5,
        w_feamlm: float = 1e-5,
        alpha: float = 1.0,
        w_itm: float = 0.0,
        w_mim: float = 1.0,
        w_mlm: float = 1.0,
        mask_ratio_image: float = 0.75,
        mask_mode: MaskMode = "joint",
        feature_loss: FeatureLoss = "predictive",
        ema_momentum: float = 0.995,
        lr: float = 5e-6,
        schedule: Schedule = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            w_feamim=w_feamim,
            w_feamlm=w_feamlm,
            alpha=alpha,
            w_itm=w_itm,
            w_mim=w_mim,
            w_mlm=w_mlm,
            mask_ratio_image=mask_ratio_image,
            mask_mode=mask_mode,
            feature_loss=feature_loss,
            ema_momentum=ema_momentum,
            lr=lr,
            schedule=schedule,
            **kwargs,
        )

    def pretrained_prefixes(self) -> tuple[str, ...]:
        prefixes = ["backbone.", "mim_decoder.", "mlm_head.", "itm_head."]
        if self.feamlm_predictor is not None:
            prefixes.append("feamlm_predictor.")
        if self.itc_head is not None:
            prefixes.append("itc_head.")
        return tuple(prefixes)

    def optional_prefixes(self) -> tuple[str, ...]:
        # The ITM head only passes through TD-Calib (frozen when w_itm = 0) to initialise a retrieval head; an ITC
        # head (itc_weight > 0) continues from the pre-trained one when the checkpoint has one.
        return ("itm_head.", "itc_head.") if self.itc_head is not None else ("itm_head.",)
