"""VQA data: answer normalisation, vocabulary, the five layouts, validation policies, dataset and collate."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from umd_lightning.data.answers import AnswerVocab, normalize_answer
from umd_lightning.data.common import DataError
from umd_lightning.data.downstream import VQADataModule
from umd_lightning.data.scan import ScanReport
from umd_lightning.data.vqa import (
    VQACollator,
    VQADataset,
    holdout_by_image,
    read_vqa_records,
    slake_records,
    vqa_med_2019_records,
    vqa_rad_records,
)
from umd_lightning.models.config import resolve_text_model

FIXTURES = Path(__file__).resolve().parent / "data"
LAYOUTS = ["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"]


@pytest.fixture(scope="module")
def tokenizer():
    path = resolve_text_model("minilm")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 8, 8) + image.size[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("  YES ", "yes"),
        ("None", "none"),
        ("3.5", "3.5"),
        ("1,000 mL", "1,000 ml"),
        ("10-20 minutes", "10-20 minutes"),
        ("The  Left   Lung", "left lung"),
        ("an axial image", "axial image"),
        ("x-ray", "x ray"),
        ("Patient's left", "patients left"),
        ("mr - t1w w/gadolinium", "mr t1w w gadolinium"),
        ("~15 minutes\tpotentially", "15 minutes potentially"),
        ("5%", "5"),
        ("a", "a"),
        (4, "4"),
    ],
)
def test_normalize_answer_table(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected


def test_normalize_answer_rejects_missing_values():
    with pytest.raises(TypeError):
        normalize_answer(None)
    with pytest.raises(TypeError):
        normalize_answer(True)


def test_answer_vocab_order_index_and_round_trip(tmp_path):
    vocab = AnswerVocab.from_answers(["yes", "no", "axial", "no", "yes", "no", "brain"])
    assert vocab.answers == ["no", "yes", "axial", "brain"]
    assert vocab.index("yes") == 1 and vocab.index("lung") is None
    assert "axial" in vocab and len(vocab) == 4 and vocab[3] == "brain"
    vocab.save(tmp_path / "answers.json")
    assert AnswerVocab.load(tmp_path / "answers.json").answers == vocab.answers
    with pytest.raises(ValueError, match="repeated"):
        AnswerVocab(["yes", "yes"])


def _raw_vqa_rad(root: Path) -> list[dict]:
    return json.loads((root / "VQA_RAD Dataset Public.json").read_text())


def test_vqa_rad_official_records():
    raw = _raw_vqa_rad(FIXTURES / "vqa_rad")
    reports: list[ScanReport] = []
    records = vqa_rad_records(FIXTURES / "vqa_rad", reports=reports)
    n_test = sum(entry["phrase_type"].startswith("test_") for entry in raw)
    assert Counter(r.split for r in records) == {"train": len(raw) - n_test, "test": n_test}
    assert reports[0].read == reports[0].kept == len(raw)
    first = records[0]
    filled = {f.name for f in fields(first) if getattr(first, f.name) not in (None, "", ())}
    assert filled == {"id", "image", "image_id", "question", "answer", "answer_type", "question_types", "split"}
    assert [r.question_types for r in records] == [(entry["question_type"],) for entry in raw]
    assert first.image == (FIXTURES / "vqa_rad" / "VQA_RAD Image Folder" / raw[0]["image_name"]).resolve()
    assert first.image_id == Path(raw[0]["image_name"]).stem
    assert first.answer == normalize_answer(raw[0]["answer"])
    assert {r.answer_type for r in records} == {"open", "closed"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_its_fixture(layout):
    records = read_vqa_records(layout, FIXTURES / layout)
    splits = Counter(r.split for r in records)
    assert splits["train"] > 0 and splits["test"] > 0
    assert all(r.image.is_file() for r in records)
    assert all(r.answer == normalize_answer(r.answer) for r in records)
    if layout.startswith("vqa_med"):
        assert {r.answer_type for r in records} == {"open"}
        assert splits["val"] > 0
    # Every layout's questions carry their type: VQA-RAD's question_type, SLAKE's content_type, VQA-Med's category.
    assert all(len(r.question_types) == 1 for r in records)
    if layout.startswith("vqa_med"):
        assert {r.question_types[0] for r in records} == {"MODALITY", "PLANE", "ORGAN"}


def test_vqa_rad_preprocessed_matches_its_files():
    root = FIXTURES / "vqa_rad_preprocessed"
    records = read_vqa_records("vqa_rad_preprocessed", root)
    sizes = {s: len(json.loads((root / f"{s}set.json").read_text())) for s in ("train", "val", "test")}
    assert Counter(r.split for r in records) == sizes


def test_slake_language_and_none_answers():
    root = FIXTURES / "slake"
    raw = {s: json.loads((root / f).read_text()) for s, f in [("train", "train.json"), ("val", "validate.json")]}
    english = slake_records(root)
    everything = slake_records(root, language=None)
    assert Counter(r.split for r in english)["train"] == sum(e["q_lang"] == "en" for e in raw["train"])
    assert Counter(r.split for r in everything)["train"] == len(raw["train"])
    n_none = sum(e["answer"] == "None" for split in raw.values() for e in split)
    assert n_none > 0, "the fixture should hold literal 'None' answers"
    assert sum(r.answer == "none" for r in everything if r.split in raw) == n_none


def test_vqa_med_categories():
    root = FIXTURES / "vqa_med_2019"
    default = vqa_med_2019_records(root)
    with_abnormality = vqa_med_2019_records(root, categories=["modality", "plane", "organ", "abnormality"])
    abnormality = root / "ImageClef-2019-VQA-Med-Training" / "QAPairsByCategory" / "C4_Abnormality_train.txt"
    train_lines = len(abnormality.read_text().splitlines())
    extra = Counter(r.split for r in with_abnormality) - Counter(r.split for r in default)
    assert extra["train"] == train_lines
    with pytest.raises(ValueError, match="abnormality"):
        vqa_med_2019_records(root, categories=["anatomy"])


def test_missing_annotation_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"validate\.json"):
        slake_records(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"VQA_RAD Dataset Public\.json"):
        vqa_rad_records(tmp_path)


def test_json_that_is_not_a_list_is_an_error(tmp_path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_text('{"qid": 1}')
    with pytest.raises(DataError, match="list"):
        vqa_rad_records(tmp_path)


def _tiny_vqa_rad(root: Path) -> None:
    folder = root / "VQA_RAD Image Folder"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (10 + i, 10)).save(folder / f"synpic{i}.jpg")
    # Questions 0-7 train, 8-9 test; "CLOSED " has VQA-RAD's trailing space; answer 3 is a JSON number.
    answers = [("Yes", "CLOSED ")] * 4 + [("No", "CLOSED")] * 3 + [(3, "OPEN")] * 3
    entries = [
        {
            "qid": q,
            "image_name": f"synpic{q % 4}.jpg",
            "question": f"q{q}?",
            "answer": answer,
            "answer_type": kind,
            "phrase_type": "test_freeform" if q >= 8 else "freeform",
        }
        for q, (answer, kind) in enumerate(answers)
    ]
    entries[9]["answer"] = "Lung"
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))


def test_bad_records_raise_with_file_and_record_or_are_skipped(tmp_path):
    _tiny_vqa_rad(tmp_path)
    entries = _raw_vqa_rad(tmp_path)
    entries[2]["question"] = "  "
    entries[3]["image_name"] = "../escape.jpg"
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"record 2.*question"):
        vqa_rad_records(tmp_path)
    reports: list[ScanReport] = []
    kept = vqa_rad_records(tmp_path, on_error="skip", reports=reports)
    assert len(kept) == len(entries) - 2
    assert reports[0].problems == {"empty_text": 1, "unsafe_path": 1}


def test_missing_image_found_at_scan_once_per_question(tmp_path):
    _tiny_vqa_rad(tmp_path)
    (tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg").unlink()
    records = vqa_rad_records(tmp_path)
    vocab = AnswerVocab.from_answers(r.answer for r in records)
    with pytest.raises(DataError, match="record 1"):
        VQADataset(records, to_tensor, vocab, progress=False)
    dataset = VQADataset(records, to_tensor, vocab, on_error="skip", progress=False)
    uses = sum(r.image_id == "synpic1" for r in records)
    assert len(dataset) == len(records) - uses
    assert dataset.reports[0].problems == {"missing_image": uses}


def test_dataset_and_collator_targets(tmp_path, tokenizer):
    _tiny_vqa_rad(tmp_path)
    records = vqa_rad_records(tmp_path)
    vocab = AnswerVocab(["no", "yes", "3"])
    dataset = VQADataset(records, to_tensor, vocab, progress=False)
    samples = [dataset[i] for i in (0, 4, 8, 9)]
    assert [s["answer_index"] for s in samples] == [1, 0, 2, -1]
    assert [s["is_closed"] for s in samples] == [True, True, False, False]
    assert samples[3]["answer"] == "lung" and dataset.num_out_of_vocabulary == 1
    batch = VQACollator(tokenizer, max_length=6, num_answers=3)([*samples, None])
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 6
    expected = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float)
    assert torch.equal(batch["targets"], expected)
    assert batch["answer_index"].tolist() == [1, 0, 2, -1]
    assert batch["is_closed"].dtype == torch.bool and batch["qids"] == ["0", "4", "8", "9"]
    assert batch["answers"] == ["yes", "no", "3", "lung"]


def test_holdout_is_by_image_and_seeded():
    records = [r for r in read_vqa_records("vqa_rad", FIXTURES / "vqa_rad") if r.split == "train"]
    train, val = holdout_by_image(records, 0.25, seed=3)
    assert len(train) + len(val) == len(records) and val
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    images = len({r.image_id for r in records})
    assert len({r.image_id for r in val}) == max(1, round(0.25 * images))
    again, _ = holdout_by_image(records, 0.25, seed=3)
    assert [r.id for r in again] == [r.id for r in train]
    picks = {frozenset(r.image_id for r in holdout_by_image(records, 0.25, seed=s)[1]) for s in range(6)}
    assert len(picks) > 1


def test_datamodule_vocab_and_validation_policies():
    root = str(FIXTURES / "vqa_rad")
    records = read_vqa_records("vqa_rad", root)
    train_answers = {r.answer for r in records if r.split == "train"}
    clean = VQADataModule("vqa_rad", root, image_size=16, num_workers=0)
    assert set(clean.answers) == train_answers and clean.num_answers == len(train_answers)
    assert clean.task == "vqa" and clean.num_outputs == clean.num_answers and clean.labels == clean.answers
    test_oov = sum(r.answer not in train_answers for r in records if r.split == "test")
    assert clean.out_of_vocabulary["test"] == test_oov
    assert not clean.leaky and clean.leak_notes == []
    leaky = VQADataModule("vqa_rad", root, vocab="all_splits", validation="val_is_test", num_workers=0)
    assert set(leaky.answers) == {r.answer for r in records}
    assert leaky.out_of_vocabulary["test"] == 0
    assert leaky.leaky and leaky.leak_notes == [
        "vocabulary built from all splits including test",
        "validation is the test set",
    ]
    assert leaky.records["val"] is leaky.records["test"]
    with pytest.raises(ValueError, match="no validation split"):
        VQADataModule("vqa_rad", root, validation="official")
    official = VQADataModule("vqa_rad_preprocessed", str(FIXTURES / "vqa_rad_preprocessed"), validation="official")
    assert official.leaky


def test_datamodule_task_and_calib_batches():
    root = str(FIXTURES / "slake")
    task = VQADataModule("slake", root, image_size=16, batch_size=4, num_workers=0, validation="official")
    task.setup("fit")
    batch = next(iter(task.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["targets"].shape == (4, task.num_answers)
    assert [report.name for report in task.scan_reports][-2:] == ["slake/train", "slake/val"]
    calib = VQADataModule("slake", root, image_size=16, batch_size=4, num_workers=0, mode="calib")
    calib.setup("fit")
    batch = next(iter(calib.val_dataloader()))
    assert {"mlm_input_ids", "mlm_labels", "texts"} <= set(batch)
    questions = {r.question for r in calib.records["val"]}
    assert set(batch["texts"]) <= questions


@pytest.mark.real_data
def test_real_vqa_rad_counts(shared_data):
    root = shared_data / "vqa_rad"
    if not (root / "VQA_RAD Dataset Public.json").is_file():
        pytest.skip("../shared/data/vqa_rad is absent")
    records = vqa_rad_records(root)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    assert len(train) == 1797 and len(test) == 451
    assert Counter(r.answer_type for r in test) == {"closed": 272, "open": 179}
    vocab = AnswerVocab.from_answers(r.answer for r in train)
    outside = sum(vocab.index(r.answer) is None for r in test)
    print(f"VQA-RAD train vocabulary: {len(vocab)} answers; test answers outside it: {outside} of {len(test)}")
    assert vocab.answers[:2] == ["no", "yes"]
    assert 0 < outside < len(test)
    module = VQADataModule("vqa_rad", str(root), num_workers=0)
    assert module.num_answers == len(vocab) and module.out_of_vocabulary["test"] == outside
    assert not {r.image_id for r in module.records["train"]} & {r.image_id for r in module.records["val"]}
    # question_type as released: 11 types, a few questions of two ("PRES, POS"), two misspelt (ATRIB, PRSE).
    raw = {str(entry["qid"]): entry["question_type"] for entry in _raw_vqa_rad(root)}
    two = [r for r in records if "," in raw[r.id]]
    assert len(two) == 34 and all(len(r.question_types) == 2 for r in two)
    assert next(r for r in records if raw[r.id] == "POS, PRES").question_types == ("POS", "PRES")
    assert {t for r in records for t in r.question_types} == {
        *("ABN", "ATTRIB", "COLOR", "COUNT", "MODALITY", "ORGAN", "OTHER", "PLANE", "POS", "PRES", "SIZE")
    }
    assert module.question_types == sorted({t for r in test for t in r.question_types})
