"""Fine-tuning stage: the stage hand-off checks, the retrieval head's ITM initialisation, the task losses."""

import pytest
import torch

from umd_lightning.stages import FineTune, MRPretrain, StageError, TDCalib


def save_stage(model, path, stage: str):
    torch.save({"state_dict": model.state_dict(), "umd_stage": stage}, path)
    return path


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MRPretrain(preset="tiny", text_model="minilm")
    return model, save_stage(model, tmp_path_factory.mktemp("ckpt") / "pretrain.ckpt", "pretrain")


def test_retrieval_head_starts_from_the_itm_positive_row(pretrain_checkpoint):
    pretrained, path = pretrain_checkpoint
    model = FineTune(preset="tiny", text_model="minilm", task="retrieval")
    left_out, not_loaded = model.load_pretrained(path)
    torch.testing.assert_close(model.head.linear.weight[0], pretrained.itm_head.linear.weight[1])
    torch.testing.assert_close(model.head.linear.bias[0], pretrained.itm_head.linear.bias[1])
    for key, value in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, msg=key)
    assert any(key.startswith("teacher.") for key in left_out)
    assert not_loaded and all(key.startswith("head.") for key in not_loaded)


def test_wrong_stage_and_wrong_shapes_are_refused(pretrain_checkpoint, tmp_path):
    _, path = pretrain_checkpoint
    tuned = FineTune(preset="tiny", text_model="minilm", task="vqa", num_outputs=3, labels=["a", "b", "c"])
    finetune_path = save_stage(tuned, tmp_path / "finetune.ckpt", "finetune")
    with pytest.raises(StageError, match="is a finetune checkpoint; calib starts from pretrain or calib"):
        TDCalib(preset="tiny", text_model="minilm").load_pretrained(finetune_path)
    wider = FineTune(
        preset="tiny",
        text_model="minilm",
        task="vqa",
        num_outputs=3,
        backbone_overrides={"fusion.width": 48, "fusion.ffn": 96},
    )
    with pytest.raises(StageError, match="shape mismatches"):
        wider.load_pretrained(path)


def test_labels_must_match_num_outputs():
    with pytest.raises(StageError, match="2 labels given for num_outputs=3"):
        FineTune(preset="tiny", text_model="minilm", task="vqa", num_outputs=3, labels=["a", "b"])


def test_vqa_loss_is_bce_times_answers_and_retrieval_targets_index_zero():
    model = FineTune(preset="tiny", text_model="minilm", task="vqa", num_outputs=4)
    logits = torch.tensor([[2.0, -1.0, 0.0, 0.5]])
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    loss, target = model._loss(logits, {"targets": targets})
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) * 4
    torch.testing.assert_close(loss, expected)
    assert target.tolist() == [1]
    retrieval = FineTune(preset="tiny", text_model="minilm", task="retrieval")
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    loss, target = retrieval._loss(scores, {})
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(scores, torch.zeros(2, dtype=torch.long)))


def test_answer_vocabulary_that_differs_from_the_checkpoint_is_refused(tmp_path):
    from pathlib import Path

    import lightning.pytorch as pl

    from umd_lightning.data import VQADataModule

    root = Path(__file__).resolve().parent / "data" / "vqa_rad"
    data = VQADataModule(
        dataset="vqa_rad", root=str(root), tokenizer="minilm", image_size=32, batch_size=4, num_workers=0
    )
    wrong = [f"answer {i}" for i in range(data.num_outputs)]
    model = FineTune(preset="tiny", text_model="minilm", task="vqa", num_outputs=data.num_outputs, labels=wrong)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(StageError, match="answers/classes differ from the"):
        trainer.fit(model, datamodule=data)
