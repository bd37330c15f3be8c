"""Plain ``nn.Module`` models: the shared UMD backbone, its towers, the fusion encoder and the task heads."""

from umd_lightning.models.backbone import BackboneOutput, Pooler, UMDBackbone
from umd_lightning.models.config import (
    MINILM,
    PRESETS,
    BackboneConfig,
    DecoderConfig,
    FusionConfig,
    TextConfig,
    VisionConfig,
    preset,
    resolve_text_model,
)
from umd_lightning.models.ema import EMATeacher
from umd_lightning.models.fusion import CoAttentionLayer, FusionEncoder, MultiHeadAttention, init_new_weights
from umd_lightning.models.heads import (
    ClassifierHead,
    FeaturePredictor,
    ITCHead,
    ITMHead,
    MIMDecoder,
    MLMHead,
    RetrievalHead,
    sincos_pos_embed_2d,
)
from umd_lightning.models.masking import (
    normalized_pixel_targets,
    num_kept,
    patchify,
    random_masking,
    unpatchify,
)
from umd_lightning.models.text import TextTower, load_tokenizer
from umd_lightning.models.vision import VisionTower

__all__ = [
    "MINILM",
    "PRESETS",
    "BackboneConfig",
    "BackboneOutput",
    "ClassifierHead",
    "CoAttentionLayer",
    "DecoderConfig",
    "EMATeacher",
    "FeaturePredictor",
    "FusionConfig",
    "FusionEncoder",
    "ITCHead",
    "ITMHead",
    "MIMDecoder",
    "MLMHead",
    "MultiHeadAttention",
    "Pooler",
    "RetrievalHead",
    "TextConfig",
    "TextTower",
    "UMDBackbone",
    "VisionConfig",
    "VisionTower",
    "init_new_weights",
    "load_tokenizer",
    "normalized_pixel_targets",
    "num_kept",
    "patchify",
    "preset",
    "random_masking",
    "resolve_text_model",
    "sincos_pos_embed_2d",
    "unpatchify",
]
