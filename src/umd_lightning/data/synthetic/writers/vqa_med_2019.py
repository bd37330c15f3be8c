"""The vqa_med_2019 layout (see the package docstring for its files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_jpeg, _split_names, _write_text
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import Scene, random_scene

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
