"""The shared UMD backbone: towers, projections, type embeddings, fusion and poolers (UMD_SPEC 1.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from umd_lightning.errors import ConfigError
from umd_lightning.models.config import BackboneConfig
from umd_lightning.models.dropout import use_cheap_dropout
from umd_lightning.models.fusion import FusionEncoder, init_new_weights
from umd_lightning.models.linear import Linear
from umd_lightning.models.text import TextTower
from umd_lightning.models.vision import VisionTower

TEXT_TYPE = 0
IMAGE_TYPE = 1


@dataclass
class BackboneOutput:
    """What one backbone pass returns.

    Attributes:
        text_layers: the text stream after each fusion layer, (B, L, D) each.
        image_layers: the image stream after each fusion layer, (B, 1+K, D) each (class token first).
        text_pooled: ``h_t`` (B, D).
        image_pooled: ``h_v`` (B, D).
    """

    text_layers: list[Tensor]
    image_layers: list[Tensor]
    text_pooled: Tensor
    image_pooled: Tensor

    @property
    def text_feats(self) -> Tensor:
        """The final text stream (B, L, D)."""
        return self.text_layers[-1]

    @property
    def image_feats(self) -> Tensor:
        """The final image stream (B, 1+K, D)."""
        return self.image_layers[-1]

    @property
    def pooled(self) -> Tensor:
        """The joint vector ``h = [h_t ; h_v]`` (B, 2D)."""
        return torch.cat([self.text_pooled, self.image_pooled], dim=-1)


class Pooler(nn.Module):
    """Linear + tanh on the first token, or on the mean of all tokens: (B, L, D) -> (B, D).

    Args:
        width: ``D``.
        mode: ``first`` (UMD_SPEC 1.1) or ``mean``: every token counts, text padding included, as in the
            reference's TD-Calib and fine-tuning code.
    """

    def __init__(self, width: int, mode: Literal["first", "mean"] = "first") -> None:
        super().__init__()
        if mode not in ("first", "mean"):
            raise ConfigError(f"pooling must be 'first' or 'mean', got {mode!r}")
        self.mode = mode
        self.linear = Linear(width, width)

    def forward(self, tokens: Tensor) -> Tensor:
        summary = tokens[:, 0] if self.mode == "first" else tokens.mean(dim=1)
        return torch.tanh(self.linear(summary))


class UMDBackbone(nn.Module):
    """Vision and text towers, one Linear each into the fusion width ``D``, a modality-type embedding (text 0,
    image 1) added to every token, ``K`` co-attention layers per stream, and one pooler per stream.

    Args:
        cfg: the sizes (``preset(...)`` gives named ones); its decoder section sizes the heads, not this.

    Attributes:
        width: the fusion width ``D``.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.width: int = cfg.fusion.width
        self.vision = VisionTower(cfg.vision, cfg.image_size)
        self.text = TextTower(cfg.text)
        self.text_proj = Linear(self.text.width, self.width)
        self.image_proj = Linear(self.vision.width, self.width)
        self.type_embed = nn.Embedding(2, self.width)
        self.fusion = FusionEncoder(cfg.fusion)
        self.text_pooler = Pooler(self.width, cfg.pooling)
        self.image_pooler = Pooler(self.width, cfg.pooling)
        for module in (self.text_proj, self.image_proj, self.type_embed, self.text_pooler, self.image_pooler):
            module.apply(init_new_weights)
        use_cheap_dropout(self)  # the vision tower's (timm's) too, where its drop rates are set

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        keep_indices: Tensor | None = None,
    ) -> BackboneOutput:
        """Encode an image-text batch.

        Args:
            pixel_values: (B, 3, H, W).
            input_ids: (B, L).
            attention_mask: (B, L), 1 / True for real tokens.
            keep_indices: (B, K) patches to encode (masked pass); ``None`` encodes all ``N``.

        Returns:
            Per-layer streams and pooled vectors.
        """
        image = self.embed_image(pixel_values, keep_indices)
        text = self.embed_text(input_ids, attention_mask)
        return self.fuse(text, attention_mask, image)

    def embed_image(self, pixel_values: Tensor, keep_indices: Tensor | None = None) -> Tensor:
        """Vision tower, projection and type embedding: (B, 3, H, W) -> (B, 1+K, D)."""
        return self.image_proj(self.vision(pixel_values, keep_indices)) + self.type_embed.weight[IMAGE_TYPE]

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text tower, projection and type embedding: (B, L) -> (B, L, D)."""
        return self.text_proj(self.text(input_ids, attention_mask)) + self.type_embed.weight[TEXT_TYPE]

    def fuse(self, text: Tensor, attention_mask: Tensor, image: Tensor) -> BackboneOutput:
        """Co-attention fusion and pooling of embedded streams, so that a cross-encoder can pair each embedded
        image with many embedded texts (retrieval) without re-running the towers.

        Args:
            text: (B, L, D) from :meth:`embed_text`.
            attention_mask: (B, L).
            image: (B, M, D) from :meth:`embed_image`.
        """
        text_layers, image_layers = self.fusion(text, image, attention_mask.bool())
        return BackboneOutput(
            text_layers=text_layers,
            image_layers=image_layers,
            text_pooled=self.text_pooler(text_layers[-1]),
            image_pooled=self.image_pooler(image_layers[-1]),
        )

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` in place (``nn.Module.compile``, same arguments) the modules every pass runs through:
        the vision tower, the text tower and the fusion.

        Compiling the backbone itself would compile :meth:`forward` only, and the stages never call it: their passes
        call :meth:`embed_image`, :meth:`embed_text` and :meth:`fuse` (the masked pass, the ITM pass and retrieval's
        cross-encoder need them apart), which run these three. State-dict keys are unchanged."""
        for module in (self.vision, self.text, self.fusion):
            module.compile(*args, **kwargs)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass (per ViT block, per text layer, per fusion layer pair)
        instead of keeping them; only while training with gradients (the EMA teacher's passes are unaffected)."""
        self.vision.gradient_checkpointing = enabled
        self.fusion.gradient_checkpointing = enabled
        encoder = self.text.encoder
        # transformers 5 renamed the switch (activation_checkpointing_*); the older name still works there.
        enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
        disable = getattr(encoder, "activation_checkpointing_disable", None) or encoder.gradient_checkpointing_disable
        if enabled and getattr(encoder, "supports_gradient_checkpointing", False):
            if hasattr(encoder.config, "use_cache"):
                encoder.config.use_cache = False  # an encoder has no cache; said here so transformers need not warn
            enable({"use_reentrant": False})
            # transformers also hooks the word embeddings so that their output requires grad, which only reentrant
            # checkpointing of a frozen table needs; the hook is a local function, and a model holding it cannot be
            # pickled (ddp_spawn, DataLoader workers that get the module): removed.
            remove_hook = getattr(encoder, "disable_input_require_grads", None)
            if remove_hook is not None:
                remove_hook()
        elif getattr(encoder, "is_gradient_checkpointing", False):
            disable()

    def text_side(self) -> list[nn.Module]:
        """GM-Coord's text side: text tower, text projection, text-stream fusion layers."""
        return [self.text, self.text_proj, self.fusion.text_layers]

    def image_side(self) -> list[nn.Module]:
        """GM-Coord's image side: vision tower, image projection, image-stream fusion layers."""
        return [self.vision, self.image_proj, self.fusion.image_layers]

    def tower_modules(self) -> list[nn.Module]:
        """The pretrained towers (base learning rate); every other parameter takes the lr multiplier."""
        return [self.vision, self.text]
