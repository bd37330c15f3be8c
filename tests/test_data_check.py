"""``umd data check``: clean fixtures exit 0, the bad-input corpus lists its problems and exits 1, configuration
mistakes exit 2 with one line; the real MedPix copy passes a header scan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from umd_lightning.data.check import main

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "data"
BAD = FIXTURES / "bad"
REPO = TESTS.parent


def write_config(tmp_path: Path, class_path: str, init_args: dict | None = None, **more) -> Path:
    """A stage YAML whose model section the check must ignore."""
    init_args = {**(init_args or {}), **more}
    path = tmp_path / "config.yaml"
    config = {
        "seed_everything": 0,
        "model": {"class_path": "umd_lightning.stages.FineTune", "init_args": {"preset": "tiny"}},
        "data": {"class_path": class_path, "init_args": init_args},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def check(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


CLEAN = {
    "vqa_rad": ("umd_lightning.data.VQADataModule", {"dataset": "vqa_rad", "root": str(FIXTURES / "vqa_rad")}),
    "slake": (
        "umd_lightning.data.VQADataModule",
        {"dataset": "slake", "root": str(FIXTURES / "slake"), "validation": "official"},
    ),
    "vqa_med_2019": (
        "umd_lightning.data.VQADataModule",
        {"dataset": "vqa_med_2019", "root": str(FIXTURES / "vqa_med_2019"), "validation": "official"},
    ),
    "melinda": (
        "umd_lightning.data.ClassificationDataModule",
        {"dataset": "melinda", "root": str(FIXTURES / "melinda")},
    ),
    "roco_retrieval": (
        "umd_lightning.data.RetrievalDataModule",
        {"dataset": "roco", "root": str(FIXTURES / "roco"), "mode": "calib"},
    ),
    "pretrain": (
        "umd_lightning.data.PretrainDataModule",
        {
            "sources": [
                {"format": "roco", "root": str(FIXTURES / "roco")},
                {"format": "medicat", "root": str(FIXTURES / "medicat")},
                {"format": "mimic_cxr", "root": str(FIXTURES / "mimic_cxr")},
                {"format": "jsonl", "root": str(FIXTURES / "jsonl" / "data.jsonl")},
            ]
        },
    ),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_fixtures_exit_0(tmp_path, capsys, name):
    code, out, _ = check(capsys, "--config", str(write_config(tmp_path, *CLEAN[name])))
    assert code == 0, out
    assert out.rstrip().endswith("result: no problems -> exit 0")
    assert all(f"\n{split}: " in out for split in ("train", "val", "test"))
    assert " 0 problem(s)" in out and "kept" in out


def test_clean_vqa_rad_counts(tmp_path, capsys):
    config = write_config(tmp_path, *CLEAN["vqa_rad"])
    code, out, _ = check(capsys, "--config", str(config))
    assert code == 0
    # 63 questions on 12 images: 47 train (9 images), 5 held out for validation (1 image), 11 test (2 images).
    assert "annotations: 63 records read, 0 problem(s)" in out
    assert "train: 47 records read, 9 images decoded, 0 problem(s)" in out
    assert "val: 5 records read, 1 images decoded, 0 problem(s)" in out
    assert "test: 11 records read, 2 images decoded, 0 problem(s)" in out
    assert "1 answer(s) outside the train vocabulary of 15 (scored wrong)" in out


def test_filters_are_listed_but_are_not_problems(tmp_path, capsys):
    config = write_config(tmp_path, *CLEAN["pretrain"])
    code, out, _ = check(capsys, "--config", str(config), "--split", "train")
    assert code == 0
    assert "left out by filters (not errors): short_caption" in out
    assert "other_view" in out  # MIMIC-CXR lateral views


def test_bad_vqa_rad_lists_every_problem_and_exits_1(tmp_path, capsys):
    # on_error: raise in the YAML is overridden: the check counts everything instead of stopping at the first.
    config = write_config(
        tmp_path, "umd_lightning.data.VQADataModule", dataset="vqa_rad", root=str(BAD / "vqa_rad"), on_error="raise"
    )
    code, out, _ = check(capsys, "--config", str(config))
    assert code == 1
    assert out.rstrip().endswith(
        "result: 8 problem(s): bad_image 2, empty_text 2, image_too_large 1, missing_image 1, unsafe_path 2 -> exit 1"
    )
    for qid in ("truncated_jpeg", "zero_byte_file", "decompression_bomb", "missing_image", "dotdot_path"):
        assert f"record {qid}:" in out
    for qid in ("absolute_path", "empty_question", "nonstring_question"):
        assert f"record {qid}:" in out
    assert "1 answer(s) outside the train vocabulary of 4 (scored wrong)" in out


def test_header_scan_misses_only_the_truncated_jpeg(tmp_path, capsys):
    config = write_config(tmp_path, "umd_lightning.data.VQADataModule", dataset="vqa_rad", root=str(BAD / "vqa_rad"))
    code, out, _ = check(capsys, "--config", str(config), "--scan", "header")
    assert code == 1
    assert "image headers checked" in out and "record truncated_jpeg" not in out
    assert "7 problem(s): bad_image 1, empty_text 2, image_too_large 1" in out


def test_bad_pretrain_sources_are_reported_source_by_source(tmp_path, capsys):
    sources = [
        {"format": "roco", "root": str(BAD / "roco"), "options": {"on_error": "raise"}},
        {"format": "jsonl", "root": str(BAD / "jsonl" / "data.jsonl")},
    ]
    config = write_config(tmp_path, "umd_lightning.data.PretrainDataModule", sources=sources)
    code, out, _ = check(capsys, "--config", str(config), "--split", "train,val")
    assert code == 1
    # ROCO_00002's caption holds a second tab: a third column, refused as bad_line (not glued onto the caption).
    assert "train: 17 records read, 8 images decoded, 12 problem(s)" in out
    assert "  roco/train: 10 records read, 2 kept" in out and "  jsonl/data/train: 7 records read, 2 kept" in out
    assert "\ntest:" not in out
    assert out.rstrip().endswith(
        "result: 13 problem(s): bad_image 2, bad_json 2, bad_line 2, empty_text 3, image_too_large 1, "
        "missing_image 1, unsafe_path 2 -> exit 1"
    )


@pytest.mark.parametrize(
    ("folder", "class_path", "dataset", "message"),
    [
        ("vqa_rad_not_a_list", "umd_lightning.data.VQADataModule", "vqa_rad", "expected a JSON list of records"),
        (
            "melinda_missing_column",
            "umd_lightning.data.ClassificationDataModule",
            "melinda",
            "train.csv: missing column(s) ['caption']",
        ),
    ],
)
def test_unreadable_annotation_file_is_a_problem(tmp_path, capsys, folder, class_path, dataset, message):
    config = write_config(tmp_path, class_path, dataset=dataset, root=str(BAD / folder))
    code, out, _ = check(capsys, "--config", str(config))
    assert code == 1
    assert "annotations: cannot be read: " in out and message in out


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        (None, (), "cannot read"),
        ("data: [unclosed", (), "is not valid YAML"),
        ("model: {}\n", (), "has no 'data:' section with a class_path"),
        ({"class_path": "umd_lightning.data.Nope"}, (), "has no attribute 'Nope'"),
        ({"class_path": "umd_lightning.data.VQADataModule", "init_args": {"dataset": "coco", "root": "x"}}, (), "coco"),
        (
            {"class_path": "umd_lightning.data.VQADataModule", "init_args": {"dataset": "vqa_rad", "root": "/nowhere"}},
            (),
            "missing annotation file(s)",
        ),
        (
            {
                "class_path": "umd_lightning.data.ClassificationDataModule",
                "init_args": {"dataset": "melinda", "root": str(BAD / "melinda"), "label_column": "modality"},
            },
            (),
            "unknown label column 'modality'; valid columns are",
        ),
        (
            {"class_path": "umd_lightning.data.VQADataModule", "init_args": {"dataset": "vqa_rad", "root": "x"}},
            ("--split", "train,dev"),
            "--split takes a comma-separated subset of train,val,test",
        ),
        (
            {"class_path": "umd_lightning.data.PackedPretrainDataModule", "init_args": {"pack": "packs/x"}},
            (),
            "reads the pack packs/x, which umd data pack checked when it wrote it",
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_line(tmp_path, capsys, content, argv, message):
    path = tmp_path / "config.yaml"
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump({"data": content}))
    elif isinstance(content, str):
        path.write_text(content)
    code, _, err = check(capsys, "--config", str(path), *argv)
    assert code == 2
    assert err.startswith("umd data check: error: ") and message in err
    assert err.count("\n") == 1


def test_umd_command_runs_the_check(tmp_path, capsys):
    from umd_lightning.cli import main as umd

    config = write_config(tmp_path, *CLEAN["melinda"])
    with pytest.raises(SystemExit) as exit_:
        umd(["data", "check", "--config", str(config), "--split", "test", "--scan", "header"])
    assert exit_.value.code == 0
    assert "test: 1 records read, 1 image headers checked, 0 problem(s)" in capsys.readouterr().out


@pytest.mark.real_data
def test_real_medpix_header_scan_of_one_split(shared_data, capsys, monkeypatch):
    if not (shared_data / "medpix_2_0" / "MedPix-2-0" / "splitted_dataset").is_dir():
        pytest.skip("the MedPix 2.0 copy is absent")
    monkeypatch.chdir(REPO)  # the config's root is relative to the repository
    code, out, _ = check(capsys, "--config", "configs/pretrain/medpix.yaml", "--scan", "header", "--split", "test")
    assert code == 0, out
    # One test image is a VQA-RAD image, left out by the config's default (not a problem).
    assert "test: 200 records read, 199 image headers checked, 0 problem(s)" in out
    assert "left out by filters (not errors): excluded 1" in out


def test_data_overrides_apply_as_in_fit(capsys):
    # The shipped config points at ../shared/data; --data.* moves it onto the fixture, as `umd fit` would.
    config = str(REPO / "configs" / "finetune" / "vqa_rad.yaml")
    root = str(TESTS / "data" / "vqa_rad")
    assert main(["--config", config, "--split", "train", "--data.init_args.root", root, "--data.image_size", "32"]) == 0
    assert "train: 47 records read" in capsys.readouterr().out
    assert main(["--config", config, "--data.init_args.root", "/nonexistent/vqa_rad"]) == 2
    assert "/nonexistent/vqa_rad" in capsys.readouterr().err
    assert main(["--config", config, "--trainer.max_steps", "3"]) == 2
    assert "only --data.* overrides are taken" in capsys.readouterr().err
