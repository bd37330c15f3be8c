"""What the synthetic-data tests share: the fixture folder, reading trees and images back, and finding the lesions
an image shows (to check texts against pixels)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from umd_lightning.data.synthetic import REGIONS, region_box

FIXTURES = Path(__file__).resolve().parents[2] / "data"


REAL_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


LESION_THRESHOLD = 95  # every non-lesion pixel is drawn below this grey level (module docstring)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def find_lesions(image: np.ndarray) -> dict[str, tuple[str, float]]:
    """Region -> (shape, peak grey level) of each lesion, from the threshold mask's fill of its bounding box:
    about 1.0 for a square, pi/4 for a circle, 1/2 for a triangle."""
    found = {}
    for region in REGIONS:
        left, top, right, bottom = region_box(region, image.shape[0])
        patch = image[top:bottom, left:right]
        mask = patch > LESION_THRESHOLD
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "triangle" if fill < 0.65 else "circle" if fill < 0.87 else "square"
        found[region] = (shape, float(patch.max()))
    return found


def answer_from_image(question: str, image: np.ndarray) -> str | None:
    """Answer one of the generator's English questions by looking at the image (None: not about the image)."""
    lesions = find_lesions(image)
    shapes = {shape: region for region, (shape, _) in lesions.items()}
    if match := re.fullmatch(r"(?:What shape is in|What is the shape of the lesion in) the (.+)\?", question):
        return lesions.get(match[1], ("none",))[0]
    if match := re.fullmatch(r"(?:Is there|Does the image contain) a (\w+)\?", question):
        return "yes" if match[1] in shapes else "no"
    if match := re.fullmatch(
        r"(?:Is there a lesion on the|Is any lesion located on the) (left|right)(?: side)?\?", question
    ):
        return "yes" if any(match[1] in region for region in lesions) else "no"
    if match := re.fullmatch(r"(?:Where is|In which part of the image is) the (\w+)\?", question):
        return shapes.get(match[1], "none")
    if match := re.fullmatch(r"(?:Is|Does) the (\w+) (?:appear )?bright\?", question):
        region = shapes[match[1]]
        return "yes" if lesions[region][1] > 190 else "no"
    if question.startswith("How many lesions"):
        return str(len(lesions))
    return None


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


LESION_PHRASE = re.compile(
    r"a (bright|dim) (circle|square|triangle) in the (upper left|upper right|lower left|"
    r"lower right|centre)"
)


def quadrant_means(image: np.ndarray) -> dict[str, float]:
    half = image.shape[0] // 2
    return {
        "upper left": image[:half, :half].mean(),
        "upper right": image[:half, half:].mean(),
        "lower left": image[half:, :half].mean(),
        "lower right": image[half:, half:].mean(),
    }
