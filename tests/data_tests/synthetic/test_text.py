"""Texts match their images: captions, VQA answers, labels and reports (``data/synthetic/scene.py``, ``render.py``,
``text.py``)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from synthetic_helpers import (
    LESION_PHRASE,
    answer_from_image,
    find_lesions,
    gray,
    quadrant_means,
    read_csv,
)

from umd_lightning.data.synthetic import SHAPES, generate


def test_captions_name_what_the_image_shows(tmp_path: Path) -> None:
    root = generate(tmp_path, layouts=["roco"], n_images=40, image_size=64, seed=11)["roco"]
    checked = 0
    for captions in root.glob("*/radiology/captions.txt"):
        for line in captions.read_text().splitlines():
            roco_id, text = line.split("\t")
            named = {region: (shape, intensity) for intensity, shape, region in LESION_PHRASE.findall(text)}
            if not named:
                continue  # the deliberately short captions
            image = gray(captions.parent / "images" / f"{roco_id}.jpg")
            found = find_lesions(image)
            assert {region: shape for region, (shape, _) in found.items()} == {r: s for r, (s, _) in named.items()}
            means = quadrant_means(image)
            empty = [q for q in means if q not in named]
            for region, (_, intensity) in named.items():
                if region != "centre":
                    assert all(means[region] > means[q] for q in empty), (text, means)
                assert (found[region][1] > 190) == (intensity == "bright"), (text, found)
            checked += 1
    assert checked >= 30


def test_vqa_answers_match_the_image(tmp_path: Path) -> None:
    roots = generate(tmp_path, layouts=["vqa_rad", "slake"], n_images=30, image_size=64, seed=3)
    pairs = [
        (roots["vqa_rad"] / "VQA_RAD Image Folder" / r["image_name"], r["question"], str(r["answer"]))
        for r in json.loads((roots["vqa_rad"] / "VQA_RAD Dataset Public.json").read_text())
    ]
    for split in ("train", "validate", "test"):
        records = json.loads((roots["slake"] / f"{split}.json").read_text(encoding="utf-8"))
        pairs += [(roots["slake"] / "imgs" / r["img_name"], r["question"], r["answer"]) for r in records]
    checked = defaultdict(int)
    for path, question, answer in pairs:
        seen = answer_from_image(question, gray(path))
        if seen is not None:
            assert seen == answer.lower(), (path.name, question, answer)
            checked[question.split()[0] + ("-none" if answer == "None" else "")] += 1
    assert set(checked) >= {"Is", "Does", "What", "Where", "How", "In", "What-none"}, checked
    assert sum(checked.values()) >= 100


def test_labels_and_answers_about_modality_organ_shape(tmp_path: Path) -> None:
    roots = generate(tmp_path, layouts=["melinda", "vqa_med_2019"], n_images=24, image_size=64, seed=4)
    for split in ("train", "dev", "test"):
        for row in read_csv(roots["melinda"] / f"{split}.csv"):
            image = gray(roots["melinda"] / "melinda_images" / row["figure_file"])
            assert [shape for shape, _ in find_lesions(image).values()] == [row["p_meth_label"]]
            # The body between the upper lesions holds no lesion or texture: fill 18 for CT, 30 for MRI.
            body = np.median(image[15:18, 30:34])
            assert (body > 24) == (row["i_meth_label"] == "MRI"), (row, body)
    folder = roots["vqa_med_2019"] / "ImageClef-2019-VQA-Med-Training"
    for line in (folder / "QAPairsByCategory" / "C4_Abnormality_train.txt").read_text().splitlines():
        image_id, _, answer = line.split("|")
        ((shape, peak),) = find_lesions(gray(folder / "Train_images" / f"{image_id}.jpg")).values()
        assert answer == f"{'bright' if peak > 190 else 'dim'} {shape}"


def test_mimic_reports_describe_their_images(tmp_path: Path) -> None:
    root = generate(tmp_path, layouts=["mimic_cxr"], n_images=20, image_size=64, seed=8)["mimic_cxr"]
    for row in read_csv(root / "mimic-cxr-2.0.0-metadata.csv"):
        subject, study = row["subject_id"], row["study_id"]
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        report = (folder / f"s{study}.txt").read_text()
        found = find_lesions(gray(folder / f"s{study}" / f"{row['dicom_id']}.jpg"))
        if "IMPRESSION:" in report and "FINDINGS:" not in report:  # the impression names shapes only
            assert sorted(shape for shape, _ in found.values()) == sorted(re.findall("|".join(SHAPES), report))
        else:
            named = {region: shape for _, shape, region in LESION_PHRASE.findall(report)}
            assert {region: shape for region, (shape, _) in found.items()} == named, (row, report)
