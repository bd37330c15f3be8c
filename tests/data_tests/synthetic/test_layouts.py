"""Each writer writes its publisher's exact DATA.md layout (``data/synthetic/writers/``)."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
from synthetic_helpers import (
    FIXTURES,
    REAL_DATA,
    read_csv,
)

from umd_lightning.data.synthetic import SHAPES


def test_roco_layout() -> None:
    root = FIXTURES / "roco"
    short = 0
    for split in ("train", "validation", "test"):
        folder = root / split / "radiology"
        lines = (folder / "captions.txt").read_text(encoding="utf-8").splitlines()
        assert lines
        ids = []
        for line in lines:
            roco_id, text = line.split("\t")
            assert re.fullmatch(r"ROCO_\d{5}", roco_id)
            assert (folder / "images" / f"{roco_id}.jpg").is_file()
            short += len(text.split()) < 3
            ids.append(roco_id)
        keyword_ids = [line.split("\t")[0] for line in (folder / "keywords.txt").read_text().splitlines()]
        assert keyword_ids == ids
        assert sorted(path.stem for path in (folder / "images").iterdir()) == sorted(ids)
    assert short >= 1


def test_medicat_layout() -> None:
    release = FIXTURES / "medicat" / "release"
    lines = (release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12
    for record in records:
        assert {"radiology", "pdf_hash", "fig_uri", "s2_caption", "s2orc_references"} <= set(record)
        assert re.fullmatch(r"[0-9a-f]{40}", record["pdf_hash"])
        assert (release / "figures" / f"{record['pdf_hash']}_{record['fig_uri']}").is_file()
        assert record["s2orc_references"] is None or all(isinstance(r, str) for r in record["s2orc_references"])
    assert {record["radiology"] for record in records} == {True, False}
    assert sum(record["radiology"] for record in records) > len(records) / 2
    references = [r for record in records for r in record["s2orc_references"] or []]
    assert any(record["s2orc_references"] is None for record in records)
    assert any(len(reference.split()) < 3 for reference in references)


def test_mimic_cxr_layout() -> None:
    root = FIXTURES / "mimic_cxr"
    metadata = read_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    splits = read_csv(root / "mimic-cxr-2.0.0-split.csv")
    assert list(splits[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert {"dicom_id", "subject_id", "study_id", "ViewPosition"} <= set(metadata[0])
    assert len(metadata) == len(splits) == 12
    assert {row["split"] for row in splits} == {"train", "validate", "test"}
    assert {row["ViewPosition"] for row in metadata} == {"PA", "AP", "LATERAL"}
    split_of_subject = defaultdict(set)
    for row in splits:
        split_of_subject[row["subject_id"]].add(row["split"])
    assert all(len(found) == 1 for found in split_of_subject.values())
    sections = defaultdict(int)
    for row in metadata:
        subject, study = row["subject_id"], row["study_id"]
        assert re.fullmatch(r"\d{8}", subject) and re.fullmatch(r"\d{8}", study)
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        assert (folder / f"s{study}" / f"{row['dicom_id']}.jpg").is_file()
        report = (folder / f"s{study}.txt").read_text()
        sections[("FINDINGS:" in report, "IMPRESSION:" in report)] += 1
    assert set(sections) == {(True, True), (True, False), (False, True), (False, False)}


def test_vqa_rad_official_and_preprocessed_layouts() -> None:
    official = FIXTURES / "vqa_rad"
    records = json.loads((official / "VQA_RAD Dataset Public.json").read_text())
    needed = {
        "qid",
        "image_name",
        "image_organ",
        "question",
        "answer",
        "answer_type",
        "question_type",
        "phrase_type",
    }
    assert all(needed <= set(record) for record in records)
    assert records[0]["qid"] == "0" and all(isinstance(r["qid"], int) for r in records[1:])
    assert [r["answer_type"] for r in records].count("CLOSED ") == 1
    assert {r["answer_type"] for r in records} == {"CLOSED", "OPEN", "CLOSED "}
    assert {r["phrase_type"] for r in records} == {"freeform", "para", "test_freeform", "test_para"}
    answers = {r["answer"] for r in records}
    assert (
        answers & {"yes", "no"} and answers & {"Yes", "No"} and any(str(a).islower() for a in answers - {"yes", "no"})
    )
    assert any(isinstance(r["answer"], int) for r in records)
    assert all((official / "VQA_RAD Image Folder" / r["image_name"]).is_file() for r in records)
    test = [r for r in records if r["phrase_type"].startswith("test_")]
    train = [r for r in records if not r["phrase_type"].startswith("test_")]
    assert not {r["image_name"] for r in test} & {r["image_name"] for r in train}

    preprocessed = FIXTURES / "vqa_rad_preprocessed"
    slim = {name: json.loads((preprocessed / f"{name}.json").read_text()) for name in ("trainset", "testset", "valset")}
    assert slim["valset"] == slim["testset"]
    for name, expected in (("trainset", train), ("testset", test)):
        assert slim[name] == [{key: r[key] for key in slim[name][0]} for r in expected]
        assert needed == set(slim[name][0])
    assert all((preprocessed / "images" / r["image_name"]).is_file() for r in records)


@pytest.mark.real_data
def test_vqa_rad_fields_match_the_real_release() -> None:
    real_file = REAL_DATA / "vqa_rad" / "VQA_RAD Dataset Public.json"
    if not real_file.is_file():
        pytest.skip(f"real VQA-RAD not found at {real_file}")
    real = json.loads(real_file.read_text())
    ours = json.loads((FIXTURES / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    real_keys = {key for record in real for key in record}
    assert {key for record in ours for key in record} <= real_keys
    for field in ("qid", "answer", "answer_type", "phrase_type", "image_organ", "question_type"):
        ours_types = {type(record[field]).__name__ for record in ours}
        assert ours_types <= {type(record[field]).__name__ for record in real}, field
    for field in ("answer_type", "phrase_type", "image_organ"):
        assert {record[field] for record in ours} <= {record[field] for record in real}, field
    assert {r["question_type"] for r in ours} <= {r["question_type"] for r in real}


def test_slake_layout() -> None:
    root = FIXTURES / "slake"
    fields = {"img_id", "img_name", "question", "answer", "q_lang", "answer_type", "content_type", "modality"}
    fields |= {"location", "base_type", "triple", "qid"}
    images_by_language = defaultdict(set)
    answers = []
    for split in ("train", "validate", "test"):
        records = json.loads((root / f"{split}.json").read_text(encoding="utf-8"))
        assert records
        for record in records:
            assert set(record) == fields
            assert re.fullmatch(r"xmlab\d+/source\.jpg", record["img_name"])
            assert (root / "imgs" / record["img_name"]).is_file()
            assert record["answer_type"] in ("OPEN", "CLOSED") and record["base_type"] == "vqa"
            images_by_language[record["q_lang"]].add(record["img_name"])
            answers.append(record["answer"])
    assert set(images_by_language) == {"en", "zh"}
    assert not images_by_language["en"] & images_by_language["zh"]
    assert "None" in answers and all(isinstance(answer, str) for answer in answers)


def test_melinda_layout() -> None:
    root = FIXTURES / "melinda"
    labels = {}
    for split in ("train", "dev", "test"):
        rows = read_csv(root / f"{split}.csv")
        assert list(rows[0]) == ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]
        assert all((root / "melinda_images" / row["figure_file"]).is_file() for row in rows)
        labels[split] = {row["p_meth_label"] for row in rows}
    assert labels["train"] == set(SHAPES) >= labels["dev"] | labels["test"]


def test_vqa_med_2019_official_and_m3ae_layouts() -> None:
    root = FIXTURES / "vqa_med_2019"
    official = {
        "train": ("ImageClef-2019-VQA-Med-Training", "Train_images", "train"),
        "val": ("ImageClef-2019-VQA-Med-Validation", "Val_images", "val"),
    }
    categories = ("Modality", "Plane", "Organ", "Abnormality")
    lines = {}
    for split, (folder, images, suffix) in official.items():
        for number, category in enumerate(categories, start=1):
            path = root / folder / "QAPairsByCategory" / f"C{number}_{category}_{suffix}.txt"
            lines[(split, category)] = path.read_text().splitlines()
            for line in lines[(split, category)]:
                image_id, question, answer = line.split("|")
                assert (root / folder / images / f"{image_id}.jpg").is_file() and question and answer
    test_file = root / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt"
    for line in test_file.read_text().splitlines():
        image_id, category, question, answer = line.split("|")
        assert (root / "VQAMed2019Test" / "VQAMed2019_Test_Images" / f"{image_id}.jpg").is_file()
        lines.setdefault(("test", category.capitalize()), []).append(f"{image_id}|{question}|{answer}")
    assert {category for split, category in lines if split == "test"} == set(categories)

    m3ae = FIXTURES / "vqa_med_2019_m3ae"
    for split in ("train", "val", "test"):
        assert sorted(path.name for path in (m3ae / split / "QA").iterdir()) == [
            "Modality.csv",
            "Organ.csv",
            "Plane.csv",
        ]
        for category in ("Modality", "Organ", "Plane"):
            m3ae_lines = (m3ae / split / "QA" / f"{category}.csv").read_text().splitlines()
            assert m3ae_lines == lines[(split, category)]
            assert all((m3ae / split / "images" / f"{line.split('|')[0]}.jpg").is_file() for line in m3ae_lines)


def test_jsonl_layout() -> None:
    root = FIXTURES / "jsonl"
    records = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(set(record) == {"image", "text", "split"} for record in records)
    assert all((root / record["image"]).is_file() for record in records)
    assert {type(record["text"]) for record in records} == {str, list}
    assert {record["split"] for record in records} == {"train", "val", "test"}
