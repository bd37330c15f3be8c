"""The vqa_rad layout (see the package docstring for its files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _hex_id, _save_jpeg, _split_names, _write_json
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import random_scene
from umd_lightning.data.synthetic.text import questions

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
