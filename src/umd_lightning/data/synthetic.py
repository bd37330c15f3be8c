"""Seeded synthetic medical image-text data, written in the publishers' own file layouts (DATA.md).

Every image is a dark "scan" whose content its texts describe, so a model trained on it can learn something:

* **Lesions**: one or two filled shapes (``circle`` / ``square`` / ``triangle``, never the same shape twice in
  an image), each in its own region (``upper left``, ``upper right``, ``lower left``, ``lower right``,
  ``centre``; see :func:`region_box`) with an intensity: ``bright`` (grey level 215-245) or ``dim`` (125-150).
  Everything else stays below grey level 95, so a threshold finds the lesions.
* **Organ** (``chest`` / ``abdomen`` / ``head``): a faint texture inside the body: horizontal ribs, a grid of
  dots (bowel), or an inner ring (skull).
* **Plane** (``axial`` / ``coronal`` / ``sagittal``): the body outline is a wide ellipse, a tall ellipse, or a
  rounded square.
* **Modality** (``CT`` / ``MRI``): CT is sharp with little noise; MRI is blurred, brighter inside the body and
  noisier. MIMIC-CXR images use a third style, a chest radiograph (``XR``: grey body, brighter ribs).

Captions name the modality, organ (sometimes the plane) and every lesion ("CT of the chest showing a bright
circle in the upper left and a dim triangle in the centre."). VQA pairs ask about the same facts, closed
(``yes``/``no``: is there a <shape>, is there a lesion on the <side> side, is this a CT scan, is the <shape>
bright) and open (what shape is in the <region>, where is the <shape>, how many lesions, what organ, what
modality, what plane); see :func:`questions`.

Layouts, by the folder each writes under ``out`` (``generate`` returns these, the roots a loader takes):

``roco``
    ROCO: ``{train,validation,test}/radiology/captions.txt`` (``ROCO_<id>\\t <caption>``),
    ``images/ROCO_<id>.jpg`` and ``keywords.txt``. Every 8th caption has under 3 words (``CT chest``), every
    3rd carries stray spaces.
``medicat``
    MedICaT: ``release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl`` and
    ``release/figures/<pdf_hash>_<fig_uri>`` (RGB PNG). Every 4th figure is a bar chart with
    ``radiology: false``; ``s2orc_references`` is null for every 5th, else 1-3 strings, some under 3 words.
``mimic_cxr``
    MIMIC-CXR(-JPG): ``files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg``, reports
    ``files/p<NN>/p<subject_id>/s<study_id>.txt`` (FINDINGS and IMPRESSION; every 6th study lacks both, others
    one of them), ``mimic-cxr-2.0.0-metadata.csv`` (``ViewPosition`` PA/AP/LATERAL, lateral views drawn with
    the sagittal outline) and ``mimic-cxr-2.0.0-split.csv`` (train/validate/test, by subject). Some studies
    have no lesion ("No focal lesion.").
``vqa_rad``
    VQA-RAD official: ``VQA_RAD Dataset Public.json`` (indent 3, the release's fields; the first ``qid`` a
    string, some count answers JSON numbers, ``Yes``/``yes`` mixed, one ``"CLOSED "``) and
    ``VQA_RAD Image Folder/synpic<N>.jpg``. The last 20 % of images carry ``test_freeform``/``test_para``
    questions; a ``para`` record rephrases the ``freeform`` one before it.
``vqa_rad_preprocessed``
    The same records (fewer fields) as ``trainset.json``, ``testset.json``, ``valset.json`` (a copy of the
    test set, as M3AE ships it) and ``images/``.
``slake``
    SLAKE 1.0: ``{train,validate,test}.json`` (indent 4, UTF-8) and ``imgs/xmlab<N>/source.jpg``. Every 4th
    image of a split has only Chinese (``zh``) questions; every 3rd English image also asks about an empty
    region, answered with the literal string ``"None"``.
``melinda``
    MELINDA: ``{train,dev,test}.csv`` and ``melinda_images/PMC<id>_F<k>.jpg`` (RGB). One lesion per image;
    ``i_meth_label`` is the modality (``CT``/``MRI``), ``p_meth_label`` the lesion's shape, cycled so that the
    training split holds every class.
``vqa_med_2019``
    ImageCLEF VQA-Med 2019 official: ``ImageClef-2019-VQA-Med-Training/`` with ``Train_images/`` and
    ``QAPairsByCategory/C{1..4}_{Modality,Plane,Organ,Abnormality}_train.txt``, validation likewise
    (``ImageClef-2019-VQA-Med-Validation/``, ``Val_images/``, ``_val``), and ``VQAMed2019Test/`` with
    ``VQAMed2019_Test_Images/`` and ``VQAMed2019_Test_Questions_w_Ref_Answers.txt``
    (``image_id|category|question|answer``). One lesion, one question per category per image, lower case.
``vqa_med_2019_m3ae``
    The same questions in M3AE's layout: ``{train,val,test}/QA/{Modality,Organ,Plane}.csv``
    (``image_id|question|answer``) and ``{split}/images/<image_id>.jpg``.
``jsonl``
    Generic JSONL: ``data.jsonl`` (``image`` a relative path, every 5th an RGB PNG; ``text`` a string or,
    every 3rd record, a list of two strings; ``split`` in train/val/test) and ``images/``.

``generate(layouts=...)`` names ``vqa_rad`` and ``vqa_med_2019`` once each; each writes both its folders.
Splits are about 70/15/15 % of the images (80/20 for VQA-RAD), each holding at least one. The output is a pure
function of the arguments: numpy ``Generator`` streams seeded from ``(seed, layout)`` (so a layout's bytes
do not depend on which others are written), PIL drawing, JPEG quality 90, no time stamps.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LAYOUTS = ("roco", "medicat", "mimic_cxr", "vqa_rad", "slake", "melinda", "vqa_med_2019", "jsonl")
"""Names accepted by ``generate(layouts=...)``."""
OUTPUT_FOLDERS = {
    "roco": ("roco",),
    "medicat": ("medicat",),
    "mimic_cxr": ("mimic_cxr",),
    "vqa_rad": ("vqa_rad", "vqa_rad_preprocessed"),
    "slake": ("slake",),
    "melinda": ("melinda",),
    "vqa_med_2019": ("vqa_med_2019", "vqa_med_2019_m3ae"),
    "jsonl": ("jsonl",),
}
"""The folders (under ``out``) each layout writes; also the keys of ``generate``'s result."""

SHAPES = ("circle", "square", "triangle")
REGIONS = ("upper left", "upper right", "lower left", "lower right", "centre")
INTENSITIES = ("bright", "dim")
ORGANS = ("chest", "abdomen", "head")
MODALITIES = ("CT", "MRI")
PLANES = ("axial", "coronal", "sagittal")
MIN_IMAGES = 6
"""Smallest ``n_images``: three non-empty splits, and a MELINDA training split holding all three shapes."""

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
_INTENSITY_LEVELS = {"bright": (215, 246), "dim": (125, 151)}
_JPEG_QUALITY = 90


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


@dataclass(frozen=True)
class QA:
    """A question about a scene, a rephrasing, its lower-case answer, ``answer_type`` (``CLOSED``/``OPEN``)
    and ``kind`` (presence, side, modality, count, organ, shape, position, intensity, plane)."""

    question: str
    paraphrase: str
    answer: str
    answer_type: str
    kind: str


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


def _rng(seed: int, layout: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(layout.encode())])


def _split_sizes(n: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[int]:
    """Split ``n`` items by ``fractions``; each split but the first gets at least one, the first the rest."""
    rest = [max(1, int(n * fraction)) for fraction in fractions[1:]]
    return [n - sum(rest), *rest]


def _split_names(n: int, names: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[str]:
    """The split name of each of ``n`` consecutive items."""
    return [name for name, count in zip(names, _split_sizes(n, fractions)) for _ in range(count)]


def _save_jpeg(image: Image.Image, *paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_text(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", newline="\n")


def _write_json(path: Path, data: object, *, indent: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _hex_id(rng: np.random.Generator, groups: Sequence[int]) -> str:
    """Dash-separated random hex groups of the given lengths (UUID-like or MIMIC ``dicom_id``-like)."""
    return "-".join(rng.bytes((length + 1) // 2).hex()[:length] for length in groups)


def _write_roco(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    number = 0
    for split, count in zip(("train", "validation", "test"), _split_sizes(n)):
        folder = root / split / "radiology"
        captions, keywords = [], []
        for _ in range(count):
            number += 1
            roco_id = f"ROCO_{number:05d}"
            scene = random_scene(rng)
            _save_jpeg(render(scene, size, rng), folder / "images" / f"{roco_id}.jpg")
            if number % 8 == 0:
                text = f"{scene.modality} {scene.organ}"  # under 3 words: loaders must drop it
            else:
                text = caption(scene, rng)
                if number % 3 == 0:
                    text = text.replace(" ", "  ", 2) + " "  # stray spaces, as in the release
            captions.append(f"{roco_id}\t {text}")
            words = [scene.modality.lower(), scene.organ, *(lesion.shape for lesion in scene.lesions)]
            keywords.append(f"{roco_id}\t" + "\t".join(words))
        _write_text(folder / "captions.txt", captions)
        _write_text(folder / "keywords.txt", keywords)


def _write_medicat(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    release = root / "release"
    lines = []
    pdf_hash, figure = "", 0
    for index in range(n):
        if index == 0 or rng.random() < 0.5:
            pdf_hash, figure = rng.bytes(20).hex(), 0
        figure += 1
        fig_uri = f"{int(rng.integers(1, 12))}-Figure{figure}-1.png"
        radiology = index % 4 != 3
        if radiology:
            scene = random_scene(rng)
            image = render(scene, size, rng).convert("RGB")
            text = f"Figure {figure}. {caption(scene, rng)}"
            lesion = scene.lesions[0]
            mentions = [
                f"The {scene.organ} {scene.modality} (Figure {figure}) showed {lesion.phrase()}.",
                f"Figure {figure} shows {len(scene.lesions)} lesion{'s' if len(scene.lesions) > 1 else ''}.",
            ]
        else:
            image, bars, tallest = render_chart(size, rng)
            text = f"Figure {figure}. Bar chart of {bars} groups; group {tallest} has the tallest bar."
            mentions = [
                f"Group {tallest} scored highest of the {bars} groups (Figure {figure}).",
                "see above",
            ]
        _save_png(image, release / "figures" / f"{pdf_hash}_{fig_uri}")
        references = None
        if index % 5 != 4:
            references = mentions[: 1 + index % 2]
            if index % 3 == 0:
                references.append(f"(Figure {figure})")  # under 3 words: not a usable text
        record = {
            "pdf_hash": pdf_hash,
            "fig_uri": fig_uri,
            "s2_caption": text,
            "s2orc_references": references,
            "radiology": radiology,
        }
        lines.append(json.dumps(record))
    _write_text(release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", lines)


def _mimic_report(scene: Scene, sections: str) -> str:
    count = len(scene.lesions)
    if count:
        findings = "There is " + " and ".join(lesion.phrase() for lesion in scene.lesions) + "."
        shapes = " and ".join(lesion.shape for lesion in scene.lesions)
        impression = f"{('One', 'Two')[count - 1]} focal lesion{'s' if count > 1 else ''}: {shapes}."
    else:
        findings, impression = "The lungs are clear. No focal lesion.", "No focal lesion."
    parts = [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        "",
        " INDICATION:  ___ with cough.",
        "",
        " TECHNIQUE:  Chest PA and lateral",
        "",
        " COMPARISON:  None.",
        "",
    ]
    if sections in ("both", "findings"):
        parts += [" FINDINGS:", "", f" {findings} Heart size is normal.", ""]
    if sections in ("both", "impression"):
        parts += [" IMPRESSION:", "", f" {impression}", ""]
    if sections == "neither":
        parts += [f" {findings}", ""]  # free text without the section headers a loader looks for
    return "\n".join(parts)


def _write_mimic_cxr(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    studies: list[tuple[int, Scene, list[tuple[str, str]]]] = []  # (study_id, scene, [(dicom_id, view)])
    images = 0
    study_ids = iter(50_000_000 + rng.choice(10_000_000, size=n, replace=False))
    while images < n:
        views = [("PA", "AP")[int(rng.integers(2))]]
        if images + 2 <= n and rng.random() < 0.4:
            views.append("LATERAL")
        images += len(views)
        scene = random_scene(rng, min_lesions=0, modality="XR", organ="chest", plane="coronal")
        studies.append((int(next(study_ids)), scene, [(_hex_id(rng, (8,) * 5), view) for view in views]))
    # Group consecutive studies into subjects (1-2 each), keeping at least three subjects for three splits.
    subjects: list[list[int]] = []
    for index in range(len(studies)):
        if not subjects or len(studies) <= 4 or len(subjects[-1]) == 2 or rng.random() < 0.5:
            subjects.append([])
        subjects[-1].append(index)
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=len(subjects), replace=False)
    splits = _split_names(len(subjects), ("train", "validate", "test"))
    metadata, split_rows = [], []
    for subject_id, split, members in zip(subject_ids, splits, subjects):
        subject = f"p{subject_id}"
        folder = root / "files" / subject[:3] / subject
        for index in members:
            study_id, scene, dicoms = studies[index]
            sections = ("both", "both", "findings", "impression", "both", "neither")[index % 6]
            _write_text(folder / f"s{study_id}.txt", [_mimic_report(scene, sections)])
            date = f"21{int(rng.integers(10, 90))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            for dicom_id, view in dicoms:
                view_scene = (
                    Scene(scene.modality, scene.organ, "sagittal", scene.lesions) if view == "LATERAL" else scene
                )
                _save_jpeg(render(view_scene, size, rng), folder / f"s{study_id}" / f"{dicom_id}.jpg")
                view_name = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
                metadata.append(
                    [
                        dicom_id,
                        subject_id,
                        study_id,
                        "CHEST (PA AND LAT)",
                        view,
                        size,
                        size,
                        date,
                        f"{int(rng.integers(0, 240000)):06d}.000",
                        "CHEST (PA AND LAT)",
                        view_name,
                        "Erect",
                    ]
                )
                split_rows.append([dicom_id, study_id, subject_id, split])
    header = [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", header, metadata)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)


_VQA_RAD_TYPES = {
    "presence": "PRES",
    "side": "POS",
    "modality": "MODALITY",
    "intensity": "ATTRIB",
    "count": "COUNT",
    "organ": "ORGAN",
    "shape": "ATTRIB",
    "position": "POS",
    "plane": "PLANE",
}
_VQA_RAD_ORGANS = {"chest": "CHEST", "abdomen": "ABD", "head": "HEAD"}


def _write_vqa_rad(root: Path, preprocessed: Path, n: int, size: int, rng: np.random.Generator) -> None:
    numbers = 10_000 + rng.choice(90_000, size=n, replace=False)
    splits = _split_names(n, ("train", "test"), (0.8, 0.2))
    records: list[dict] = []
    for number, split in zip(numbers, splits):
        image_name = f"synpic{number}.jpg"
        scene = random_scene(rng)
        _save_jpeg(
            render(scene, size, rng),
            root / "VQA_RAD Image Folder" / image_name,
            preprocessed / "images" / image_name,
        )
        case_url = f"https://medpix.nlm.nih.gov/case?id={_hex_id(rng, (8, 4, 4, 4, 12))}"
        candidates = questions(scene, rng)
        for pick in sorted(rng.choice(len(candidates), size=4, replace=False)):
            qa = candidates[pick]
            answer: str | int = qa.answer
            # Two thirds of closed and a fifth of open answers are capitalised, so both cases always occur.
            capitalise = len(records) % 3 != 0 if qa.answer_type == "CLOSED" else len(records) % 5 == 0
            if qa.kind == "count" and rng.random() < 0.5:
                answer = int(qa.answer)  # the release stores some numeric answers as JSON numbers
            elif capitalise:
                answer = qa.answer.upper() if qa.kind == "modality" else qa.answer.capitalize()  # CT, MRI
            phrasings = [("freeform", qa.question)]
            if rng.random() < 0.35:
                phrasings.append(("para", qa.paraphrase))
            for phrase_type, question in phrasings:
                records.append(
                    {
                        "qid": len(records),
                        "phrase_type": f"test_{phrase_type}" if split == "test" else phrase_type,
                        "qid_linked_id": _hex_id(rng, (8, 4, 4, 4, 12)),
                        "image_case_url": case_url,
                        "image_name": image_name,
                        "image_organ": _VQA_RAD_ORGANS[scene.organ],
                        "evaluation": "not evaluated",
                        "question": question,
                        "question_rephrase": "NULL",
                        "question_relation": "NULL",
                        "question_frame": "NULL",
                        "question_type": _VQA_RAD_TYPES[qa.kind],
                        "answer": answer,
                        "answer_type": qa.answer_type,
                    }
                )
    records[0]["qid"] = "0"  # as in the release, where the first qid alone is a string
    first_closed = next(r for r in records[1:] if r["answer_type"] == "CLOSED")
    first_closed["answer_type"] = "CLOSED "  # the release's one value with a trailing space
    _write_json(root / "VQA_RAD Dataset Public.json", records, indent=3)

    kept = (
        "qid",
        "image_name",
        "image_organ",
        "answer",
        "answer_type",
        "question_type",
        "question",
        "phrase_type",
    )
    slim = [{key: record[key] for key in kept} for record in records]
    test = [record for record in slim if record["phrase_type"].startswith("test_")]
    _write_json(preprocessed / "trainset.json", [r for r in slim if r not in test], indent=3)
    _write_json(preprocessed / "testset.json", test, indent=3)
    _write_json(preprocessed / "valset.json", test, indent=3)


_SLAKE_CONTENT = {
    "presence": "Abnormality",
    "side": "Position",
    "modality": "Modality",
    "intensity": "Color",
    "count": "Quantity",
    "organ": "Organ",
    "shape": "Shape",
    "position": "Position",
    "plane": "Plane",
}
_SLAKE_LOCATIONS = {"chest": "Lung", "abdomen": "Abdomen", "head": "Brain"}
_ZH_SHAPES = {"circle": "圆形", "square": "方形", "triangle": "三角形"}
_ZH_ORGANS = {"chest": "胸部", "abdomen": "腹部", "head": "头部"}


def _slake_zh_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    present = "是" if scene.lesion_with(shape) else "否"
    return [
        QA(f"图中有{_ZH_SHAPES[shape]}吗?", "", present, "CLOSED", "presence"),
        QA("图中显示的是什么器官?", "", _ZH_ORGANS[scene.organ], "OPEN", "organ"),
        QA("图中有几个病灶?", "", str(len(scene.lesions)), "OPEN", "count"),
        QA("这是什么成像方式?", "", scene.modality, "OPEN", "modality"),
    ]


def _write_slake(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    splits = _split_names(n, ("train", "validate", "test"))
    records: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    qid = 0
    english_images = 0
    images_in_split: Counter[str] = Counter()
    for number, split in enumerate(splits, start=1):
        scene = random_scene(rng)
        img_name = f"xmlab{number}/source.jpg"
        _save_jpeg(render(scene, size, rng), root / "imgs" / img_name)
        images_in_split[split] += 1
        if images_in_split[split] % 4 == 0:
            language, pairs = "zh", _slake_zh_questions(scene, rng)
        else:
            language = "en"
            candidates = questions(scene, rng)
            pairs = [candidates[i] for i in sorted(rng.choice(len(candidates), size=5, replace=False))]
            if english_images % 3 == 0:
                empty = [region for region in REGIONS if scene.lesion_at(region) is None]
                region = empty[int(rng.integers(len(empty)))]
                pairs.append(QA(f"What shape is in the {region}?", "", "None", "OPEN", "shape"))
            english_images += 1
        for qa in pairs:
            answer = qa.answer.capitalize() if qa.answer in ("yes", "no") else qa.answer
            records[split].append(
                {
                    "img_id": number,
                    "img_name": img_name,
                    "question": qa.question,
                    "answer": answer,
                    "q_lang": language,
                    "location": _SLAKE_LOCATIONS[scene.organ],
                    "modality": scene.modality,
                    "answer_type": qa.answer_type,
                    "base_type": "vqa",
                    "content_type": _SLAKE_CONTENT[qa.kind],
                    "triple": ["vhead", "_", "_"],
                    "qid": qid,
                }
            )
            qid += 1
    for split, split_records in records.items():
        _write_json(root / f"{split}.json", split_records, indent=4)


_MELINDA_METHODS = {"CT": "computed tomography", "MRI": "magnetic resonance imaging"}
_MELINDA_SHAPES = {"circle": "round", "square": "square", "triangle": "triangular"}


def _write_melinda(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    splits = _split_names(n, ("train", "dev", "test"))
    pmc_ids = 1_000_000 + rng.choice(9_000_000, size=n, replace=False)
    rows: dict[str, list[list[str]]] = {"train": [], "dev": [], "test": []}
    for index, (pmc_id, split) in enumerate(zip(pmc_ids, splits)):
        # Cycling the shape puts every class in the training split (it holds at least 4 of the first images).
        scene = random_scene(rng, max_lesions=1, shape=SHAPES[index % len(SHAPES)])
        lesion = scene.lesions[0]
        figure = int(rng.integers(1, 8))
        figure_file = f"PMC{pmc_id}_F{figure}.jpg"
        _save_jpeg(render(scene, size, rng).convert("RGB"), root / "melinda_images" / figure_file)
        adjective = _MELINDA_SHAPES[lesion.shape]
        text = (
            f"Figure {figure}. {scene.plane.capitalize()} {_MELINDA_METHODS[scene.modality]} "
            f"of the {scene.organ}, showing a {lesion.intensity} {adjective} lesion "
            f'in the {lesion.region} ("arrow").'
        )
        rows[split].append(
            [
                figure_file,
                text,
                _MELINDA_METHODS[scene.modality],
                f"{adjective} lesion",
                scene.modality,
                lesion.shape,
            ]
        )
    header = ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]
    for split, split_rows in rows.items():
        _write_csv(root / f"{split}.csv", header, split_rows)


_VQA_MED_CATEGORIES = ("Modality", "Plane", "Organ", "Abnormality")
_VQA_MED_QUESTIONS = {
    "Modality": ("what modality is shown?", "what kind of scan is this?", "what imaging modality was used?"),
    "Plane": ("in what plane was this image taken?", "which plane is the image shown in?"),
    "Organ": ("what organ system is shown in this image?", "what part of the body is being imaged?"),
    "Abnormality": ("what is the primary abnormality in this image?", "what is abnormal in this image?"),
}


def _vqa_med_answer(scene: Scene, category: str) -> str:
    lesion = scene.lesions[0]
    return {
        "Modality": scene.modality.lower(),
        "Plane": scene.plane,
        "Organ": scene.organ,
        "Abnormality": f"{lesion.intensity} {lesion.shape}",
    }[category]


def _write_vqa_med_2019(root: Path, m3ae: Path, n: int, size: int, rng: np.random.Generator) -> None:
    numbers = 10_000 + rng.choice(90_000, size=n, replace=False)
    splits = _split_names(n, ("train", "val", "test"))
    official = {
        "train": ("ImageClef-2019-VQA-Med-Training", "Train_images", "train"),
        "val": ("ImageClef-2019-VQA-Med-Validation", "Val_images", "val"),
    }
    lines: dict[tuple[str, str], list[str]] = {}  # (split, category) -> "image_id|question|answer"
    for number, split in zip(numbers, splits):
        image_id = f"synpic{number}"
        scene = random_scene(rng, max_lesions=1)
        image_folder = root / "VQAMed2019Test" / "VQAMed2019_Test_Images"
        if split in official:
            image_folder = root / official[split][0] / official[split][1]
        _save_jpeg(
            render(scene, size, rng),
            image_folder / f"{image_id}.jpg",
            m3ae / split / "images" / f"{image_id}.jpg",
        )
        for category in _VQA_MED_CATEGORIES:
            templates = _VQA_MED_QUESTIONS[category]
            question = templates[int(rng.integers(len(templates)))]
            lines.setdefault((split, category), []).append(f"{image_id}|{question}|{_vqa_med_answer(scene, category)}")
    for split, (folder, _, suffix) in official.items():
        for number, category in enumerate(_VQA_MED_CATEGORIES, start=1):
            path = root / folder / "QAPairsByCategory" / f"C{number}_{category}_{suffix}.txt"
            _write_text(path, lines[(split, category)])
    test_lines = []
    for category in _VQA_MED_CATEGORIES:
        for line in lines[("test", category)]:
            image_id, rest = line.split("|", 1)
            test_lines.append(f"{image_id}|{category.lower()}|{rest}")
    _write_text(root / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt", test_lines)
    for split in ("train", "val", "test"):
        for category in ("Modality", "Organ", "Plane"):
            _write_text(m3ae / split / "QA" / f"{category}.csv", lines[(split, category)])


def _write_jsonl(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    lines = []
    for index, split in enumerate(_split_names(n, ("train", "val", "test"))):
        scene = random_scene(rng)
        image = render(scene, size, rng)
        if index % 5 == 4:
            relative = f"images/img_{index:04d}.png"
            _save_png(image.convert("RGB"), root / relative)
        else:
            relative = f"images/img_{index:04d}.jpg"
            _save_jpeg(image, root / relative)
        text: str | list[str] = caption(scene, rng)
        if index % 3 == 2:
            count = len(scene.lesions)
            text = [text, f"{scene.modality} {scene.organ}, {count} lesion{'s' if count > 1 else ''}."]
        lines.append(json.dumps({"image": relative, "text": text, "split": split}))
    _write_text(root / "data.jsonl", lines)


_WRITERS = {
    "roco": _write_roco,
    "medicat": _write_medicat,
    "mimic_cxr": _write_mimic_cxr,
    "vqa_rad": _write_vqa_rad,
    "slake": _write_slake,
    "melinda": _write_melinda,
    "vqa_med_2019": _write_vqa_med_2019,
    "jsonl": _write_jsonl,
}


def generate(
    out: str | Path,
    layouts: Sequence[str] = LAYOUTS,
    n_images: int = 200,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write synthetic data sets under ``out``, one folder per layout (see the module docstring).

    Args:
        out: the parent folder; created if missing.
        layouts: which of ``LAYOUTS`` to write.
        n_images: images per layout (at least ``MIN_IMAGES``).
        image_size: side of the square images in pixels (at least 16).
        seed: the only source of randomness.
        overwrite: replace a layout folder that exists and is not empty, instead of refusing.

    Returns:
        Each written folder name (``OUTPUT_FOLDERS``) mapped to its path, the root a loader is given.

    Raises:
        ValueError: an unknown layout or a too small ``n_images``/``image_size``.
        FileExistsError: a layout folder holds files and ``overwrite`` is false (nothing is written then).
    """
    out = Path(out)
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be at least {MIN_IMAGES} (three splits per layout), got {n_images}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels (lesions would vanish), got {image_size}")
    layouts = list(dict.fromkeys(layouts))
    folders = {layout: [out / name for name in OUTPUT_FOLDERS[layout]] for layout in layouts}
    occupied = [path for paths in folders.values() for path in paths if path.is_dir() and any(path.iterdir())]
    if occupied and not overwrite:
        raise FileExistsError(f"not empty: {[str(p) for p in occupied]}; pass overwrite=True (--overwrite)")
    for path in occupied:
        shutil.rmtree(path)
    roots: dict[str, Path] = {}
    for layout in layouts:
        _WRITERS[layout](*folders[layout], n_images, image_size, _rng(seed, layout))
        roots.update({path.name: path for path in folders[layout]})
    return roots


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``umd-synthetic OUT [--layouts a,b] [--images N] [--size PX] [--seed S] [--overwrite]``.

    Prints each written folder. ``python -m umd_lightning.data.synthetic`` runs the same."""
    parser = argparse.ArgumentParser(
        prog="umd-synthetic",
        description="Write seeded synthetic medical image-text data sets in their publishers' file layouts.",
    )
    parser.add_argument("out", type=Path, help="parent folder; one sub-folder per layout is written")
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"comma-separated subset of {','.join(LAYOUTS)} (default: all)",
    )
    parser.add_argument("--images", type=int, default=200, help="images per layout (default: 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing non-empty layout folders")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    try:
        roots = generate(args.out, layouts, args.images, args.size, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    for name, root in roots.items():
        print(f"{name}: {root}")


if __name__ == "__main__":
    main()
