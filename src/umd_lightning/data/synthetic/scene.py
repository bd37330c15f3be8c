"""Scene sampling: what an image shows (organ, plane, modality, lesions) and where each region lies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")

REGIONS = ("upper left", "upper right", "lower left", "lower right", "centre")

INTENSITIES = ("bright", "dim")

ORGANS = ("chest", "abdomen", "head")

MODALITIES = ("CT", "MRI")

PLANES = ("axial", "coronal", "sagittal")

_REGION_CENTRES = {
    "upper left": (0.25, 0.25),
    "upper right": (0.75, 0.25),
    "lower left": (0.25, 0.75),
    "lower right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}

# Radius and jitter keep lesions of neighbouring regions apart: a quadrant lesion spans at most
# 0.25 + 0.01 + 0.11 = 0.37 of the side, a centre lesion starts at 0.5 - 0.01 - 0.11 = 0.38.
_RADIUS = (0.09, 0.11)

_JITTER = 0.01


@dataclass(frozen=True)
class Lesion:
    """One drawn shape: ``shape`` in SHAPES, ``region`` in REGIONS, ``intensity`` in INTENSITIES."""

    shape: str
    region: str
    intensity: str

    def phrase(self) -> str:
        """``"a bright circle in the upper left"``."""
        return f"a {self.intensity} {self.shape} in the {self.region}"


@dataclass(frozen=True)
class Scene:
    """Everything an image shows and its texts may say. ``modality`` is in MODALITIES (or ``"XR"`` for chest
    radiographs), ``organ`` in ORGANS, ``plane`` in PLANES; ``lesions`` have distinct shapes and regions."""

    modality: str
    organ: str
    plane: str
    lesions: tuple[Lesion, ...]

    def lesion_with(self, shape: str) -> Lesion | None:
        return next((lesion for lesion in self.lesions if lesion.shape == shape), None)

    def lesion_at(self, region: str) -> Lesion | None:
        return next((lesion for lesion in self.lesions if lesion.region == region), None)


def region_box(region: str, size: int) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` (right/bottom exclusive) that holds any lesion drawn in
    ``region`` of a ``size`` x ``size`` image, and no part of a lesion of another region."""
    cx, cy = _REGION_CENTRES[region]
    reach = _RADIUS[1] + _JITTER + 0.005
    return (
        max(0, int((cx - reach) * size)),
        max(0, int((cy - reach) * size)),
        min(size, int(np.ceil((cx + reach) * size))),
        min(size, int(np.ceil((cy + reach) * size))),
    )


def random_scene(
    rng: np.random.Generator,
    *,
    min_lesions: int = 1,
    max_lesions: int = 2,
    modality: str | None = None,
    organ: str | None = None,
    plane: str | None = None,
    shape: str | None = None,
) -> Scene:
    """Draw a scene; fixed ``modality``/``organ``/``plane`` and the first lesion's ``shape`` may be given."""
    count = int(rng.integers(min_lesions, max_lesions + 1))
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    if shape is not None:
        shapes.remove(shape)
        shapes.insert(0, shape)
    regions = rng.permutation(REGIONS)
    lesions = tuple(
        Lesion(shapes[i], str(regions[i]), INTENSITIES[int(rng.integers(len(INTENSITIES)))]) for i in range(count)
    )
    return Scene(
        modality=modality or MODALITIES[int(rng.integers(len(MODALITIES)))],
        organ=organ or ORGANS[int(rng.integers(len(ORGANS)))],
        plane=plane or PLANES[int(rng.integers(len(PLANES)))],
        lesions=lesions,
    )
