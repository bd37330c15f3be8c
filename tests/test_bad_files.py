"""The issue-10 part of the bad-input corpus (``tests/data/bad``, see its README): broken checkpoints and exports
named as broken (not as unsafe pickles), invalid UTF-8 named with file and byte offset, byte-order marks accepted,
images decoded as displayed, numeric answers normalised once, silent drops and degenerate settings reported."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from umd_lightning.callbacks import GMCoord
from umd_lightning.cli import main
from umd_lightning.data.answers import normalize_answer
from umd_lightning.data.common import DataError, load_image
from umd_lightning.data.downstream import VQADataModule
from umd_lightning.data.pretrain import JsonlDataset, MimicCxrDataset, RocoDataset
from umd_lightning.data.sources.melinda import melinda_records
from umd_lightning.data.vqa import slake_records, vqa_med_2019_m3ae_records, vqa_rad_records
from umd_lightning.export import main as export_main
from umd_lightning.hub import ExportError, UMDInferenceModel
from umd_lightning.predict import Predictor
from umd_lightning.stages import FineTune, MRPretrain, StageError
from umd_lightning.stages.base import load_checkpoint_file
from umd_lightning.vocabulary import vocabulary_checksum
from umd_lightning.weights import TRUST_PICKLE_ENV, UnreadableWeightsError, UntrustedPickleError, read_weights

TESTS = Path(__file__).resolve().parent
BAD = TESTS / "data" / "bad"
FIXTURES = TESTS / "data"
WEIGHTS = BAD / "weights"
VQA_JSON = "VQA_RAD Dataset Public.json"


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


# ------------------------------------------------------------------------------------------------ defect 1
@pytest.mark.parametrize("name", ["truncated.ckpt", "text.ckpt", "empty.ckpt", "truncated.safetensors"])
@pytest.mark.parametrize("trust", [False, True])
def test_broken_weights_files_are_called_broken_not_unsafe(monkeypatch, name, trust):
    if trust:
        monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    else:
        monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    path = WEIGHTS / name
    with pytest.raises(UnreadableWeightsError) as caught:
        read_weights(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable checkpoint (truncated or corrupt")
    assert TRUST_PICKLE_ENV not in message and "pickle" not in message.lower() and one_line(message)
    with pytest.raises(StageError, match=r"is not a readable checkpoint \(truncated or corrupt"):
        load_checkpoint_file(path)


def test_a_real_pickle_still_gets_the_pickle_hint(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "callback": logging.getLogger("x")}, path)
    with pytest.raises(UntrustedPickleError, match=f"{TRUST_PICKLE_ENV}=1") as caught:
        read_weights(path)
    assert "Unsupported global" in str(caught.value) and one_line(str(caught.value))


def test_predictor_names_a_broken_file_and_a_pretrain_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(StageError, match=r"truncated\.ckpt is not a readable checkpoint \(truncated or corrupt"):
        Predictor.from_checkpoint(WEIGHTS / "truncated.ckpt")
    pretrain = tmp_path / "pretrain.ckpt"
    torch.save(
        {"umd_stage": "pretrain", "state_dict": {}, "hyper_parameters": {"_class_path": "x.MRPretrain"}}, pretrain
    )
    with pytest.raises(StageError) as caught:
        Predictor.from_checkpoint(pretrain)
    assert str(caught.value) == (
        f"{pretrain} is a pretrain checkpoint; Predictor needs a finetune one (`umd fit` of FineTune)"
    )


def test_export_command_names_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main([str(WEIGHTS / "text.ckpt"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("umd export: error: ") and "text.ckpt is not a readable checkpoint" in err
    assert err.count("\n") == 1 and TRUST_PICKLE_ENV not in err


def fit_config(tmp_path: Path, model: dict, data: dict) -> Path:
    config = {
        "seed_everything": 0,
        "model": model,
        "data": {"class_path": data.pop("class_path"), "init_args": data},
        "trainer": {
            "max_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
        },
        "checkpoint": {"dirpath": str(tmp_path / "run" / "checkpoints")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def vqa_data(root: Path, **more) -> dict:
    return {
        "class_path": "umd_lightning.data.VQADataModule",
        "dataset": "vqa_rad",
        "root": str(root),
        "image_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        **more,
    }


@pytest.mark.parametrize("trust", [False, True])
def test_fit_from_a_text_file_as_pretrained_ends_in_one_line(tmp_path, capsys, monkeypatch, trust):
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1" if trust else "0")
    model = {"class_path": "umd_lightning.stages.FineTune", "init_args": {"preset": "tiny"}}
    model["init_args"]["pretrained"] = str(WEIGHTS / "text.ckpt")
    config = fit_config(tmp_path, model, vqa_data(FIXTURES / "vqa_rad"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("umd: error: ") and "text.ckpt is not a readable checkpoint (truncated or corrupt" in err


# ------------------------------------------------------------------------------------------------ defect 3
def latin_1_offset(path: Path) -> int:
    return path.read_bytes().index(b"caf\xe9") + 3


@pytest.mark.parametrize(
    ("read", "file"),
    [
        (lambda: vqa_rad_records(BAD / "vqa_rad_bad_encoding"), BAD / "vqa_rad_bad_encoding" / VQA_JSON),
        (lambda: slake_records(BAD / "slake_bad_encoding"), BAD / "slake_bad_encoding" / "train.json"),
        (lambda: melinda_records(BAD / "melinda_bad_encoding"), BAD / "melinda_bad_encoding" / "train.csv"),
        (
            lambda: MimicCxrDataset(BAD / "mimic_cxr_bad_encoding", "train"),
            BAD / "mimic_cxr_bad_encoding" / "mimic-cxr-2.0.0-metadata.csv",
        ),
    ],
    ids=["vqa_rad", "slake", "melinda", "mimic_cxr"],
)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_invalid_utf8_names_file_and_byte_offset(read, file, policy, monkeypatch):
    # Every reader gets the policy through its own argument; the failure is a file defect either way.
    with pytest.raises(DataError) as caught:
        read()
    error = caught.value
    offset = latin_1_offset(file)
    line = file.read_bytes()[:offset].count(b"\n") + 1
    assert (error.kind, error.file) == ("bad_encoding", str(file))
    assert f"not valid UTF-8 at byte {offset} (line {line}: 0xe9" in str(error) and "re-save" in str(error)
    assert one_line(str(error))


def test_data_check_reports_bad_encoding_as_a_data_problem(tmp_path, capsys):
    from umd_lightning.data.check import main as check_main

    data = vqa_data(BAD / "vqa_rad_bad_encoding")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": data.pop("class_path"), "init_args": data}}))
    assert check_main(["--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "annotations: cannot be read: " in out and "[bad_encoding]" in out and "(bad_encoding) -> exit 1" in out


def test_a_byte_order_mark_is_accepted_by_every_reader(tmp_path):
    assert [r.id for r in vqa_rad_records(BAD / "vqa_rad_bom")] == ["good", "test_good"]
    assert [r.id for r in melinda_records(BAD / "melinda_bom")] == ["PMC1_F1.jpg", "PMC2_F1.jpg", "PMC2_F1.jpg"]
    # The pipe-separated VQA-Med files and a ROCO captions file, each with a BOM added to the fixture.
    root = tmp_path / "vqa_med_2019_m3ae"
    shutil.copytree(FIXTURES / "vqa_med_2019_m3ae", root)
    for file in root.glob("*/QA/*.csv"):
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    plain = vqa_med_2019_m3ae_records(FIXTURES / "vqa_med_2019_m3ae")
    assert [r.image_id for r in vqa_med_2019_m3ae_records(root)] == [r.image_id for r in plain]
    roco = tmp_path / "roco"
    shutil.copytree(FIXTURES / "roco", roco)
    captions = roco / "train" / "radiology" / "captions.txt"
    captions.write_bytes(b"\xef\xbb\xbf" + captions.read_bytes())
    with_bom, without = RocoDataset(roco, "train", scan="none"), RocoDataset(FIXTURES / "roco", "train", scan="none")
    assert [(i.id, i.texts) for i in with_bom.images] == [(i.id, i.texts) for i in without.images]
    assert with_bom.images[0].id.startswith("ROCO_")


# ------------------------------------------------------------------------------------------------ defect 4
def test_exif_orientation_is_applied():
    """The file stores the bright half at the bottom with Orientation 3 (rotate 180): it displays bright on top."""
    path = BAD / "jsonl_images" / "images" / "exif_rotated.jpg"
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == 3
        assert stored.convert("L").getpixel((16, 28)) > 200 and stored.convert("L").getpixel((16, 3)) < 60
    shown = load_image(path)
    assert min(shown.getpixel((16, 3))) > 200 and max(shown.getpixel((16, 28))) < 60


def test_float_tiff_is_scaled_by_its_finite_values_and_the_image_is_counted():
    images = BAD / "jsonl_images" / "images"
    nan = load_image(images / "float_nan.tif")  # ramp 100 -> 200, one NaN at (5, 5)
    assert (nan.getpixel((0, 0)), nan.getpixel((31, 31)), nan.getpixel((5, 5))) == ((0,) * 3, (255,) * 3, (0,) * 3)
    assert nan.getpixel((16, 16))[0] == round((16 * 32 + 16) / 1023 * 255)
    inf = load_image(images / "float_inf.tif")  # +inf at (1, 0) white, -inf at (2, 0) black
    assert (inf.getpixel((1, 0)), inf.getpixel((2, 0)), inf.getpixel((31, 31))) == ((255,) * 3, (0,) * 3, (255,) * 3)
    dataset = JsonlDataset(BAD / "jsonl_images" / "data.jsonl")
    assert [image.id for image in dataset.images] == ["exif_rotated", "float_nan", "float_inf"]
    assert dict(dataset.report.notes) == {"non_finite_pixels": 2} and dataset.report.skipped == 0
    shown = "\n".join(dataset.report.note_examples["non_finite_pixels"])
    assert "float_nan.tif, record float_nan: 1 NaN/infinite pixel(s)" in shown and "record float_inf: 2" in shown
    assert "kept, noted non_finite_pixels: 2" in dataset.report.summary()


def test_data_check_lists_the_noted_images_without_calling_them_problems(tmp_path, capsys):
    from umd_lightning.data.check import main as check_main

    root = tmp_path / "jsonl_images"
    shutil.copytree(BAD / "jsonl_images", root)
    rows = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    (root / "data.jsonl").write_text("".join(json.dumps({**row, "split": "train"}) + "\n" for row in rows))
    source = {"format": "jsonl", "root": str(root / "data.jsonl")}
    data = {"class_path": "umd_lightning.data.PretrainDataModule", "init_args": {"sources": [source]}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    assert check_main(["--config", str(config), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "kept, noted non_finite_pixels: 2" in out and "float_nan.tif, record float_nan: 1 NaN" in out


# ------------------------------------------------------------------------------------------------ defect 5
def test_numbers_are_one_answer_and_non_finite_ones_are_bad_answers():
    assert normalize_answer(2) == normalize_answer(2.0) == normalize_answer("2.0") == normalize_answer("2") == "2"
    assert normalize_answer("2.50") == normalize_answer(2.5) == "2.5"
    assert normalize_answer("10-20 minutes") == "10-20 minutes" and normalize_answer("1,000") == "1,000"
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="not a finite number"):
            normalize_answer(value)
    module = vqa_module(BAD / "vqa_rad_answers", on_error="skip")
    answers = {r.id: r.answer for split in module.records.values() for r in split}
    assert {answers[q] for q in ("int_answer", "float_answer", "text_answer")} == {"2"}
    assert answers["decimal_answer"] == answers["test_decimal"] == "2.5"
    assert sorted(module.answer_vocab.answers) == ["2", "2.5", "yes"]
    assert module.out_of_vocabulary["test"] == 0
    problems = {kind: n for report in module.scan_reports for kind, n in report.problems.items()}
    assert problems == {"bad_answer": 2, "empty_text": 1}
    with pytest.raises(DataError) as caught:
        vqa_module(BAD / "vqa_rad_answers", on_error="raise")
    assert (caught.value.kind, caught.value.record) == ("bad_answer", "nan_answer")
    assert "answer nan is not a finite number; give the answer as text" in str(caught.value)


# ------------------------------------------------------------------------------------------------ defect 6
def vqa_module(root: Path, **options) -> VQADataModule:
    defaults = {"tokenizer": "minilm", "image_size": 32, "batch_size": 4, "num_workers": 0, "validation": "val_is_test"}
    return VQADataModule("vqa_rad", str(root), **{**defaults, **options})


def test_a_question_of_invisible_characters_is_empty():
    module = vqa_module(BAD / "vqa_rad_answers", on_error="skip")
    examples = [m for report in module.scan_reports for m in report.examples.get("empty_text", [])]
    assert len(examples) == 1 and "record zero_width_question: question must be a non-empty string" in examples[0]
    assert "zero_width_question" not in {r.id for split in module.records.values() for r in split}


def test_repeated_qids_are_named_and_counted():
    with pytest.raises(DataError) as caught:
        vqa_module(BAD / "vqa_rad_same_qid", on_error="raise")
    assert (caught.value.kind, caught.value.record) == ("duplicate_qid", "0")
    assert "predictions are keyed by qid" in str(caught.value)
    module = vqa_module(BAD / "vqa_rad_same_qid", on_error="skip")
    assert [r.question for r in module.records["train"]] == ["is there a bright disc?"]
    assert sum(report.problems["duplicate_qid"] for report in module.scan_reports) == 2
    assert [r.id for r in module.records["test"]] == ["test_0"]


def test_finetune_with_no_usable_training_sample_exits_non_zero_with_the_counts(tmp_path, capsys):
    model = {"class_path": "umd_lightning.stages.FineTune", "init_args": {"preset": "tiny"}}
    data = vqa_data(BAD / "vqa_rad_all_bad", on_error="skip", validation="val_is_test")
    config = fit_config(tmp_path, model, data)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("umd: error: ") and "[empty_split]" in err
    assert "no usable sample in the train split after the set-up scan (3 records read; skipped: " in err
    assert "bad_image 2, missing_image 1" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_predictor_refuses_an_empty_question():
    model = FineTune(preset="tiny", task="vqa", num_outputs=2, labels=["yes", "no"], text_model="minilm", image_size=32)
    predictor = Predictor(UMDInferenceModel.from_stage(model))
    image = next((FIXTURES / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))
    assert len(predictor.answer(image, "is there a lesion?", top_k=2)) == 2
    for question in ("", "   ", "\u200b\u200b", None):
        with pytest.raises(ValueError, match="the question/text is empty"):
            predictor.answer(image, question)


def test_roco_line_with_a_third_column_is_a_counted_bad_line():
    dataset = RocoDataset(BAD / "roco_extra_column", "train", on_error="skip")
    assert [image.id for image in dataset.images] == ["ROCO_00021", "ROCO_00023"]
    assert dataset.images[1].texts == ("Sagittal MRI of the knee.",)  # whitespace without a tab is collapsed
    assert dict(dataset.report.problems) == {"bad_line": 1}
    (message,) = dataset.report.examples["bad_line"]
    assert "captions.txt, record line 2: 3 tab-separated columns, expected 2" in message
    with pytest.raises(DataError, match=r"record line 2: 3 tab-separated columns") as caught:
        RocoDataset(BAD / "roco_extra_column", "train", on_error="raise")
    assert caught.value.kind == "bad_line"


def test_jsonl_split_names_ignore_case_and_an_unknown_one_is_counted():
    path = BAD / "jsonl_split_case" / "data.jsonl"
    ids = {
        split: [image.id for image in JsonlDataset(path, split, on_error="skip").images]
        for split in ("train", "val", "test")
    }
    assert ids == {"train": ["upper_train", "lower_train"], "val": ["upper_val"], "test": ["spaced_test"]}
    for split in ("train", "val", "test"):
        report = JsonlDataset(path, split, on_error="skip", scan="none").report
        assert dict(report.problems) == {"unknown_split": 1}
        assert "record line 5: split 'trian' is none of train, val" in report.examples["unknown_split"][0]
    with pytest.raises(DataError) as caught:
        JsonlDataset(path, "train", on_error="raise")
    assert (caught.value.kind, caught.value.record) == ("unknown_split", "line 5")


# ------------------------------------------------------------------------------------------------ defect 7
def test_mask_ratio_image_zero_warns_once_naming_the_setting():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MRPretrain(preset="tiny", text_model="minilm", image_size=32, mask_ratio_image=0.0)
    named = [w for w in caught if "mask_ratio_image=0" in str(w.message)]
    assert len(named) == 1 and "MIM and FeaMIM are 0 at every step" in str(named[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MRPretrain(preset="tiny", text_model="minilm", image_size=32, mask_ratio_image=0.0, w_mim=0.0, w_feamim=0.0)
        MRPretrain(preset="tiny", text_model="minilm", image_size=32)
    assert not [w for w in caught if "mask_ratio_image" in str(w.message)]


def test_a_huge_gm_coord_alpha_warns_once_naming_the_setting():
    with pytest.warns(UserWarning, match=r"GMCoord alpha=1e\+09: 1 - tanh\(alpha \* rho\) is about 0") as caught:
        GMCoord(alpha=1e9)
    assert len([w for w in caught if "GMCoord alpha" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        GMCoord(alpha=0.1)
        GMCoord(alpha=10.0)
    assert not [w for w in quiet if "GMCoord alpha" in str(w.message)]


# ------------------------------------------------------------------------------------------------ defect 8
def test_damaged_and_old_format_exports_are_named_in_one_line():
    # The Hub-format checks themselves (rotated labels, changed vocabulary size, truncated weights) are in
    # test_export.py; these are folders of the earlier export format, damaged as a user's copy might be.
    for name, message in (
        ("export_truncated_weights", r"export_truncated_weights/text is missing"),
        ("export_reordered_labels", r"export_reordered_labels/text is missing"),
        ("export_broken_config", r"export_broken_config/config\.json is not valid JSON \("),
    ):
        with pytest.raises(ExportError, match=message) as caught:
            Predictor.from_export(WEIGHTS / name)
        assert one_line(str(caught.value))


def test_the_vocabulary_checksum_follows_order_not_container():
    assert vocabulary_checksum(["yes", "no"]) != vocabulary_checksum(["no", "yes"])
    assert vocabulary_checksum(["yes", "no"]) == vocabulary_checksum(("yes", "no"))
