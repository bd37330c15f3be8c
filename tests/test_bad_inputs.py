"""The corpus of bad inputs (``tests/data/bad``): every defect gives a clear ``DataError`` naming file and record
under ``on_error="raise"``, is skipped and counted under ``"skip"``, and convertible images load as RGB and train.
Images that break after the set-up scan never crash a DataLoader worker."""

from __future__ import annotations

import csv
import importlib.util
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from umd_lightning.data.classification import ClassificationDataset
from umd_lightning.data.common import DataError, check_image_header, load_image
from umd_lightning.data.datamodule import PretrainDataModule
from umd_lightning.data.downstream import ClassificationDataModule, VQADataModule
from umd_lightning.data.pretrain import JsonlDataset, RocoDataset
from umd_lightning.data.sources.melinda import melinda_records
from umd_lightning.data.vqa import VQACollator
from umd_lightning.metrics.vqa import VQAAccuracy

BAD = Path(__file__).resolve().parent / "data" / "bad"
FIXTURES = Path(__file__).resolve().parent / "data"
VQA_JSON = "VQA_RAD Dataset Public.json"
VQA_IMAGES = "VQA_RAD Image Folder"

# qid -> (kind, found when the annotations are read (True) or when the images are scanned at set-up (False))
VQA_DEFECTS = {
    "truncated_jpeg": ("bad_image", False),
    "zero_byte_file": ("bad_image", False),
    "decompression_bomb": ("image_too_large", False),
    "missing_image": ("missing_image", False),
    "dotdot_path": ("unsafe_path", True),
    "absolute_path": ("unsafe_path", True),
    "empty_question": ("empty_text", True),
    "nonstring_question": ("empty_text", True),
}
CONVERTIBLE = ("grayscale", "gray16", "cmyk", "palette_alpha")


def vqa_module(root: Path, **options) -> VQADataModule:
    defaults = {"tokenizer": "minilm", "image_size": 32, "batch_size": 32, "num_workers": 0}
    return VQADataModule("vqa_rad", str(root), **{**defaults, **options})


def qids(module: VQADataModule) -> set[str]:
    return {record.id for dataset in module.datasets.values() for record in dataset.records}


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("make_bad_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ the corpus
def test_corpus_is_small_and_regenerates_identically(tmp_path):
    load_module(BAD / "make_bad_inputs.py").generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(BAD): p.read_bytes()
        for p in BAD.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".md") and "__pycache__" not in p.parts
    }
    assert fresh.keys() == committed.keys()
    assert [name for name in fresh if fresh[name] != committed[name]] == []
    assert sum(len(data) for data in committed.values()) < 300_000


# ------------------------------------------------------------------------------------------------ images
def test_convertible_images_load_as_rgb_with_known_pixels():
    folder = BAD / "vqa_rad" / VQA_IMAGES
    gray16 = load_image(folder / "gray16.png")  # I;16, min 1,000 at top-left, max 61,000 at bottom-right
    assert Image.open(folder / "gray16.png").mode == "I;16"
    assert (gray16.mode, gray16.getpixel((0, 0)), gray16.getpixel((31, 31))) == ("RGB", (0, 0, 0), (255, 255, 255))
    palette = load_image(folder / "palette_alpha.png")  # transparent top-left corner on black, red elsewhere
    assert (palette.getpixel((3, 3)), palette.getpixel((31, 0))) == ((0, 0, 0), (255, 0, 0))
    cmyk = load_image(folder / "cmyk.jpg")
    r, g, b = cmyk.getpixel((2, 2))  # cyan ink on the left half, no ink on the right (JPEG: approximately)
    assert r < 30 and g > 220 and b > 220 and min(cmyk.getpixel((29, 2))) > 220
    gray = load_image(folder / "grayscale.jpg")
    assert gray.mode == "RGB" and all(len(set(pixel)) == 1 for pixel in gray.getdata())


def test_truncated_jpeg_passes_a_header_scan_but_not_a_full_decode():
    path = BAD / "vqa_rad" / VQA_IMAGES / "truncated.jpg"
    check_image_header(path)
    with pytest.raises(DataError, match=r"truncated\.jpg, record q7: cannot decode .*truncated") as caught:
        load_image(path, record="q7")
    assert caught.value.kind == "bad_image"


def test_bomb_header_is_refused_without_decoding():
    """``bomb.png`` is 66 bytes whose header declares 60,000 x 60,000 pixels: PIL's own limit refuses it."""
    path = BAD / "vqa_rad" / VQA_IMAGES / "bomb.png"
    assert path.stat().st_size < 100
    for check in (check_image_header, load_image):
        with pytest.raises(DataError, match=r"3600000000 pixels.*\[image_too_large\]"):
            check(path, record="bomb")


def test_image_between_one_and_two_times_the_pixel_limit_is_refused(monkeypatch):
    # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; the loaders turn that warning into an error too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # a 32 x 32 image has 1,024 pixels
    path = BAD / "vqa_rad" / VQA_IMAGES / "synpic100.jpg"
    for check in (check_image_header, load_image):
        with pytest.raises(DataError) as caught:
            check(path, record="r")
        assert caught.value.kind == "image_too_large"


# ------------------------------------------------------------------------------------------------ VQA-RAD layout
def test_vqa_skip_drops_and_counts_every_defect_and_keeps_the_convertible_images():
    module = vqa_module(BAD / "vqa_rad", on_error="skip", validation="val_is_test")
    module.setup("fit")
    module.setup("test")
    reports = [*module.scan_reports]
    counted: dict[str, int] = {}
    for report in reports:
        for kind, count in report.problems.items():
            counted[kind] = counted.get(kind, 0) + count
    assert counted == {"bad_image": 2, "image_too_large": 1, "missing_image": 1, "unsafe_path": 2, "empty_text": 2}
    examples = "\n".join(message for report in reports for shown in report.examples.values() for message in shown)
    for qid in VQA_DEFECTS:
        assert f"record {qid}:" in examples
    kept = qids(module)
    assert kept.isdisjoint(VQA_DEFECTS)
    assert set(CONVERTIBLE) <= kept


@pytest.mark.parametrize("qid", sorted(VQA_DEFECTS))
def test_vqa_raise_names_file_and_record_at_set_up(tmp_path, qid):
    """One bad question among good ones: the error comes from reading the annotations or from ``setup``, never
    from a batch."""
    root = tmp_path / "vqa_rad"
    shutil.copytree(BAD / "vqa_rad", root)
    entries = json.loads((root / VQA_JSON).read_text())
    good = {"good_yes", "good_no", "good_open", "none_answer", "test_good"}
    (root / VQA_JSON).write_text(json.dumps([e for e in entries if e["qid"] in good or e["qid"] == qid]))
    kind, in_annotations = VQA_DEFECTS[qid]
    if in_annotations:
        with pytest.raises(DataError) as caught:
            vqa_module(root, on_error="raise")
        assert caught.value.file == str(root / VQA_JSON)
    else:
        module = vqa_module(root, on_error="raise")
        with pytest.raises(DataError) as caught:
            module.setup("fit")
        assert VQA_IMAGES in caught.value.file
    assert (caught.value.kind, caught.value.record) == (kind, qid)
    assert f"record {qid}:" in str(caught.value)


def test_json_file_that_is_not_a_list_fails_whatever_the_policy():
    for policy in ("raise", "skip"):
        with pytest.raises(DataError, match=r"vqa_rad_not_a_list/VQA_RAD Dataset Public\.json: expected a JSON list"):
            vqa_module(BAD / "vqa_rad_not_a_list", on_error=policy)


def test_none_answer_is_the_answer_none_and_an_unknown_test_answer_is_scored_wrong(tokenizer):
    module = vqa_module(BAD / "vqa_rad", on_error="skip", validation="val_is_test")
    answers = {r.id: r.answer for split in module.records.values() for r in split}
    assert answers["none_answer"] == answers["test_none_answer"] == "none"
    assert "none" in module.answer_vocab
    assert module.out_of_vocabulary["test"] == 1
    module.setup("test")
    test = module.datasets["test"]
    samples = {sample["qid"]: sample for sample in (test[i] for i in range(len(test)))}
    assert samples["test_none_answer"]["answer_index"] == module.answer_vocab.index("none")
    assert samples["test_out_of_vocabulary"]["answer_index"] == -1
    batch = VQACollator(tokenizer, 16, num_answers=module.num_answers)(list(samples.values()))
    outside = batch["qids"].index("test_out_of_vocabulary")
    assert batch["targets"][outside].sum() == 0
    # Even a model that predicts every class id scores the outside answer wrong.
    metric = VQAAccuracy()
    for guess in range(module.num_answers):
        metric.update(torch.tensor([guess]), batch["answer_index"][outside : outside + 1], torch.tensor([False]))
    result = metric.compute()
    assert (float(result["overall"]), int(result["n_outside_vocab"])) == (0.0, module.num_answers)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from umd_lightning.models.config import resolve_text_model

    return AutoTokenizer.from_pretrained(resolve_text_model("minilm"), local_files_only=True)


@pytest.mark.slow
def test_convertible_images_train():
    """A training batch holding the grayscale, 16-bit, CMYK and palette images takes an optimiser step."""
    from umd_lightning.stages import FineTune

    module = vqa_module(BAD / "vqa_rad", on_error="skip", validation="val_is_test")
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert set(CONVERTIBLE) <= set(batch["qids"])
    assert batch["pixel_values"].shape[1:] == (3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()
    torch.manual_seed(0)
    model = FineTune(task="vqa", num_outputs=module.num_answers, preset="tiny", text_model="minilm", image_size=32)
    loss = model.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ ROCO layout
ROCO_DEFECTS = {
    "ROCO_00005": "empty_text",
    "ROCO_00006": "bad_image",
    "ROCO_00007": "bad_image",
    "ROCO_00008": "missing_image",
    "../../../../outside": "unsafe_path",
    "line 10": "bad_line",
}


def test_roco_skip_counts_every_defect_and_the_short_caption_filter():
    dataset = RocoDataset(BAD / "roco", "train", on_error="skip")
    assert dict(dataset.report.problems) == {
        "empty_text": 1,
        "bad_image": 2,
        "missing_image": 1,
        "unsafe_path": 1,
        "bad_line": 2,
        "short_caption": 1,
    }
    # ROCO_00002 ("Axial  MRI of the<TAB>brain ...") has a second tab: a third column, not part of the caption.
    assert [image.id for image in dataset.images] == ["ROCO_00001", "ROCO_00003"]
    for record, kind in {**ROCO_DEFECTS, "line 2": "bad_line"}.items():
        assert any(f"record {record}:" in m for m in dataset.report.examples[kind])
    assert all(dataset[i]["image"].mode == "RGB" for i in range(len(dataset)))


@pytest.mark.parametrize("record", sorted(ROCO_DEFECTS))
def test_roco_raise_names_file_and_record_at_set_up(tmp_path, record):
    root = tmp_path / "roco"
    shutil.copytree(BAD / "roco", root)
    captions = root / "train" / "radiology" / "captions.txt"
    lines = captions.read_text().splitlines()
    bad = lines[9] if record == "line 10" else next(line for line in lines if line.startswith(record + "\t"))
    captions.write_text(f"{lines[0]}\n{bad}\n")
    data = PretrainDataModule([{"format": "roco", "root": str(root)}], image_size=32, batch_size=1, num_workers=0)
    with pytest.raises(DataError) as caught:
        data.setup("fit")
    expected = "line 2" if record == "line 10" else record
    assert (caught.value.kind, caught.value.record, caught.value.file) == (
        ROCO_DEFECTS[record],
        expected,
        str(captions),
    )


# ------------------------------------------------------------------------------------------------ MELINDA layout
MELINDA_DEFECTS = {
    "PMC4_F1.jpg": "empty_text",
    "/etc/passwd": "unsafe_path",
    "../train.csv": "unsafe_path",
    "PMC5_F1.jpg": "missing_image",
    "PMC6_F1.jpg": "bad_image",
    "PMC7_F1.jpg": "empty_text",
}


def test_melinda_skip_counts_every_defect_and_loads_the_16_bit_png():
    module = ClassificationDataModule("melinda", str(BAD / "melinda"), image_size=32, on_error="skip", num_workers=0)
    module.setup("fit")
    problems: dict[str, int] = {}
    for report in module.scan_reports:
        for kind, count in report.problems.items():
            problems[kind] = problems.get(kind, 0) + count
    assert problems == {"empty_text": 2, "unsafe_path": 2, "missing_image": 1, "bad_image": 1}
    train = module.datasets["train"]
    assert [r.id for r in train.records] == ["PMC1_F1.jpg", "PMC2_F1.jpg", "PMC3_F1.png"]
    assert train[2]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("figure", sorted(MELINDA_DEFECTS))
def test_melinda_raise_names_file_and_record(tmp_path, figure):
    root = tmp_path / "melinda"
    shutil.copytree(BAD / "melinda", root)
    with (root / "train.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows([rows[0], rows[1], next(row for row in rows if row["figure_file"] == figure)])
    records = []
    with pytest.raises(DataError) as caught:
        records = melinda_records(root)
        ClassificationDataset(records, lambda image: image, ["Blot", "Microscopy"], on_error="raise")
    assert (caught.value.kind, caught.value.record) == (MELINDA_DEFECTS[figure], figure)
    assert "train.csv" in caught.value.file or "melinda_images" in caught.value.file


def test_csv_without_a_required_column_fails_whatever_the_policy():
    for policy in ("raise", "skip"):
        with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) \['caption'\]") as caught:
            melinda_records(BAD / "melinda_missing_column", on_error=policy)
        assert caught.value.kind == "missing_column"


def test_unknown_label_column_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown label column 'modality'; valid columns are \['i_meth'"):
        ClassificationDataModule("melinda", str(BAD / "melinda"), label_column="modality")


# ------------------------------------------------------------------------------------------------ generic JSONL
def test_jsonl_skip_counts_every_defect_and_raise_stops_at_the_first():
    dataset = JsonlDataset(BAD / "jsonl" / "data.jsonl", "train", on_error="skip")
    assert dict(dataset.report.problems) == {"unsafe_path": 1, "empty_text": 2, "image_too_large": 1, "bad_json": 1}
    assert [image.id for image in dataset.images] == ["palette_alpha", "gray16"]
    assert [dataset[i]["image"].mode for i in range(len(dataset))] == ["RGB"] * 3  # gray16 has two captions
    with pytest.raises(DataError, match=r"data\.jsonl, record absolute_path: absolute image path '/etc/passwd'"):
        JsonlDataset(BAD / "jsonl" / "data.jsonl", "train", on_error="raise")


# ------------------------------------------------------------------------------------------------ mid-epoch
def corrupt(path: Path) -> None:
    """Cut an image that passed the set-up scan to half its length."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_vqa_image_corrupted_after_the_scan_in_a_worker(tmp_path, policy):
    root = tmp_path / "vqa_rad"
    shutil.copytree(FIXTURES / "vqa_rad", root)
    module = vqa_module(root, on_error=policy, batch_size=4, num_workers=2)
    module.setup("fit")
    train = module.datasets["train"]
    victim = train.records[0]
    corrupt(victim.image)
    on_victim = {record.id for record in train.records if record.image == victim.image}
    if policy == "raise":
        # The worker's DataError reaches the main process as a DataError (with the worker's traceback).
        pattern = rf"record ({'|'.join(map(re.escape, on_victim))}): cannot decode .*{re.escape(victim.image.name)}"
        with pytest.raises(DataError, match=pattern) as caught:
            for _ in module.train_dataloader():
                pass
        assert caught.value.kind == "bad_image"
    else:
        seen = [qid for batch in module.train_dataloader() if batch is not None for qid in batch["qids"]]
        assert sorted(seen) == sorted(r.id for r in train.records if r.id not in on_victim)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_pretrain_image_corrupted_after_the_scan_in_a_worker(tmp_path, policy):
    root = tmp_path / "roco"
    shutil.copytree(FIXTURES / "roco", root)
    module = PretrainDataModule(
        [{"format": "roco", "root": str(root)}], image_size=32, batch_size=2, num_workers=2, on_error=policy
    )
    module.setup("fit")
    first = module.train_dataset.datasets[0].images[0]
    corrupt(first.image)
    loader = module._loader(module.train_dataset, "train", train=False)  # every sample once, none dropped by size
    if policy == "raise":
        with pytest.raises(DataError, match=rf"record {first.id}: cannot decode") as caught:
            for _ in loader:
                pass
        assert caught.value.kind == "bad_image"
    else:
        seen = [i for batch in loader if batch is not None for i in batch["ids"]]
        assert sorted(seen) == sorted(image.id for image in module.train_dataset.datasets[0].images[1:])


def test_data_error_survives_pickling_and_a_worker_re_raise():
    error = DataError("bad_image", "a/b.json", "q1", "cannot decode b.jpg")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.file, copy.record, copy.reason, str(copy)) == (
        "bad_image",
        "a/b.json",
        "q1",
        "cannot decode b.jpg",
        "a/b.json, record q1: cannot decode b.jpg [bad_image]",
    )
    # torch's DataLoader re-raises a worker's error as type(error)(message with the worker's traceback).
    rebuilt = DataError(f"Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\n{error}\n")
    assert rebuilt.kind == "bad_image" and "record q1" in str(rebuilt)
