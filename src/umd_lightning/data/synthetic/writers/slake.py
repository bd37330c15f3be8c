"""The slake layout (see the package docstring for its files)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _save_jpeg, _split_names, _write_json
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import REGIONS, SHAPES, Scene, random_scene
from umd_lightning.data.synthetic.text import QA, questions

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
