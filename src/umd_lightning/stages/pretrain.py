"""MR-Pretrain (UMD_SPEC 2): masked reconstruction at two levels plus image-text matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from umd_lightning.errors import StageError
from umd_lightning.stages.reconstruction import FeatureLoss, MaskMode, ReconstructionStage

TEACHER_KEYS = "teacher.module."


class MRPretrain(ReconstructionStage):
    """MR-Pretrain with the reference weights: ``L = L_ITM + 0.5 * (L_MIM + L_MLM + L_FeaMIM + L_FeaMLM)``.

    Started from a pre-training checkpoint (``pretrained``) that carries an EMA teacher (ours, or the reference's
    ``ema.module.`` converted by ``umd convert``), the teacher continues from the saved one instead of a copy of
    the student.

    Args:
        mask_ratio_image: fraction of patches masked per sample.
        mask_mode: ``joint`` (one masked pass, UMD reference) or ``separate`` (M3AE's two passes).
        feature_loss: ``predictive`` (default) or ``reference`` (the authors' defective version).
        alpha: weight of the reconstruction terms.
        w_itm: weight of ITM.
        w_mim: weight of pixel MIM.
        w_mlm: weight of MLM.
        w_feamim: weight of feature MIM.
        w_feamlm: weight of feature MLM.
        ema_momentum: EMA teacher momentum per optimiser step.
        **kwargs: backbone, optimiser and schedule, see :class:`~umd_lightning.stages.base.UMDStage`.
    """

    stage_name = "pretrain"
    accepts_pretrained_from = ("pretrain",)

    def __init__(
        self,
        mask_ratio_image: float = 0.75,
        mask_mode: MaskMode = "joint",
        feature_loss: FeatureLoss = "predictive",
        alpha: float = 0.5,
        w_itm: float = 1.0,
        w_mim: float = 1.0,
        w_mlm: float = 1.0,
        w_feamim: float = 1.0,
        w_feamlm: float = 1.0,
        ema_momentum: float = 0.995,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            mask_ratio_image=mask_ratio_image,
            mask_mode=mask_mode,
            feature_loss=feature_loss,
            alpha=alpha,
            w_itm=w_itm,
            w_mim=w_mim,
            w_mlm=w_mlm,
            w_feamim=w_feamim,
            w_feamlm=w_feamlm,
            ema_momentum=ema_momentum,
            **kwargs,
        )

        self._teacher_from_checkpoint = False

    def pretrained_prefixes(self) -> tuple[str, ...]:
        built = {"itm_head.": self.itm_head, "feamlm_predictor.": self.feamlm_predictor}
        return ("backbone.", "mim_decoder.", "mlm_head.", *(prefix for prefix, module in built.items() if module))

    def init_from_pretrained(self, source: Mapping[str, Tensor]) -> None:
        """Carry the checkpoint's EMA teacher, when it has one and this run uses a teacher.

        Raises:
            StageError: the saved teacher does not fit this run's backbone.
        """
        saved = {k.removeprefix(TEACHER_KEYS): v for k, v in source.items() if k.startswith(TEACHER_KEYS)}
        if self.teacher is None or not saved:
            return
        try:
            self.teacher.module.load_state_dict(saved, strict=True)
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise StageError(f"the checkpoint's EMA teacher does not fit this backbone: {first_line}") from None
        self._teacher_from_checkpoint = True

    def on_fit_start(self) -> None:
        if not self._teacher_from_checkpoint:
            super().on_fit_start()
