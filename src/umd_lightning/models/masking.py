"""Random patch masking, patchify / unpatchify and the normalised-pixel MIM target (UMD_SPEC 2.1, image part).

Patch layout follows MAE: a patch is flattened row by row, each pixel's three channels together, so a patch
vector of length ``p*p*3`` reads ``(row, col, channel)``; patches are numbered row-major over the ``(h, w)``
grid.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_kept(num_patches: int, ratio: float) -> int:
    """How many patches ``random_masking`` keeps: ``N - round(N * ratio)``, at least one.

    Raises:
        ValueError: ``ratio`` outside ``[0, 1]``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return max(1, num_patches - round(num_patches * ratio))


def random_masking(
    batch: int,
    num_patches: int,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose, per sample, a random subset of patches to keep (MAE style: no patch twice).

    Args:
        batch: ``B``.
        num_patches: ``N``.
        ratio: fraction of patches to mask; ``K = N - round(N * ratio)`` are kept (at least one).
        device: where the results live.
        generator: optional RNG for reproducible masks; noise is drawn on the generator's device, then moved.

    Returns:
        ``keep_indices`` (B, K) int64, sorted ascending per row, and ``mask`` (B, N) bool, True = masked.
    """
    keep = num_kept(num_patches, ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device).to(device)
    keep_indices = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep_indices, False)
    return keep_indices, mask


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into flattened patches.

    Args:
        images: (B, C, H, W), ``H`` and ``W`` multiples of ``patch_size``.

    Returns:
        (B, N, p*p*C) with ``N = (H/p) * (W/p)`` in row-major grid order.
    """
    b, c, height, width = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    h, w = height // p, width // p
    patches = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, h * w, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: (B, N, p*p*C) with ``N = h * w``.
        grid_hw: the patch grid ``(h, w)``.

    Returns:
        (B, C, h*p, w*p).
    """
    b, n, dim = patches.shape
    h, w = grid_hw
    p = patch_size
    if n != h * w or dim % (p * p):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {grid_hw} with patch {p}")
    c = dim // (p * p)
    images = patches.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(b, c, h * p, w * p)


def normalized_pixel_targets(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised pixels, the MIM target: ``(x - mean) / sqrt(var + eps)`` over each patch's values.

    The variance is the unbiased one, as in the MAE and UMD reference code.

    Args:
        patches: (B, N, P).

    Returns:
        (B, N, P).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()
