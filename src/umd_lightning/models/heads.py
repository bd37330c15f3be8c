"""Heads on the backbone: MIM decoder, MLM, ITM, feature predictor, classifier, retrieval (UMD_SPEC 1.2), and the
optional image-text contrastive (ITC) head."""

from __future__ import annotations

import math
from typing import Literal

import torch
from timm.layers import get_act_layer
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from umd_lightning.models.config import DecoderConfig
from umd_lightning.models.fusion import init_new_weights
from umd_lightning.models.linear import Linear, use_onednn_linear
from umd_lightning.models.vision import use_tower_attention


def sincos_pos_embed_2d(
    dim: int, grid_hw: tuple[int, int], layout: Literal["row_first", "column_first"] = "row_first"
) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings: one half of the channels encodes the patch row, the other the
    column, each as ``[sin(pos * omega), cos(pos * omega)]``, ``omega_i = 10000^(-i / (dim/4))``.

    Args:
        dim: channels, a multiple of 4.
        grid_hw: the patch grid ``(h, w)``.
        layout: ``row_first`` (the row in the first half) or ``column_first`` (MAE's
            ``get_2d_sincos_pos_embed`` and the UMD reference: the column in the first half).

    Returns:
        (h*w, dim), row-major over the grid.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    h, w = grid_hw
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    axes = (rows, cols) if layout == "row_first" else (cols, rows)
    for pos in (axis.reshape(-1) for axis in axes):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class MIMDecoder(nn.Module):
    """MAE-style decoder predicting, for every patch, its normalised pixels and a feature vector.

    The kept patches' tokens (after ``embed``) are put back at their grid positions, the masked positions get
    the learned mask token, fixed 2-D sine-cosine position embeddings are added (zeros for the class token),
    then the pre-norm blocks (``cfg.act`` in their MLP), a norm and two output Linears run.

    Args:
        in_dim: width of the image stream fed in (the fusion width ``D``).
        cfg: decoder width, depth and heads.
        patch_size: patch side ``p``; pixels are predicted as ``p*p*3`` per patch.
        feature_dim: width of the predicted features (the FeaMIM target, usually ``D``).
    """

    def __init__(self, in_dim: int, cfg: DecoderConfig, patch_size: int, feature_dim: int) -> None:
        super().__init__()
        self.width = cfg.width
        self.pos_embed_layout = cfg.pos_embed
        self.embed = Linear(in_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        act_layer = get_act_layer(cfg.act)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm, act_layer=act_layer)
            for _ in range(cfg.depth)
        )
        use_tower_attention(self.blocks)
        use_onednn_linear(self.blocks)
        self.norm = nn.LayerNorm(cfg.width)
        self.pixel_out = Linear(cfg.width, patch_size * patch_size * 3)
        self.feature_out = Linear(cfg.width, feature_dim)
        self.apply(init_new_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def insert_mask_tokens(self, embedded: Tensor, keep_indices: Tensor, num_patches: int) -> Tensor:
        """Put the kept tokens back at their patch positions and the mask token everywhere else.

        Args:
            embedded: (B, 1+K, d_dec), class token first.
            keep_indices: (B, K) patch index of each kept token.
            num_patches: ``N``.

        Returns:
            (B, 1+N, d_dec), class token first.
        """
        cls, kept = embedded[:, :1], embedded[:, 1:]
        batch, _, width = kept.shape
        canvas = self.mask_token.to(kept.dtype).expand(batch, num_patches, width)
        index = keep_indices.unsqueeze(-1).expand(-1, -1, width)
        return torch.cat([cls, canvas.scatter(1, index, kept)], dim=1)

    def forward(self, tokens: Tensor, keep_indices: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Decode.

        Args:
            tokens: (B, 1+K, D) image-stream tokens of the masked pass.
            keep_indices: (B, K) the kept patches.
            grid_hw: the patch grid ``(h, w)``, ``N = h * w``.

        Returns:
            Pixels (B, N, p*p*3) and features (B, N, feature_dim), class token dropped.
        """
        num_patches = grid_hw[0] * grid_hw[1]
        x = self.insert_mask_tokens(self.embed(tokens), keep_indices, num_patches)
        pos = sincos_pos_embed_2d(self.width, grid_hw, self.pos_embed_layout).to(device=x.device, dtype=x.dtype)
        x = x + torch.cat([pos.new_zeros(1, self.width), pos], dim=0)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        return self.pixel_out(x), self.feature_out(x)


class MLMHead(nn.Module):
    """BERT-style MLM head: Linear + GELU + LayerNorm (epsilon ``norm_eps``), then Linear to the vocabulary (with
    bias).

    ``forward``: (..., width) -> (..., vocab_size) logits.
    """

    def __init__(self, width: int, vocab_size: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.transform = nn.Sequential(Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=norm_eps))
        self.decoder = Linear(width, vocab_size)
        self.apply(init_new_weights)

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder(self.transform(features))


class ITMHead(nn.Module):
    """Image-text matching: Linear ``2D -> 2`` on the joint vector; class 1 = matched pair.

    ``forward``: (B, 2D) -> (B, 2) logits.
    """

    def __init__(self, width2: int) -> None:
        super().__init__()
        self.linear = Linear(width2, 2)
        self.apply(init_new_weights)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(pooled)


class FeaturePredictor(nn.Module):
    """Two-layer MLP (Linear, GELU, Linear) ``D -> D`` predicting the teacher's features (FeaMLM).

    ``forward``: (..., width) -> (..., width).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(width, width), nn.GELU(), Linear(width, width))
        self.apply(init_new_weights)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)


class ClassifierHead(nn.Module):
    """VQA / classification head: Linear(in, in), LayerNorm, GELU, then ``final`` Linear(in, out).

    GM-Coord reads ``final``'s weight and bias to form the uni-modal logits.

    ``forward``: (B, in_dim) -> (B, num_outputs) logits.
    """

    def __init__(self, in_dim: int, num_outputs: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU())
        self.final = Linear(in_dim, num_outputs)
        self.apply(init_new_weights)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.final(self.hidden(pooled))


class RetrievalHead(nn.Module):
    """Image-text retrieval score: Linear ``2D -> 1``, initialised from the ITM head's positive row.

    ``forward``: (..., in_dim) -> (...) scores (the last dimension squeezed).
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.linear = Linear(in_dim, 1)
        self.apply(init_new_weights)

    @torch.no_grad()
    def init_from_itm(self, itm: ITMHead) -> None:
        """Copy the ITM head's "matched" (index 1) weight row and bias."""
        self.linear.weight.copy_(itm.linear.weight[1:2])
        self.linear.bias.copy_(itm.linear.bias[1:2])

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(pooled).squeeze(-1)


class ITCHead(nn.Module):
    """Image-text contrastive head (ALBEF / BLIP): one Linear per modality from the towers' embedded tokens (before
    any fusion, so one pass per image and per caption) into a shared ``dim``, L2-normalised, and a learnable
    temperature. Its cosine similarities rank all pairs cheaply; the cross-encoder re-scores the best ones.

    The image is summarised by its first (class) token; a caption by the mean of its real tokens (padding left
    out, so a caption's feature does not depend on how long the batch's longest caption is; the MiniLM tower is
    also trained as a mean-pooled sentence encoder).

    Args:
        width: the fusion width ``D`` of the embedded tokens.
        dim: the shared embedding width.
        temperature: initial softmax temperature (ALBEF, CLIP: 0.07); learned as ``log(1 / t)``, capped so that
            ``1 / t <= 100`` as in CLIP.
    """

    MAX_SCALE = 100.0

    def __init__(self, width: int, dim: int = 256, temperature: float = 0.07) -> None:
        super().__init__()
        if dim < 1 or temperature <= 0.0:
            raise ValueError(f"ITCHead needs dim >= 1 and temperature > 0, got dim={dim}, temperature={temperature}")
        self.image_proj = Linear(width, dim)
        self.text_proj = Linear(width, dim)
        self.apply(init_new_weights)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> Tensor:
        """``1 / temperature``, at most :attr:`MAX_SCALE` (a 0-d tensor that carries the gradient)."""
        return self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp()

    def image_features(self, image_tokens: Tensor) -> Tensor:
        """(B, M, D) embedded image tokens (class token first) -> (B, dim) unit vectors."""
        return nn.functional.normalize(self.image_proj(image_tokens[:, 0]).float(), dim=-1)

    def text_features(self, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, D) embedded text tokens and their (B, L) mask -> (B, dim) unit vectors."""
        mask = attention_mask.to(text_tokens.dtype).unsqueeze(-1)
        mean = (text_tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return nn.functional.normalize(self.text_proj(mean).float(), dim=-1)
