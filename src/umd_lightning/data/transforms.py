"""Image transforms: PIL RGB image -> normalised ``FloatTensor (3, size, size)``.

Choices, and why:

- **No horizontal flip and no strong cropping.** Medical captions and reports name sides ("left lower lobe",
  "right kidney"); a flip would make the text wrong, and an aggressive ``RandomResizedCrop`` (default scale
  0.08-1) can cut away the finding the text describes. Training therefore resizes the whole image to ``(size,
  size)`` and adds only a light random crop (``train_crop_scale``, 90-100% of the area by default).
- **Evaluation keeps the aspect ratio**: the shorter side is resized to ``size`` and the centre square is
  cropped (the CLIP evaluation transform), so evaluation never stretches an image.
- **CLIP mean and std** by default, because the paper's vision tower starts from CLIP weights; pass ImageNet
  values (``IMAGENET_MEAN``, ``IMAGENET_STD``) for towers trained with those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fixed_geometry(image_size: int, train: bool) -> list[v2.Transform]:
    """The deterministic resize of :func:`image_transform`, the part ``umd data pack`` applies once when it writes a
    pack: training resizes to ``(image_size, image_size)``, evaluation resizes the shorter side to ``image_size``
    and crops the centre square. Both leave an ``image_size`` square, on which they are the identity (torchvision
    returns an image already at the target size unchanged), so a packed image goes through the same
    ``image_transform`` as a raw one and meets the random crop with the same pixels."""
    bicubic = InterpolationMode.BICUBIC
    if train:
        return [v2.Resize((image_size, image_size), interpolation=bicubic, antialias=True)]
    return [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]


def image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train_crop_scale: tuple[float, float] = (0.9, 1.0),
) -> v2.Compose:
    """Build the transform from a PIL RGB image (or a ``uint8`` tensor ``(3, H, W)``, as a pack stores it) to a
    normalised ``FloatTensor (3, image_size, image_size)``.

    Args:
        image_size: side of the square output in pixels.
        train: training transform (resize to square, then a light random crop) or evaluation transform
            (shorter side to ``image_size``, centre crop).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
        train_crop_scale: area range of the training crop, relative to the (resized) image; ``(1.0, 1.0)``
            with the default aspect range still jitters the aspect ratio slightly.

    Returns:
        a callable returning a plain ``torch.Tensor`` (not a ``tv_tensors.Image``), float32.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    low, high = train_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"train_crop_scale must satisfy 0 < low <= high <= 1, got {train_crop_scale}")
    geometry = fixed_geometry(image_size, train)
    if train:
        bicubic = InterpolationMode.BICUBIC
        geometry.append(v2.RandomResizedCrop(image_size, scale=train_crop_scale, interpolation=bicubic, antialias=True))
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )
