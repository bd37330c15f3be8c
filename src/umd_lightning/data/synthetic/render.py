"""Rendering a scene as a grayscale "scan" (and MedICaT's non-radiology bar charts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from umd_lightning.data.synthetic.scene import _JITTER, _RADIUS, _REGION_CENTRES, Scene

_INTENSITY_LEVELS = {"bright": (215, 246), "dim": (125, 151)}


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` grayscale (mode ``L``) image."""
    style = {
        # body fill, outline, organ texture, noise std
        "CT": (18, 70, 42, 2.0),
        "MRI": (30, 62, 45, 6.0),
        "XR": (46, 62, 66, 3.0),
    }[scene.modality]
    body_fill, outline, texture, noise = style
    image = Image.new("L", (size, size), 6)
    draw = ImageDraw.Draw(image)
    line = max(1, round(size / 48))

    def px(box: Sequence[float]) -> list[float]:
        return [v * (size - 1) for v in box]

    body = {
        "axial": (0.04, 0.12, 0.96, 0.88),
        "coronal": (0.12, 0.03, 0.88, 0.97),
        "sagittal": (0.05,) * 2 + (0.95,) * 2,
    }
    if scene.plane == "sagittal":
        draw.rounded_rectangle(px(body["sagittal"]), radius=size * 0.2, fill=body_fill, outline=outline, width=line)
    else:
        draw.ellipse(px(body[scene.plane]), fill=body_fill, outline=outline, width=line)
    if scene.organ == "chest":
        for y in np.linspace(0.2, 0.8, 7):
            draw.line(px((0.18, y, 0.82, y)), fill=texture, width=line)
    elif scene.organ == "abdomen":
        dot = max(0.5, size / 64)
        for y in np.linspace(0.2, 0.8, 7):
            for x in np.linspace(0.2, 0.8, 7):
                cx, cy = x * (size - 1), y * (size - 1)
                draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=texture)
    else:
        draw.ellipse(px((0.15, 0.15, 0.85, 0.85)), outline=texture, width=line)

    for lesion in scene.lesions:
        cx, cy = _REGION_CENTRES[lesion.region]
        cx = (cx + rng.uniform(-_JITTER, _JITTER)) * size
        cy = (cy + rng.uniform(-_JITTER, _JITTER)) * size
        r = rng.uniform(*_RADIUS) * size
        value = int(rng.integers(*_INTENSITY_LEVELS[lesion.intensity]))
        if lesion.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=value)
        elif lesion.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=value)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=value)

    if scene.modality == "MRI":
        image = image.filter(ImageFilter.GaussianBlur(radius=0.4 * size / 64))
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, noise, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")


def render_chart(size: int, rng: np.random.Generator) -> tuple[Image.Image, int, int]:
    """A non-radiology figure: a bar chart on white. Returns the RGB image, the number of bars and the
    (1-based) index of the tallest bar."""
    bars = int(rng.integers(3, 6))
    heights = rng.permutation(np.linspace(0.3, 0.85, bars))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    width = 0.8 / bars
    for i, height in enumerate(heights):
        x0 = 0.1 + i * width
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        draw.rectangle(
            ((x0 + 0.1 * width) * size, (0.9 - height) * size, (x0 + 0.9 * width) * size, 0.9 * size),
            fill=colour,
        )
    draw.line((0.08 * size, 0.9 * size, 0.92 * size, 0.9 * size), fill=(0, 0, 0), width=max(1, size // 48))
    return image, bars, int(np.argmax(heights)) + 1
