"""Pictures in TensorBoard: MIM reconstruction grids during pre-training, explanation overlays and answers
during fine-tuning, the test metrics as a table; read back from the event files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from umd_lightning.callbacks.pictures import ExplanationPictures, ReconstructionPictures, TestTable
from umd_lightning.data import PretrainDataModule, VQADataModule
from umd_lightning.stages import FineTune, MRPretrain

REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp_path: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(tmp_path), name="", version="logs"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _events(tmp_path: Path) -> EventAccumulator:
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_pretraining_logs_reconstruction_grids(tmp_path):
    pl.seed_everything(0)
    data = PretrainDataModule([{"format": "roco", "root": str(REPO / "tests/data/roco")}], image_size=32, batch_size=4)
    pictures = ReconstructionPictures(samples=3)
    _trainer(tmp_path, [pictures]).fit(MRPretrain(preset="tiny"), datamodule=data)
    events = _events(tmp_path)
    assert "pictures/mim" in events.Tags()["images"]
    image = events.Images("pictures/mim")[-1]
    n = pictures.batch["pixel_values"].shape[0]  # the fixture's first validation batch may hold fewer than 3
    # per sample one row of (original, masked, reconstructed), 32 px each with 2 px padding
    assert (image.height, image.width) == (n * 34 + 2, 3 * 34 + 2)
    # the reconstruction keeps the visible patches and differs from the original where patches were hidden
    model = MRPretrain(preset="tiny")
    views = pictures.reconstruct(model, pictures.batch).view(n, 3, 3, 32, 32)
    original, masked, rebuilt = views[:, 0], views[:, 1], views[:, 2]
    same = (original - rebuilt).abs().amax(1) < 1e-5
    assert same.any() and not same.all()
    assert torch.equal(same, (original - masked).abs().amax(1) < 1e-5)


@pytest.mark.slow
def test_finetuning_logs_explanations_answers_and_the_test_table(tmp_path):
    pl.seed_everything(0)
    root = str(REPO / "tests/data/vqa_rad")
    data = VQADataModule(dataset="vqa_rad", root=root, image_size=32, batch_size=4, num_workers=0, scan="none")
    trainer = _trainer(tmp_path, [ExplanationPictures(samples=2), TestTable()])
    model = FineTune(preset="tiny", lr=1e-3)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    events = _events(tmp_path)
    image = events.Images("pictures/explain")[-1]
    assert (image.height, image.width) == (2 * 34 + 2, 3 * 34 + 2)  # 2 samples x (image, rollout, gradcam)
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    answers = next(v for k, v in texts.items() if k.startswith("pictures/answers"))
    assert "| predicted |" in answers and answers.count("\n| ") >= 3
    texts = {tag.removesuffix("/text_summary"): text for tag, text in texts.items()}
    table = texts["tables/test"]
    assert "| overall |" in table and "| open |" in table and "| closed |" in table and "type/" not in table
    # One row per question type of the fixture's test split, with its question count read from the JSON here.
    released = json.loads((Path(root) / "VQA_RAD Dataset Public.json").read_text())
    counts = Counter(r["question_type"] for r in released if r["phrase_type"].startswith("test_"))
    by_type = texts["tables/test_question_types"].splitlines()
    assert by_type[0] == "| question type | questions | accuracy |"
    assert [line.split(" | ")[:2] for line in by_type[2:]] == [[f"| {k}", str(n)] for k, n in sorted(counts.items())]
