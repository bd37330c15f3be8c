"""Random patch masking, patchify / unpatchify and the normalised-pixel target."""

from __future__ import annotations

import pytest
import torch

from umd_lightning.models.masking import (
    normalized_pixel_targets,
    num_kept,
    patchify,
    random_masking,
    unpatchify,
)


@pytest.mark.parametrize(
    ("num_patches", "ratio", "expected"), [(16, 0.75, 4), (196, 0.75, 49), (10, 0.5, 5), (4, 1.0, 1)]
)
def test_num_kept(num_patches: int, ratio: float, expected: int) -> None:
    assert num_kept(num_patches, ratio) == expected


def test_num_kept_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        num_kept(16, 1.5)


def test_random_masking_keeps_unique_sorted_patches_consistent_with_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    keep, mask = random_masking(8, 36, 0.75, "cpu", generator=generator)
    assert keep.shape == (8, 9) and keep.dtype == torch.long
    assert mask.shape == (8, 36) and mask.dtype == torch.bool
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # strictly ascending, hence unique
    assert torch.all(mask.sum(dim=1) == 27)
    assert not mask.gather(1, keep).any()  # kept patches are exactly the unmasked ones
    # Different samples get different masks, and the generator makes them reproducible.
    assert len({tuple(row.tolist()) for row in keep}) > 1
    again, _ = random_masking(8, 36, 0.75, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_patchify_layout_and_round_trip() -> None:
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # Patch 4 is grid row 1, column 1; its vector reads (row, col, channel).
    expected = images[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 4], expected)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


def test_patchify_rejects_size_not_multiple_of_patch() -> None:
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(1, 3, 10, 8), 4)


def test_normalized_pixel_targets_have_zero_mean_unit_variance() -> None:
    patches = torch.randn(3, 5, 48) * 7 + 3
    target = normalized_pixel_targets(patches)
    assert torch.allclose(target.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(3, 5), atol=1e-4)
    known = normalized_pixel_targets(torch.tensor([[[1.0, 3.0]]]), eps=0.0)  # mean 2, unbiased var 2
    assert torch.allclose(known, torch.tensor([[[-(0.5**0.5), 0.5**0.5]]]))
