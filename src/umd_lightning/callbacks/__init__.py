"""Lightning callbacks of the UMD stages: GM-Coord gradient modulation for fine-tuning (UMD_SPEC 4.2)."""

from umd_lightning.callbacks.gm_coord import (
    GMCoord,
    GMCoordInputs,
    GMCoordModule,
    coefficients,
    rescale_,
    scores,
    unimodal_logits,
)

__all__ = [
    "GMCoord",
    "GMCoordInputs",
    "GMCoordModule",
    "coefficients",
    "rescale_",
    "scores",
    "unimodal_logits",
]
