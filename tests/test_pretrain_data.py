"""Pre-training pair datasets, transforms and the DataModule.

Three kinds of test: small files written in ``tmp_path`` (error cases), the committed fixtures in
``tests/data`` (expected counts recomputed here from the annotation files), and the real MedPix 2.0 copy
(skipped when absent).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from umd_lightning.data.common import DataError
from umd_lightning.data.datamodule import PretrainDataModule
from umd_lightning.data.pretrain import (
    JsonlDataset,
    MedicatDataset,
    MedPixDataset,
    MimicCxrDataset,
    RocoDataset,
    SourceSpec,
    build_pretrain_dataset,
    build_pretrain_datasets,
)
from umd_lightning.data.sources.medicat import medicat_holdout_size
from umd_lightning.data.sources.medpix import VQA_RAD_OVERLAP
from umd_lightning.data.sources.mimic_cxr import report_sections
from umd_lightning.data.transforms import CLIP_MEAN, CLIP_STD, image_transform

FIXTURES = Path(__file__).resolve().parent / "data"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"fixture tests/data/{name} is absent (written by tests/data/make_fixtures.py)")
    return path


@pytest.fixture(scope="module")
def medpix_root() -> Path:
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "medpix_2_0" / "MedPix-2-0").resolve()
    if not path.is_dir():
        pytest.skip("real MedPix 2.0 copy ../shared/data/medpix_2_0/MedPix-2-0 is absent")
    return path


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- ROCO ----


def make_roco(root: Path, folder: str = "train", lines: list[str] | None = None) -> Path:
    base = root / folder / "radiology"
    for name in ("ROCO_00001", "ROCO_00002", "ROCO_00003"):
        write_image(base / "images" / f"{name}.jpg")
    write_lines(
        base / "captions.txt",
        lines
        or [
            "ROCO_00001\t Axial  CT of the \u00a0 chest. ",
            "ROCO_00002\t CT chest",
            "",
            "ROCO_00003\tMRI of the brain without contrast",
        ],
    )
    return root


def test_roco_collapses_whitespace_and_counts_short_captions(tmp_path: Path) -> None:
    dataset = RocoDataset(make_roco(tmp_path), "train", scan="full")
    assert len(dataset) == 2
    assert [dataset.images[i].id for i in range(2)] == ["ROCO_00001", "ROCO_00003"]
    sample = dataset[0]
    assert sample["text"] == "Axial CT of the chest."
    assert sample["id"] == "ROCO_00001"
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert (dataset.report.read, dataset.report.kept) == (3, 2)
    assert dict(dataset.report.problems) == {"short_caption": 1}


def test_roco_accepts_both_validation_folder_names(tmp_path: Path) -> None:
    assert len(RocoDataset(make_roco(tmp_path / "a", "validation"), "val")) == 2
    assert len(RocoDataset(make_roco(tmp_path / "b", "val"), "validation")) == 2
    with pytest.raises(FileNotFoundError, match=r"test/radiology/captions\.txt"):
        RocoDataset(tmp_path / "a", "test")
    with pytest.raises(ValueError, match="unknown split"):
        RocoDataset(tmp_path / "a", "dev")


def test_roco_errors_name_file_and_record(tmp_path: Path) -> None:
    lines = ["ROCO_00001\tA good caption here", "ROCO_00009\tAn image that is missing", "no tab on this line"]
    root = make_roco(tmp_path, lines=lines)
    with pytest.raises(DataError, match=r"captions\.txt, record ROCO_00009: image file not found") as raised:
        RocoDataset(root, "train", scan="header")
    assert raised.value.kind == "missing_image"
    dataset = RocoDataset(root, "train", on_error="skip", scan="header")
    assert len(dataset) == 1
    assert dict(dataset.report.problems) == {"missing_image": 1, "bad_line": 1}
    assert "record line 3" in dataset.report.examples["bad_line"][0]
    # scan="none" does not open images: the missing one only fails when it is read.
    assert len(RocoDataset(root, "train", on_error="skip", scan="none")) == 2


def test_roco_rejects_paths_leaving_the_root(tmp_path: Path) -> None:
    root = make_roco(tmp_path, lines=["../../../../../etc/passwd\tA caption with words"])
    with pytest.raises(DataError, match="leaves the data root") as raised:
        RocoDataset(root, "train")
    assert raised.value.kind == "unsafe_path"


def test_roco_fixture() -> None:
    root = fixture("roco")
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        entries = [
            line.split("\t", 1) for line in (root / folder / "radiology" / "captions.txt").read_text().splitlines()
        ]
        expected = {name: " ".join(text.split()) for name, text in entries if len(text.split()) >= 3}
        dataset = RocoDataset(root, split)
        assert {dataset[i]["id"]: dataset[i]["text"] for i in range(len(dataset))} == expected
        assert dataset.report.problems.get("short_caption", 0) == len(entries) - len(expected)
        assert dataset.report.read == len(entries)
    assert RocoDataset(root, "train").report.problems["short_caption"] >= 1  # the fixture has the quirk


# --- MedICaT ----


def make_medicat(root: Path, figures: int, extra_lines: list[str] = ()) -> Path:
    release = root / "release"
    lines = []
    for index in range(figures):
        name = f"{index:040x}_1-Figure{index}-1.png"
        write_image(release / "figures" / name, mode="RGB")
        record = {
            "pdf_hash": f"{index:040x}",
            "fig_uri": f"1-Figure{index}-1.png",
            "s2_caption": f"Figure {index}.  CT of the abdomen.",
            "s2orc_references": None if index % 2 else ["As Figure 1 shows clearly", "(Figure 1)"],
            "radiology": index % 5 != 4,
        }
        lines.append(json.dumps(record))
    write_lines(release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", lines + list(extra_lines))
    return root


def test_medicat_holdout_size_scales_down() -> None:
    assert medicat_holdout_size(200_000) == 1000
    assert medicat_holdout_size(5000) == 500
    assert medicat_holdout_size(9) == 1
    assert medicat_holdout_size(2) == 0
    assert medicat_holdout_size(50, holdout=0) == 0


def test_medicat_splits_are_seeded_disjoint_and_radiology_only(tmp_path: Path) -> None:
    root = make_medicat(tmp_path, 50)  # 40 radiology figures: 4 val, 4 test, 32 train
    splits = {split: MedicatDataset(root, split, scan="none") for split in ("train", "val", "test")}
    ids = {split: {record.id for record in dataset.images} for split, dataset in splits.items()}
    assert [len(ids[split]) for split in ("train", "val", "test")] == [32, 4, 4]
    assert ids["train"] | ids["val"] | ids["test"] == {f"{i:040x}_1-Figure{i}-1.png" for i in range(50) if i % 5 != 4}
    assert not ids["val"] & ids["test"]
    assert {r.id for r in MedicatDataset(root, "val", scan="none", seed=0).images} == ids["val"]
    assert {r.id for r in MedicatDataset(root, "val", scan="none", seed=1).images} != ids["val"]
    everything = MedicatDataset(root, "train", scan="none", radiology_only=False, holdout=0)
    assert len(everything.images) == 50


def test_medicat_texts_are_caption_and_long_references(tmp_path: Path) -> None:
    root = make_medicat(tmp_path, 10)
    dataset = MedicatDataset(root, "train", scan="full")
    by_figure: dict[str, list[str]] = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        by_figure.setdefault(sample["id"], []).append(sample["text"])
    for name, texts in by_figure.items():
        index = int(name.split("Figure")[1].split("-")[0])
        expected = [f"Figure {index}. CT of the abdomen."]
        if index % 2 == 0:
            expected.append("As Figure 1 shows clearly")
        assert texts == expected


def test_medicat_bad_json_names_file_and_line(tmp_path: Path) -> None:
    root = make_medicat(tmp_path, 4, extra_lines=["{not json"])
    with pytest.raises(DataError, match=r"top4_public\.jsonl, record line 5: invalid JSON"):
        MedicatDataset(root, "train", scan="none")
    for split in ("train", "val", "test"):
        assert MedicatDataset(root, split, scan="none", on_error="skip").report.problems["bad_json"] == 1
    with pytest.raises(FileNotFoundError, match=r"release/s2_full_figures"):
        MedicatDataset(tmp_path / "elsewhere", "train")


def test_medicat_fixture() -> None:
    root = fixture("medicat")
    annotations = root / "release" / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
    records = [json.loads(line) for line in annotations.read_text().splitlines()]
    radiology = {f"{r['pdf_hash']}_{r['fig_uri']}": r for r in records if r["radiology"]}
    size = medicat_holdout_size(len(radiology))
    seen: dict[str, int] = {}
    for split, expected_figures in (("train", len(radiology) - 2 * size), ("val", size), ("test", size)):
        dataset = MedicatDataset(root, split)
        assert len(dataset.images) == expected_figures
        for record in dataset.images:
            source = radiology[record.id]
            references = [r for r in source["s2orc_references"] or [] if len(r.split()) >= 3]
            assert record.texts == (" ".join(source["s2_caption"].split()), *references)
            seen[record.id] = seen.get(record.id, 0) + 1
    assert set(seen) == set(radiology) and set(seen.values()) == {1}


# --- MIMIC-CXR ----


def test_report_sections_known_text() -> None:
    report = (
        "                FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___ with cough.\n\n"
        " FINDINGS:\n\n Lungs are clear.\n No effusion.\n\n IMPRESSION:\n\n No acute process.\n"
    )
    sections = report_sections(report)
    assert sections["FINDINGS"] == "Lungs are clear. No effusion."
    assert sections["IMPRESSION"] == "No acute process."
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"


def make_mimic(root: Path, metadata_columns: tuple[str, ...] = ("dicom_id", "subject_id", "study_id", "ViewPosition")):
    rows = [("d1", "10000032", "50000001", "PA", "train"), ("d2", "10000032", "50000001", "LATERAL", "train")]
    rows += [("d3", "11000001", "50000002", "AP", "validate"), ("d4", "11000001", "50000003", "AP", "train")]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(metadata_columns)
        for row in rows:
            writer.writerow(row[: len(metadata_columns)])
    with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("dicom_id", "study_id", "subject_id", "split"))
        writer.writerows((d, study, subject, split) for d, subject, study, _, split in rows)
    for dicom, subject, study, _, _ in rows:
        write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    reports = {
        ("10000032", "50000001"): " FINDINGS: Small left effusion.\n IMPRESSION: Effusion.\n",
        ("11000001", "50000002"): " IMPRESSION:\n No acute process.\n",
        ("11000001", "50000003"): " INDICATION: cough.\n No headers the loader wants.\n",
    }
    for (subject, study), text in reports.items():
        write_lines(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt", [text])
    return root


def test_mimic_views_sections_and_split_alias(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    train = MimicCxrDataset(root, "train")
    assert [(s["id"], s["text"]) for s in (train[i] for i in range(len(train)))] == [
        ("d1", "Small left effusion. Effusion.")
    ]
    assert dict(train.report.problems) == {"other_view": 1, "no_findings_impression": 1}
    val = MimicCxrDataset(root, "val")
    assert [val[0]["id"], val[0]["text"]] == ["d3", "No acute process."]
    assert len(MimicCxrDataset(root, "train", views=None)) == 2


def test_mimic_missing_column_names_file_and_column(tmp_path: Path) -> None:
    root = make_mimic(tmp_path, metadata_columns=("dicom_id", "subject_id", "study_id"))
    with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-metadata\.csv.*'ViewPosition'") as raised:
        MimicCxrDataset(root, "train", on_error="skip")
    assert raised.value.kind == "missing_column"
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-metadata\.csv"):
        MimicCxrDataset(tmp_path / "nothing", "train")


def test_mimic_fixture() -> None:
    root = fixture("mimic_cxr")
    with open(root / "mimic-cxr-2.0.0-metadata.csv", newline="") as handle:
        metadata = {row["dicom_id"]: row for row in csv.DictReader(handle)}
    with open(root / "mimic-cxr-2.0.0-split.csv", newline="") as handle:
        split_rows = list(csv.DictReader(handle))
    for split, name in (("train", "train"), ("val", "validate"), ("test", "test")):
        expected = {}
        lateral = 0
        for row in (r for r in split_rows if r["split"] == name):
            meta = metadata[row["dicom_id"]]
            if meta["ViewPosition"] not in ("PA", "AP"):
                lateral += 1
                continue
            subject, study = meta["subject_id"], meta["study_id"]
            report = (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").read_text()
            if "FINDINGS:" in report or "IMPRESSION:" in report:
                expected[row["dicom_id"]] = report
        dataset = MimicCxrDataset(root, split)
        assert {record.id for record in dataset.images} == set(expected)
        assert dataset.report.problems.get("other_view", 0) == lateral
        for record in dataset.images:
            assert "INDICATION" not in record.texts[0] and "COMPARISON" not in record.texts[0]
            assert record.texts[0].split()[0] in expected[record.id]


# --- MedPix 2.0 ----


@pytest.mark.real_data
def test_medpix_real_dev_header_scan(medpix_root: Path) -> None:
    dataset = MedPixDataset(
        medpix_root, "dev", transform=image_transform(32, train=False), scan="header", exclude_vqa_rad_overlap=False
    )
    assert (dataset.report.read, dataset.report.kept, len(dataset)) == (197, 197, 197)
    sample = dataset[0]
    assert sample["id"] == "MPX1009_synpic46283"
    assert sample["text"].startswith("The prostate is enlarged with several calcifications noted within.")
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32


@pytest.mark.real_data
def test_medpix_real_split_sizes_and_vqa_rad_overlap(medpix_root: Path) -> None:
    def everything(split: str) -> MedPixDataset:
        return MedPixDataset(medpix_root, split, scan="none", exclude_vqa_rad_overlap=False)

    sizes = {split: len(everything(split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 1653, "dev": 197, "test": 200}
    assert len(everything("val")) == 197
    # Excluded by default: 10 of the 19 shared images are VQA-RAD test images.
    excluded = {
        split: MedPixDataset(medpix_root, split, scan="none").report.problems["excluded"]
        for split in ("train", "dev", "test")
    }
    assert sum(excluded.values()) == len(VQA_RAD_OVERLAP) == 19
    assert excluded["dev"] + excluded["test"] == 2
    # ids match whole parts of the name: a prefix of a synpic id excludes nothing.
    prefix_only = MedPixDataset(medpix_root, "dev", scan="none", exclude_ids=["synpic4628"])
    assert prefix_only.report.problems == {"excluded": excluded["dev"]}
    by_name = MedPixDataset(medpix_root, "dev", scan="none", exclude_ids=["MPX1009_synpic46283", "synpic46295"])
    assert by_name.report.problems["excluded"] == 2 + excluded["dev"]


def test_medpix_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"splitted_dataset/descriptions_dev\.jsonl"):
        MedPixDataset(tmp_path, "val")
    record = {"image": "MPX1_synpic1", "Description": {"Caption": "  "}}
    write_lines(tmp_path / "splitted_dataset" / "descriptions_test.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=r"record MPX1_synpic1: Description\.Caption must be a non-empty string"):
        MedPixDataset(tmp_path, "test")


# --- generic JSONL ----


def make_jsonl(root: Path, records: list[dict | str]) -> Path:
    for name in ("a.jpg", "b.png"):
        write_image(root / "images" / name, mode="RGB")
    path = root / "data.jsonl"
    write_lines(path, [r if isinstance(r, str) else json.dumps(r) for r in records])
    return path


def test_jsonl_lists_splits_and_errors(tmp_path: Path) -> None:
    records = [
        {"image": "images/a.jpg", "text": ["first text", "second  text"], "split": "train"},
        {"image": "images/b.png", "text": "a dev text", "split": "dev"},
        {"image": "images/b.png", "text": "no split here"},
        '{"image": "images/a.jpg", "text": ',
        {"image": "/etc/passwd", "text": "absolute", "split": "train"},
    ]
    path = make_jsonl(tmp_path, records)
    with pytest.raises(DataError, match=r"data\.jsonl, record line 4: invalid JSON"):
        JsonlDataset(path, "train")
    train = JsonlDataset(path, "train", on_error="skip")
    assert [train[i]["text"] for i in range(len(train))] == ["first text", "second text"]
    assert {train[i]["id"] for i in range(2)} == {"images/a.jpg"}
    assert dict(train.report.problems) == {"bad_json": 1, "unsafe_path": 1, "no_split": 1}
    val = JsonlDataset(path, "val", on_error="skip")  # "val" selects the "dev" records
    assert [val[i]["text"] for i in range(len(val))] == ["a dev text"]
    assert len(JsonlDataset(path, None, on_error="skip")) == 4


def test_jsonl_split_needs_split_fields(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path, [{"image": "images/a.jpg", "text": "one text"}])
    with pytest.raises(DataError, match="no record has a 'split' field"):
        JsonlDataset(path, "train")
    assert len(JsonlDataset(path)) == 1


def test_image_that_breaks_after_the_scan(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path, [{"image": "images/a.jpg", "text": "a"}, {"image": "images/b.png", "text": "b"}])
    raising = JsonlDataset(path, transform=image_transform(16, train=False))
    skipping = JsonlDataset(path, transform=image_transform(16, train=False), on_error="skip")
    (tmp_path / "images" / "a.jpg").write_bytes(b"not an image any more")
    assert skipping[0] is None
    assert skipping[1]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="cannot decode") as raised:
        raising[0]
    assert raised.value.record == "images/a.jpg"


def test_jsonl_fixture() -> None:
    path = fixture("jsonl") / "data.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for split in ("train", "val", "test"):
        expected = [
            (r["image"], text)
            for r in records
            if r["split"] == split
            for text in (r["text"] if isinstance(r["text"], list) else [r["text"]])
        ]
        dataset = JsonlDataset(path, split, transform=image_transform(24, train=True))
        samples = [dataset[i] for i in range(len(dataset))]
        assert [(s["id"], s["text"]) for s in samples] == expected
        assert all(s["image"].shape == (3, 24, 24) for s in samples)
    assert any(isinstance(r["text"], list) for r in records)


# --- building sources ----


def test_build_from_spec_checks_options(tmp_path: Path) -> None:
    root = make_medicat(tmp_path, 10)
    spec = SourceSpec("medicat", str(root), {"radiology_only": False, "holdout": 0})
    dataset = build_pretrain_dataset(spec, "train", scan="none")
    assert isinstance(dataset, MedicatDataset) and len(dataset.images) == 10
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['radius'\].*radiology_only"):
        build_pretrain_dataset(SourceSpec("medicat", str(root), {"radius": 1}), "train")
    with pytest.raises(ValueError, match="unknown source format 'coco'"):
        build_pretrain_dataset(SourceSpec("coco", str(root)), "train")  # type: ignore[arg-type]
    # options override the caller's on_error / scan
    spec = SourceSpec("medicat", str(root), {"scan": "bogus"})
    with pytest.raises(ValueError, match="scan must be"):
        build_pretrain_dataset(spec, "train", scan="none")


def test_concatenated_sources_keep_their_reports(tmp_path: Path) -> None:
    roco = make_roco(tmp_path / "roco")
    jsonl = make_jsonl(tmp_path / "jsonl", [{"image": "images/a.jpg", "text": ["x y", "z"]}])
    specs = [SourceSpec("roco", str(roco)), SourceSpec("jsonl", str(jsonl))]
    with pytest.raises(DataError, match="no record has a 'split'"):
        build_pretrain_datasets(specs, "train")
    dataset = build_pretrain_datasets(specs[:1] * 2, "train", scan="header")
    assert len(dataset) == 4
    assert [report.name for report in dataset.reports] == ["roco/train", "roco/train"]
    assert dataset[3]["id"] == "ROCO_00003"


# --- transforms ----


def test_eval_transform_keeps_aspect_and_normalises() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # right half white
    out = image_transform(10, train=False)(image)
    assert type(out) is torch.Tensor and out.shape == (3, 10, 10) and out.dtype == torch.float32
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    # the centre crop of a 20x10 resize spans columns 5..14: black left of 10, white right of it
    assert torch.allclose(out[:, :, 0], black[:, None].expand(3, 10), atol=1e-3)
    assert torch.allclose(out[:, :, -1], white[:, None].expand(3, 10), atol=1e-3)


def test_train_transform_never_flips() -> None:
    image = Image.new("RGB", (30, 30), (0, 0, 0))
    image.paste((255, 255, 255), (15, 0, 30, 30))
    transform = image_transform(16, train=True)
    torch.manual_seed(0)
    for _ in range(30):
        out = transform(image)
        assert out.shape == (3, 16, 16)
        assert out[:, :, :4].mean() < 0 < out[:, :, -4:].mean()


# --- DataModule ----


def test_datamodule_batches_from_fixtures() -> None:
    sources = [
        SourceSpec("roco", str(fixture("roco"))),
        SourceSpec("jsonl", str(fixture("jsonl") / "data.jsonl")),
        {"format": "mimic_cxr", "root": str(fixture("mimic_cxr")), "options": {"views": None}},
    ]
    data = PretrainDataModule(sources, image_size=32, max_text_length=24, batch_size=4, num_workers=0, scan="header")
    data.setup("fit")
    assert [report.name for report in data.train_dataset.reports] == [
        "roco/train",
        "jsonl/data/train",
        "mimic_cxr/train",
    ]
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 24
    assert (batch["mlm_labels"] != -100).any(dim=1).all()
    assert len(data.train_dataloader()) == len(data.train_dataset) // 4
    first, again = (next(iter(data.val_dataloader())) for _ in range(2))
    assert torch.equal(first["mlm_input_ids"], again["mlm_input_ids"])  # validation masks are fixed
    assert data.test_dataset is None
    data.setup("test")
    assert len(data.test_dataset) > 0


def test_datamodule_rejects_batches_that_drop_last_would_lose(tmp_path: Path) -> None:
    make_roco(tmp_path, "validation")
    data = PretrainDataModule([SourceSpec("roco", str(make_roco(tmp_path)))], batch_size=8, num_workers=0)
    # Found by the set-up scan, before any step runs.
    with pytest.raises(ValueError, match=r"fewer than data\.init_args\.batch_size=8"):
        data.setup("fit")


def test_datamodule_from_yaml_with_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PretrainDataModule, "data")
    yaml = f"""
data:
  sources:
    - format: jsonl
      root: {fixture("jsonl") / "data.jsonl"}
    - format: medicat
      root: {fixture("medicat")}
      options: {{radiology_only: false, seed: 3}}
  image_size: 32
  batch_size: 2
  num_workers: 0
  on_error: skip
"""
    config = parser.parse_string(yaml)
    data = parser.instantiate_classes(config).data
    assert isinstance(data, PretrainDataModule)
    assert [source.format for source in data.sources] == ["jsonl", "medicat"]
    assert data.sources[1].options == {"radiology_only": False, "seed": 3}
    assert (data.tokenizer, data.image_size, data.on_error, data.val_split) == ("minilm", 32, "skip", "val")
    data.setup("validate")
    assert len(data.val_dataset.reports) == 2
    with pytest.raises(Exception, match="format"):
        parser.parse_string(yaml.replace("format: jsonl", "format: coco"))
