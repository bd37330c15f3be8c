"""The co-attention fusion encoder: two streams that update in parallel (UMD_SPEC 1.1).

A layer of one stream runs self-attention over its own tokens, cross-attention whose keys and values are the
other stream's *input to the same layer*, then a feed-forward block. Post-norm (BERT style, the reference) by
default; pre-norm on request, in which case the residual stream is left un-normalised and the heads normalise
what they use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from umd_lightning.models.config import FusionConfig
from umd_lightning.models.dropout import Dropout, attention
from umd_lightning.models.linear import Linear

INIT_STD = 0.02


def init_new_weights(module: nn.Module) -> None:
    """Initialise the project's own layers: Linear / Embedding normal(0.02) truncated at two standard
    deviations with zero bias, LayerNorm (1, 0).

    For ``module.apply``; never applied to the pretrained towers (timm and transformers initialise those).
    """
    if isinstance(module, nn.Linear | nn.Embedding):
        # torch's truncation bounds are absolute values, not multiples of std.
        nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over ``scaled_dot_product_attention`` with a key padding mask (its dropped attention
    weights, on a CPU, drawn by ``models/dropout.py``)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.query = Linear(width, width)
        self.key = Linear(width, width)
        self.value = Linear(width, width)
        self.out = Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, queries: Tensor, keys_values: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend from ``queries`` (B, Lq, D) to ``keys_values`` (B, Lk, D); ``key_mask`` (B, Lk) True = real.

        Returns:
            (B, Lq, D).
        """
        attn_mask = None if key_mask is None else key_mask[:, None, None, :].bool()
        out = attention(
            self._split(self.query(queries)),
            self._split(self.key(keys_values)),
            self._split(self.value(keys_values)),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(out.transpose(1, 2).flatten(2))


class CoAttentionLayer(nn.Module):
    """One co-attention layer of one stream: self-attention, cross-attention to the other stream, FFN.

    Args:
        cfg: width, heads, FFN size, dropout and the norm placement.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.self_attn = MultiHeadAttention(cfg.width, cfg.heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.width, cfg.heads, cfg.dropout)
        self.ffn = nn.Sequential(
            Linear(cfg.width, cfg.ffn), nn.GELU(), Dropout(cfg.dropout), Linear(cfg.ffn, cfg.width)
        )
        self.self_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.cross_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.apply(init_new_weights)

    def forward(
        self, x: Tensor, other: Tensor, x_mask: Tensor | None = None, other_mask: Tensor | None = None
    ) -> Tensor:
        """Update this stream.

        Args:
            x: (B, L, D) this stream's input to the layer.
            other: (B, M, D) the other stream's input to the same layer (the cross-attention's keys/values).
            x_mask: (B, L) bool, True = real token; ``None`` = all real.
            other_mask: (B, M) bool, True = real token; ``None`` = all real.

        Returns:
            (B, L, D).
        """
        if self.prenorm:
            h = self.self_norm(x)
            x = x + self.drop(self.self_attn(h, h, x_mask))
            x = x + self.drop(self.cross_attn(self.cross_norm(x), other, other_mask))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.self_norm(x + self.drop(self.self_attn(x, x, x_mask)))
        x = self.cross_norm(x + self.drop(self.cross_attn(x, other, other_mask)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class FusionEncoder(nn.Module):
    """``K`` co-attention layers per stream, both streams updated in parallel.

    Attributes:
        text_layers: the text stream's layers (GM-Coord's text side).
        image_layers: the image stream's layers (GM-Coord's image side).
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.text_layers = nn.ModuleList(CoAttentionLayer(cfg) for _ in range(cfg.layers))
        self.image_layers = nn.ModuleList(CoAttentionLayer(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False
        """Recompute each layer pair's activations in the backward pass (set by the backbone)."""

    def forward(
        self, text: Tensor, image: Tensor, text_mask: Tensor, image_mask: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Run both streams.

        Args:
            text: (B, L, D).
            image: (B, M, D).
            text_mask: (B, L) bool, True = real token.
            image_mask: (B, M) bool, True = real token; ``None`` = all real.

        Returns:
            The text outputs (B, L, D) and the image outputs (B, M, D) of every layer, first layer first.
        """
        text_mask = text_mask.bool()
        text_outputs: list[Tensor] = []
        image_outputs: list[Tensor] = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for text_layer, image_layer in zip(self.text_layers, self.image_layers, strict=True):
            if recompute:
                text, image = checkpoint(_layer_pair, text_layer, image_layer, text, image, text_mask, image_mask,
                                         use_reentrant=False)  # fmt: skip
            else:
                text, image = _layer_pair(text_layer, image_layer, text, image, text_mask, image_mask)
            text_outputs.append(text)
            image_outputs.append(image)
        return text_outputs, image_outputs


def _layer_pair(
    text_layer: CoAttentionLayer,
    image_layer: CoAttentionLayer,
    text: Tensor,
    image: Tensor,
    text_mask: Tensor,
    image_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Both streams through one fusion layer, each attending to the other's input to that layer."""
    return text_layer(text, image, text_mask, image_mask), image_layer(image, text, image_mask, text_mask)
