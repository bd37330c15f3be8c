"""Classification (MELINDA, MedPix 2.0, MedMNIST) and retrieval (ROCO, MedPix 2.0) data and DataModules."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from umd_lightning.data.classification import (
    ClassificationCollator,
    ClassificationDataset,
    class_names_from,
)
from umd_lightning.data.downstream import ClassificationDataModule, RetrievalDataModule
from umd_lightning.data.records import Record
from umd_lightning.data.retrieval import RetrievalTrainCollator, select_eval_pairs
from umd_lightning.data.scan import ScanReport
from umd_lightning.data.sources.medmnist import medmnist_records
from umd_lightning.data.sources.medpix import medpix_records
from umd_lightning.data.sources.melinda import melinda_records
from umd_lightning.data.sources.roco import roco_records
from umd_lightning.models.config import resolve_text_model

FIXTURES = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_text_model("minilm"), local_files_only=True)


def to_tensor(image) -> torch.Tensor:
    return torch.as_tensor(np.array(image.resize((8, 8))), dtype=torch.float32).permute(2, 0, 1)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_melinda_records_and_class_ids():
    root = FIXTURES / "melinda"
    records = melinda_records(root)
    rows = {split: _csv_rows(root / f"{name}.csv") for split, name in [("train", "train"), ("val", "dev")]}
    assert Counter(r.split for r in records)["val"] == len(rows["val"])
    assert class_names_from(records) == sorted({row["p_meth_label"] for row in rows["train"]})
    first = records[0]
    assert first.image == (root / "melinda_images" / rows["train"][0]["figure_file"]).resolve()
    assert first.text == rows["train"][0]["caption"].strip()
    other = melinda_records(root, label_column="i_meth")
    assert class_names_from(other) == sorted({row["i_meth"] for row in rows["train"]})


def test_melinda_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"valid columns are \['i_meth', 'p_meth', 'i_meth_label', 'p_meth_label'\]"):
        melinda_records(FIXTURES / "melinda", label_column="modality")
    with pytest.raises(FileNotFoundError, match=r"dev\.csv"):
        melinda_records(tmp_path)
    root = tmp_path / "melinda"
    shutil.copytree(FIXTURES / "melinda", root)
    rows = _csv_rows(root / "test.csv")
    rows[0]["p_meth_label"] = "hexagon"
    with (root / "test.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"\['hexagon'\].*not seen in training"):
        ClassificationDataModule("melinda", str(root))
    (root / "dev.csv").write_text("figure_file,caption\nx.jpg,a caption\n")
    with pytest.raises(ValueError, match=r"dev\.csv: missing column\(s\) \['p_meth_label'\]"):
        melinda_records(root)


def _tiny_medmnist(path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train", 6), ("val", 2), ("test", 3)]:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(path, **arrays)


def test_medmnist_dataset_and_collator(tmp_path, tokenizer):
    path = tmp_path / "pneumoniamnist.npz"
    _tiny_medmnist(path)
    records = medmnist_records(path)
    assert Counter(r.split for r in records) == {"train": 6, "val": 2, "test": 3}
    assert {r.text for r in records} == {"a chest x-ray"}
    assert class_names_from(records) == ["0", "1"]
    dataset = ClassificationDataset(records[:4], to_tensor, ["0", "1"], progress=False)
    sample = dataset[1]
    assert sample["label"] == 1 and sample["id"] == "train/1"
    assert sample["image"].shape == (3, 8, 8)
    assert torch.equal(sample["image"][0], sample["image"][2]), "grayscale is repeated over RGB"
    batch = ClassificationCollator(tokenizer, max_length=8)([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["ids"][0] == "train/0"
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(ValueError, match=r"label\(s\) \['7'\]"):
        ClassificationDataset([replace(records[0], label_name="7")], to_tensor, ["0", "1"])


def test_classification_datamodule_melinda(tmp_path):
    module = ClassificationDataModule("melinda", str(FIXTURES / "melinda"), image_size=16, batch_size=2, num_workers=0)
    assert module.num_classes == len(module.class_names) == 3
    assert module.task == "classification" and module.num_outputs == 3 and module.labels == module.class_names
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].max() < 3
    calib = ClassificationDataModule(
        "melinda", str(FIXTURES / "melinda"), image_size=16, batch_size=2, num_workers=0, mode="calib"
    )
    calib.setup("fit")
    batch = next(iter(calib.train_dataloader()))
    assert set(batch["texts"]) <= {r.text for r in calib.records["train"]}
    assert batch["mlm_labels"].shape == batch["input_ids"].shape


def test_roco_records_captions_and_val_folder(tmp_path):
    root = FIXTURES / "roco"
    reports: list[ScanReport] = []
    records = roco_records(root, reports=reports)
    lines = (root / "train" / "radiology" / "captions.txt").read_text().splitlines()
    captions = [" ".join(line.split("\t", 1)[1].split()) for line in lines if line.strip()]
    short = sum(len(c.split()) < 3 for c in captions)
    train = [r for r in records if r.split == "train"]
    assert [r.text for r in train] == [c for c in captions if len(c.split()) >= 3]
    assert reports[0].problems == ({"short_caption": short} if short else {})
    assert train[0].image == (root / "train/radiology/images" / f"{train[0].id}.jpg").resolve()
    renamed = tmp_path / "roco"
    shutil.copytree(root, renamed)
    (renamed / "validation").rename(renamed / "val")
    assert len(roco_records(renamed)) == len(records)
    shutil.rmtree(renamed / "test")
    with pytest.raises(FileNotFoundError, match=r"test/radiology/captions\.txt"):
        roco_records(renamed)


def test_train_collator_negatives_never_equal_the_true_caption(tokenizer):
    pool = ["same caption"] * 5 + [f"caption number {i}" for i in range(6)]
    collator = RetrievalTrainCollator(tokenizer, pool, max_length=12, num_candidates=4, seed=1)
    for _ in range(50):
        negatives = collator.negatives("same caption")
        assert len(negatives) == 3 == len(set(negatives)) and "same caption" not in negatives
    samples = [
        {"image": torch.full((3, 4, 4), float(i)), "text": text, "id": str(i)} for i, text in enumerate(pool[4:9])
    ]
    batch = collator(samples)
    assert batch["pixel_values"].shape == (5, 3, 4, 4)
    assert batch["input_ids"].shape[:2] == (5, 4) and batch["attention_mask"].shape == batch["input_ids"].shape
    for i, sample in enumerate(samples):
        texts = tokenizer.batch_decode(batch["input_ids"][i], skip_special_tokens=True)
        assert texts[0] == sample["text"] and sample["text"] not in texts[1:]
    first = RetrievalTrainCollator(tokenizer, pool, num_candidates=4, seed=7).negatives("caption number 2")
    assert RetrievalTrainCollator(tokenizer, pool, num_candidates=4, seed=7).negatives("caption number 2") == first
    with pytest.raises(ValueError, match="distinct captions"):
        RetrievalTrainCollator(tokenizer, pool, num_candidates=16)


def test_select_eval_pairs_is_seeded_and_bounded():
    records = [Record(id=str(i), image=None) for i in range(50)]
    picked = select_eval_pairs(records, 10, seed=0)
    assert len(picked) == 10 and [int(r.id) for r in picked] == sorted(int(r.id) for r in picked)
    assert picked == select_eval_pairs(records, 10, seed=0) != select_eval_pairs(records, 10, seed=1)
    assert select_eval_pairs(records, None, seed=0) == records


def test_retrieval_datamodule_train_and_eval():
    module = RetrievalDataModule(
        "roco", str(FIXTURES / "roco"), image_size=16, batch_size=3, num_workers=0, num_candidates=4
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["input_ids"].shape[:2] == (3, 4)
    split = module.eval_split("validate")
    assert split.captions == split.image_captions == [r.text for r in module.records["val"]]
    assert split.caption_ids == [r.id for r in module.records["val"]]
    assert module.task == "retrieval" and module.num_outputs is None and module.labels is None
    images = next(iter(module.val_dataloader()))
    assert images["image_index"].tolist() == list(range(len(split.captions)))
    with pytest.raises(RuntimeError, match="test"):
        module.eval_split("test")


@pytest.mark.real_data
def test_real_medpix_and_medmnist(shared_data):
    medpix = shared_data / "medpix_2_0"
    npz = shared_data / "medmnist" / "pneumoniamnist.npz"
    if not medpix.is_dir() or not npz.is_file():
        pytest.skip("MedPix 2.0 or PneumoniaMNIST is absent from ../shared/data")
    records = medpix_records(medpix)
    assert Counter(r.split for r in records) == {"train": 1653, "val": 197, "test": 200}
    assert class_names_from(records) == [
        "Abdomen",
        "Head",
        "Reproductive and Urinary System",
        "Spine and Muscles",
        "Thorax",
    ]
    assert class_names_from(medpix_records(medpix, label_column="Type")) == ["CT", "MR"]
    module = RetrievalDataModule("medpix", str(medpix), scan="none", num_workers=0)
    assert len(module.records["test"]) == 200
    assert len({r.text for r in module.records["test"]}) < 200, "MedPix repeats captions within a case"
    images = medmnist_records(npz)
    assert Counter(r.split for r in images) == {"train": 4708, "val": 524, "test": 624}
