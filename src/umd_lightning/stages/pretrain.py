"""MR-Pretrain (UMD_SPEC 2): masked reconstruction at two levels plus image-text matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from umd_lightning.errors import StageError
from umd_lightning.stages.reconstruction import ReconstructionStage

TEACHER_KEYS = "teacher.module."


class MRPretrain(ReconstructionStage):
    """MR-Pretrain with the reference weights: ``L = L_ITM + 0.5 * (L_MIM + L_MLM + L_FeaMIM + L_FeaMLM)``.

    The optional contrastive term (``itc_weight > 0``, off by default as in the reference) adds
    ``itc_weight * L_ITC``. Started from a pre-training checkpoint (``pretrained``) that carries an EMA teacher
    (ours, or the reference's ``ema.module.`` converted by ``umd convert``), the teacher continues from the saved one
    instead of a copy of the student.

    Args:
        **kwargs: the losses, masking and EMA teacher (see
            :class:`~umd_lightning.stages.reconstruction.ReconstructionStage`: ``mask_ratio_image``, ``mask_mode``,
            ``feature_loss``, ``alpha``, ``w_itm`` ... ``w_feamlm``, ``ema_momentum``, ``itc_weight``) and the
            backbone, optimiser and schedule (see :class:`~umd_lightning.stages.base.UMDStage`).
    """

    stage_name = "pretrain"
    accepts_pretrained_from = ("pretrain",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._teacher_from_checkpoint = False

    def pretrained_prefixes(self) -> tuple[str, ...]:
        built = {"itm_head.": self.itm_head, "feamlm_predictor.": self.feamlm_predictor, "itc_head.": self.itc_head}
        return ("backbone.", "mim_decoder.", "mlm_head.", *(prefix for prefix, module in built.items() if module))

    def optional_prefixes(self) -> tuple[str, ...]:
        # A pre-training checkpoint without ITC (the default, the authors') continues with a fresh ITC head.
        return ("itc_head.",) if self.itc_head is not None else ()

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
