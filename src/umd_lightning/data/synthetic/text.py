"""The texts about a scene: captions and the closed / open VQA questions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from umd_lightning.data.synthetic.scene import MODALITIES, SHAPES, Scene


@dataclass(frozen=True)
class QA:
    """A question about a scene, a rephrasing, its lower-case answer, ``answer_type`` (``CLOSED``/``OPEN``)
    and ``kind`` (presence, side, modality, count, organ, shape, position, intensity, plane)."""

    question: str
    paraphrase: str
    answer: str
    answer_type: str
    kind: str


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A one-sentence description naming the modality, organ and every lesion (plane in some templates)."""
    phrases = " and ".join(lesion.phrase() for lesion in scene.lesions)
    count = len(scene.lesions)
    lesions_word = f"{('no', 'one', 'two')[count]} lesion{'s' if count != 1 else ''}"
    template = int(rng.integers(3))
    if template == 0:
        return f"{scene.modality} of the {scene.organ} showing {phrases}."
    if template == 1:
        return f"{scene.plane.capitalize()} {scene.modality} image of the {scene.organ} with {phrases}."
    return f"{scene.organ.capitalize()} {scene.modality}: {lesions_word}, {phrases}."


def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """All question kinds about ``scene`` (one of each, in a fixed order of kinds), answers lower-case."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = ("left", "right")[int(rng.integers(2))]
    asked_modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    lesion = scene.lesions[int(rng.integers(len(scene.lesions)))]
    modality_word = {"CT": "a CT scan", "MRI": "an MRI"}[asked_modality]
    return [
        QA(
            f"Is there a {shape}?",
            f"Does the image contain a {shape}?",
            yes(scene.lesion_with(shape) is not None),
            "CLOSED",
            "presence",
        ),
        QA(
            f"Is there a lesion on the {side} side?",
            f"Is any lesion located on the {side}?",
            yes(any(side in les.region for les in scene.lesions)),
            "CLOSED",
            "side",
        ),
        QA(
            f"Is this {modality_word}?",
            f"Was this image taken as {modality_word}?",
            yes(scene.modality == asked_modality),
            "CLOSED",
            "modality",
        ),
        QA(
            f"Is the {lesion.shape} bright?",
            f"Does the {lesion.shape} appear bright?",
            yes(lesion.intensity == "bright"),
            "CLOSED",
            "intensity",
        ),
        QA(
            "How many lesions are there?",
            "How many lesions are seen in the image?",
            str(len(scene.lesions)),
            "OPEN",
            "count",
        ),
        QA("What organ is shown?", "Which body part is imaged?", scene.organ, "OPEN", "organ"),
        QA(
            "What imaging modality is this?",
            "How was this image acquired?",
            scene.modality.lower(),
            "OPEN",
            "modality",
        ),
        QA(
            f"What shape is in the {lesion.region}?",
            f"What is the shape of the lesion in the {lesion.region}?",
            lesion.shape,
            "OPEN",
            "shape",
        ),
        QA(
            f"Where is the {lesion.shape}?",
            f"In which part of the image is the {lesion.shape}?",
            lesion.region,
            "OPEN",
            "position",
        ),
        QA("In what plane is this image?", "Which plane is shown?", scene.plane, "OPEN", "plane"),
    ]
