"""The synthetic data generator: determinism, exact DATA.md layouts, images that match their texts, the CLI,
and committed fixtures that equal a fresh run of ``tests/data/make_fixtures.py``."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umd_lightning.data.synthetic import LAYOUTS, OUTPUT_FOLDERS, REGIONS, SHAPES, generate, main, region_box

FIXTURES = Path(__file__).resolve().parent / "data"
REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LESION_THRESHOLD = 95  # every non-lesion pixel is drawn below this grey level (module docstring)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def find_lesions(image: np.ndarray) -> dict[str, tuple[str, float]]:
    """Region -> (shape, peak grey level) of each lesion, from the threshold mask's fill of its bounding box:
    about 1.0 for a square, pi/4 for a circle, 1/2 for a triangle."""
    found = {}
    for region in REGIONS:
        left, top, right, bottom = region_box(region, image.shape[0])
        patch = image[top:bottom, left:right]
        mask = patch > LESION_THRESHOLD
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "triangle" if fill < 0.65 else "circle" if fill < 0.87 else "square"
        found[region] = (shape, float(patch.max()))
    return found


def answer_from_image(question: str, image: np.ndarray) -> str | None:
    """Answer one of the generator's English questions by looking at the image (None: not about the image)."""
    lesions = find_lesions(image)
    shapes = {shape: region for region, (shape, _) in lesions.items()}
    if match := re.fullmatch(r"(?:What shape is in|What is the shape of the lesion in) the (.+)\?", question):
        return lesions.get(match[1], ("none",))[0]
    if match := re.fullmatch(r"(?:Is there|Does the image contain) a (\w+)\?", question):
        return "yes" if match[1] in shapes else "no"
    if match := re.fullmatch(
        r"(?:Is there a lesion on the|Is any lesion located on the) (left|right)(?: side)?\?", question
    ):
        return "yes" if any(match[1] in region for region in lesions) else "no"
    if match := re.fullmatch(r"(?:Where is|In which part of the image is) the (\w+)\?", question):
        return shapes.get(match[1], "none")
    if match := re.fullmatch(r"(?:Is|Does) the (\w+) (?:appear )?bright\?", question):
        region = shapes[match[1]]
        return "yes" if lesions[region][1] > 190 else "no"
    if question.startswith("How many lesions"):
        return str(len(lesions))
    return None


# --------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", n_images=6, image_size=24, seed=5)
    second = generate(tmp_path / "b", n_images=6, image_size=24, seed=5)
    other = generate(tmp_path / "c", layouts=["roco"], n_images=6, image_size=24, seed=6)
    assert list(first) == [name for layout in LAYOUTS for name in OUTPUT_FOLDERS[layout]]
    for name in first:
        assert tree(first[name]) == tree(second[name]), name
    assert tree(first["roco"]) != tree(other["roco"])


def test_a_layout_does_not_depend_on_the_others_written(tmp_path: Path) -> None:
    alone = generate(tmp_path / "alone", layouts=["slake"], n_images=6, image_size=24, seed=1)
    together = generate(tmp_path / "all", layouts=["roco", "slake"], n_images=6, image_size=24, seed=1)
    assert tree(alone["slake"]) == tree(together["slake"])


def test_refuses_bad_arguments_and_occupied_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout"):
        generate(tmp_path, layouts=["roco", "chexpert"])
    with pytest.raises(ValueError, match="at least 6"):
        generate(tmp_path, n_images=5)
    generate(tmp_path, layouts=["jsonl"], n_images=6, image_size=16)
    with pytest.raises(FileExistsError, match="jsonl"):
        generate(tmp_path, layouts=["jsonl"], n_images=6, image_size=16, seed=1)
    generate(tmp_path, layouts=["jsonl"], n_images=7, image_size=16, overwrite=True)
    assert len((tmp_path / "jsonl" / "data.jsonl").read_text().splitlines()) == 7


def test_committed_fixtures_equal_a_fresh_run(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.make_fixtures(tmp_path)
    for name, root in fresh.items():
        committed, regenerated = tree(FIXTURES / name), tree(root)
        assert sorted(committed) == sorted(regenerated), f"{name}: file list differs; run make_fixtures.py"
        for relative, data in regenerated.items():
            if committed[relative] == data:
                continue
            # An image may differ by encoder rounding on another platform; its pixels must not.
            assert relative.endswith((".jpg", ".png")), f"{name}/{relative} differs; run make_fixtures.py"
            difference = np.abs(gray(FIXTURES / name / relative) - gray(root / relative)).max()
            assert difference <= 2, f"{name}/{relative} pixels differ by {difference}"
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    assert total < 1_000_000


def test_cli_writes_the_named_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--layouts", "vqa_rad,melinda", "--images", "6", "--size", "16", "--seed", "3"])
    printed = capsys.readouterr().out
    assert printed.splitlines() == [
        f"vqa_rad: {tmp_path / 'vqa_rad'}",
        f"vqa_rad_preprocessed: {tmp_path / 'vqa_rad_preprocessed'}",
        f"melinda: {tmp_path / 'melinda'}",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["melinda", "vqa_rad", "vqa_rad_preprocessed"]
    with Image.open(next((tmp_path / "melinda" / "melinda_images").iterdir())) as image:
        assert image.size == (16, 16)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--layouts", "melinda", "--images", "6"])  # occupied, no --overwrite
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([str(tmp_path / "new"), "--layouts", "nope"])


# ------------------------------------------------------------------------------- layouts (committed fixtures)


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


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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


# ------------------------------------------------------------------------------------- image matches text


LESION_PHRASE = re.compile(
    r"a (bright|dim) (circle|square|triangle) in the (upper left|upper right|lower left|"
    r"lower right|centre)"
)


def quadrant_means(image: np.ndarray) -> dict[str, float]:
    half = image.shape[0] // 2
    return {
        "upper left": image[:half, :half].mean(),
        "upper right": image[:half, half:].mean(),
        "lower left": image[half:, :half].mean(),
        "lower right": image[half:, half:].mean(),
    }


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
