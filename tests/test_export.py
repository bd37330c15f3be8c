"""Safe loading and export: pickled objects are refused unless allowed explicitly, and a fine-tuned checkpoint
exported as a Hub-ready folder (``PyTorchModelHubMixin``) predicts exactly like the checkpoint itself; a tampered
folder fails with one line naming the file."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umd_lightning.checkpointing import TRUST_PICKLE_ENV, UntrustedPickleError, read_weights
from umd_lightning.export import export_model
from umd_lightning.hub import ExportError, UMDInferenceModel
from umd_lightning.predict import Predictor
from umd_lightning.stages import StageError
from umd_lightning.stages.base import load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
VQA_RAD = REPO / "tests" / "data" / "vqa_rad"


class Opaque:
    """A custom class: only full unpickling can restore it."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.fixture()
def pickled_file(tmp_path: Path) -> Path:
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Opaque(3)}, path)
    return path


def test_pickled_objects_are_refused_with_the_way_to_allow_them(
    pickled_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(UntrustedPickleError, match=f"{TRUST_PICKLE_ENV}=1") as caught:
        read_weights(pickled_file)
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(StageError, match="trust_pickle=True"):
        load_checkpoint_file(pickled_file)
    with pytest.raises(UntrustedPickleError):
        read_weights(pickled_file, trust_pickle=False)


def test_pickle_opt_in_by_argument_or_environment(pickled_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    assert read_weights(pickled_file, trust_pickle=True)["extra"].value == 3
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    assert read_weights(pickled_file)["extra"].value == 3
    assert load_checkpoint_file(pickled_file)["extra"].value == 3
    # An explicit False wins over the environment.
    with pytest.raises(UntrustedPickleError):
        read_weights(pickled_file, trust_pickle=False)


def test_plain_tensor_files_need_no_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "step": 4}, tmp_path / "plain.ckpt")
    assert torch.equal(read_weights(tmp_path / "plain.ckpt")["state_dict"]["w"], torch.arange(3.0))


@pytest.fixture(scope="module")
def finetuned_checkpoint(tiny_vqa_checkpoint: Path) -> Path:
    """A VQA model fine-tuned for 3 steps on the fixture, saved by Lightning (shared with the other tests)."""
    return tiny_vqa_checkpoint


def test_export_predicts_like_the_checkpoint(finetuned_checkpoint: Path, tmp_path: Path) -> None:
    out = export_model(finetuned_checkpoint, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "umd_lightning.hub/1" and config["task"] == "vqa"
    assert config["backbone"]["image_size"] == 32 and config["max_text_length"] == 32
    assert config["backbone"]["text"]["name_or_path"] == "text" and (out / "text" / "tokenizer.json").is_file()
    assert len(config["labels"]) > 1 and config["card"]["dataset"] == "vqa_rad"
    card = (out / "README.md").read_text()
    assert "vqa_rad" in card and "model_hub_mixin" in card and "vocabulary policy `train`" in card
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "text"]

    checkpoint = torch.load(finetuned_checkpoint, map_location="cpu", weights_only=True)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == {k for k in checkpoint["state_dict"] if k.startswith(("backbone.", "head."))}
    for name, value in tensors.items():
        assert torch.equal(checkpoint["state_dict"][name], value), name

    from_ckpt, from_export = Predictor.from_checkpoint(finetuned_checkpoint), Predictor.from_export(out)
    assert from_export.max_length == from_ckpt.max_length == 32
    images = sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[:3]
    questions = ["is there a lesion?", "where is the bright shape located in the image?", "how many shapes?"]
    for image, question in zip(images, questions):
        expected, got = from_ckpt.answer(image, question), from_export.answer(image, question)
        assert got == expected


def test_mixin_save_load_gives_identical_answers(finetuned_checkpoint: Path, tmp_path: Path) -> None:
    model = UMDInferenceModel.from_checkpoint(finetuned_checkpoint)
    model.save_pretrained(tmp_path / "saved")
    loaded = UMDInferenceModel.from_pretrained(str(tmp_path / "saved"))
    assert loaded.labels == model.labels and loaded.task == "vqa"
    pixels = torch.rand(2, 3, 32, 32)
    tokens = model.tokenizer(["is there a lesion?", "how many shapes?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        got = loaded(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(expected, got)


def _rotate_labels(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["labels"] = config["labels"][1:] + config["labels"][:1]
    (folder / "config.json").write_text(json.dumps(config))


def _drop_label(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["labels"] = config["labels"][:-1]
    (folder / "config.json").write_text(json.dumps(config))


def _truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _old_format(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["format"] = "umd_lightning.export/1"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("tamper", "file"),
    [
        (_rotate_labels, "config.json"),
        (_drop_label, "config.json"),
        (_truncate_weights, "model.safetensors"),
        (_old_format, "config.json"),
    ],
)
def test_a_tampered_export_fails_with_one_line_naming_the_file(
    finetuned_checkpoint: Path, tmp_path: Path, tamper, file: str
) -> None:
    out = export_model(finetuned_checkpoint, tmp_path / "export")
    tamper(out)
    with pytest.raises(ExportError) as caught:
        Predictor.from_export(out)
    message = str(caught.value)
    assert file in message and "\n" not in message, message


def test_export_loads_with_no_unpickling(
    finetuned_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = export_model(finetuned_checkpoint, tmp_path / "export")

    def no_pickle(*args, **kwargs):
        raise AssertionError("the export must load without torch.load / pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    predictor = Predictor.from_export(out)
    assert predictor.answer(sorted((VQA_RAD / "VQA_RAD Image Folder").iterdir())[0], "is there a lesion?")


def test_export_command_line(finetuned_checkpoint: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "umd_lightning.export", str(finetuned_checkpoint), str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "text").is_dir()
    assert (tmp_path / "cli" / "README.md").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "umd_lightning.export", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr
