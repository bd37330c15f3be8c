"""The ViT vision tower: a timm ViT that encodes only the kept patches of each sample (UMD_SPEC 1.1)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from umd_lightning.models.config import VisionConfig
from umd_lightning.models.dropout import attention
from umd_lightning.models.linear import use_onednn_linear
from umd_lightning.weights import read_state_dict

log = logging.getLogger("umd_lightning")


class TowerAttention(Attention):
    """timm's ViT attention whose fused path goes through :func:`umd_lightning.models.dropout.attention`: on a CPU
    it runs in fp32 under ``bf16-mixed`` (faster there) and draws dropped attention weights cheaply; elsewhere it
    is timm's. Same submodules, so the same state-dict keys; timm's own forward runs whatever this does not cover
    (masks, causal attention, gates, the unfused path)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not self.fused_attn or attn_mask is not None or is_causal or getattr(self, "gate", None) is not None:
            return super().forward(x, attn_mask, is_causal)
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, -1))
        return self.proj_drop(self.proj(x))


def use_tower_attention(module: nn.Module) -> int:
    """Make every plain timm ``Attention`` inside ``module`` a :class:`TowerAttention` (a subclass adding no state,
    so weights, state-dict keys and checkpoints are unchanged). Returns how many were switched."""
    switched = 0
    for child in module.modules():
        if type(child) is Attention:
            child.__class__ = TowerAttention
            switched += 1
    return switched


class VisionTower(nn.Module):
    """A timm ViT whose forward encodes the class token plus a per-sample subset of patches (MAE style).

    Any image size whose sides are multiples of the patch size is accepted: the position embeddings are
    resampled from the tower's native grid (``image_size / patch_size``) to the input's grid.

    Args:
        cfg: architecture, sizes and where pretrained weights come from.
        image_size: the native input side; sizes the position embedding table and any loaded checkpoint's one.

    Attributes:
        vit: the timm model (classifier removed).
        width: token width.
        patch_size: patch side in pixels.
        num_prefix_tokens: tokens before the patches in ``pos_embed`` (the class token, or 0).
    """

    def __init__(self, cfg: VisionConfig, image_size: int) -> None:
        super().__init__()
        overrides = {
            key: value
            for key, value in (("embed_dim", cfg.width), ("depth", cfg.depth), ("num_heads", cfg.heads))
            if value is not None
        }
        # dynamic_img_size makes the patch embedding accept any multiple of the patch and return the (h, w)
        # grid; this class adds the position embeddings itself, so the model's own resampling is never used.
        self.vit: VisionTransformer = timm.create_model(
            cfg.arch,
            pretrained=cfg.pretrained_hub,
            num_classes=0,
            img_size=image_size,
            patch_size=cfg.patch_size,
            dynamic_img_size=True,
            **overrides,
        )
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(f"{cfg.arch!r} is not a timm VisionTransformer")
        use_tower_attention(self.vit)
        use_onednn_linear(self.vit)  # CPU fp32 products on oneDNN (models/linear.py); same keys
        if self.vit.cls_token is None or self.vit.reg_token is not None or self.vit.pos_embed is None:
            raise ValueError(f"{cfg.arch!r}: the tower needs a class token, no register tokens and a pos_embed")
        self.width: int = self.vit.embed_dim
        self.patch_size: int = cfg.patch_size
        self.num_prefix_tokens: int = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        self.gradient_checkpointing = False
        """Recompute each block's activations in the backward pass (set by the backbone)."""
        if cfg.pretrained_path:
            self.load_pretrained(cfg.pretrained_path)

    def load_pretrained(self, path: str | Path) -> None:
        """Load local ViT weights: a timm checkpoint, an open_clip one or OpenAI's CLIP file, resampling the
        position embedding to this tower's grid.

        timm's own filter converts OpenAI/OpenCLIP layouts and a patch embedding of another size; the
        classifier head (CLIP's ``proj``), absent from the tower, is dropped. Blocks beyond the tower's depth are
        dropped with a log line: the reference's CLIP builds 11 of the OpenAI file's 12 blocks.

        Raises:
            RuntimeError: tower weights missing from the checkpoint, or keys the tower does not have.
        """
        state = checkpoint_filter_fn(read_state_dict(path), self.vit)
        depth = len(self.vit.blocks)
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        if blocks and max(blocks) >= depth:
            log.info(f"{path}: the tower keeps the first {depth} of the file's {max(blocks) + 1} blocks")
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("head.") and not ((m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth)
        }
        self.vit.load_state_dict(state, strict=True)

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for a square side or an ``(H, W)`` pair.

        Raises:
            ValueError: a side that is not a multiple of the patch size.
        """
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def _position_embedding(self, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Class-token and patch position embeddings ((1, 1, C), (1, h*w, C)) for the grid ``grid_hw``."""
        vit = self.vit
        pos = resample_abs_pos_embed(
            vit.pos_embed,
            new_size=list(grid_hw),
            old_size=list(vit.patch_embed.grid_size),
            num_prefix_tokens=self.num_prefix_tokens,
        )
        if vit.no_embed_class:
            return torch.zeros_like(vit.cls_token), pos
        return pos[:, :1], pos[:, 1:]

    def forward(self, pixel_values: Tensor, keep_indices: Tensor | None = None) -> Tensor:
        """Encode the class token and the kept patches.

        Args:
            pixel_values: (B, 3, H, W), ``H`` and ``W`` multiples of the patch size.
            keep_indices: (B, K) row-major indices of the patches to encode; ``None`` keeps all ``N``.

        Returns:
            (B, 1+K, width) (or (B, 1+N, width)), class token first, patches in ``keep_indices`` order.
        """
        vit = self.vit
        grid_hw = self.grid_size((pixel_values.shape[-2], pixel_values.shape[-1]))
        patches = vit.patch_embed(pixel_values).flatten(1, 2)  # (B, N, C): the NHWC grid, row-major
        cls_pos, patch_pos = self._position_embedding(grid_hw)
        patches = patches + patch_pos
        if keep_indices is not None:
            index = keep_indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            patches = patches.gather(1, index)
        cls = (vit.cls_token + cls_pos).expand(patches.shape[0], -1, -1)
        tokens = vit.pos_drop(torch.cat([cls, patches], dim=1))
        tokens = vit.norm_pre(tokens)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in vit.blocks:
                tokens = checkpoint(block, tokens, use_reentrant=False)
        else:
            tokens = vit.blocks(tokens)
        return vit.norm(tokens)
