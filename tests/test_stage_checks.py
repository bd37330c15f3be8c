"""What the pipeline checks before any step runs, and what passes between stages.

- a checkpoint of another stage than the configured model (``--ckpt_path``) is refused in one line;
- ``--ckpt_path last`` with nothing to resume, and a fresh ``fit`` over an earlier run's checkpoints, are refused;
- ``pretrained:`` may name a stage folder holding exactly one run;
- settings the model cannot run are refused when the objects are built, naming the option and its range;
- position embeddings are resampled at a hand-off across image sizes, and only they;
- the ITM head passes through TD-Calib untouched to the retrieval head;
- no configuration leaves a trainable parameter without a gradient (what DDP would wait for);
- one ``seed_everything`` drives the data order, the text and patch masks and the ITM swaps;
- leaky evaluation policies are named wherever results are printed or saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from test_cli import fixture_data, pretrain_config, tiny_model, write_config
from timm.layers import resample_abs_pos_embed

from umd_lightning.cli import main
from umd_lightning.data import PretrainDataModule, SourceSpec, VQADataModule
from umd_lightning.data.collate import PretrainCollator
from umd_lightning.errors import ConfigError
from umd_lightning.models.masking import random_masking
from umd_lightning.models.text import load_tokenizer
from umd_lightning.runs import resolve_pretrained
from umd_lightning.stages import FineTune, MRPretrain, StageError, TDCalib

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"


def fails_with(capsys, args: list[str], message: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert message in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("umd: error:")]
    assert len(lines) == 1
    return lines[0]


def fake_checkpoint(path: Path, stage: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "umd_stage": stage, "global_step": 0}, path)
    return path


def finetune_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "finetune.yaml",
        tiny_model("umd_lightning.stages.FineTune", head_lr_mult=5.0),
        fixture_data("umd_lightning.data.VQADataModule", dataset="vqa_rad", root=str(FIXTURES / "vqa_rad")),
        trainer={"max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None},
        checkpoint={"monitor": "val/overall", "mode": "max"},
    )


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_stage_is_refused_before_anything_runs(tmp_path, capsys):
    config = pretrain_config(tmp_path)
    tuned = fake_checkpoint(tmp_path / "tuned.ckpt", "finetune")
    fails_with(
        capsys,
        ["fit", "--config", str(config), "--ckpt_path", str(tuned)],
        "is a finetune checkpoint but this config's model is MRPretrain (pretrain)",
    )
    pretrained = fake_checkpoint(tmp_path / "pretrained.ckpt", "pretrain")
    fails_with(
        capsys,
        ["test", "--config", str(finetune_config(tmp_path)), "--ckpt_path", str(pretrained)],
        "is a pretrain checkpoint but this config's model is FineTune (finetune)",
    )


def test_resume_with_nothing_to_resume_and_a_fresh_fit_over_checkpoints_are_refused(tmp_path, capsys):
    config = pretrain_config(tmp_path)
    fails_with(capsys, ["fit", "--config", str(config), "--ckpt_path", "last"], "nothing to resume in")
    folder = tmp_path / "pretrain" / "checkpoints"
    fake_checkpoint(folder / "last.ckpt", "pretrain")
    fails_with(capsys, ["fit", "--config", str(config)], "already holds checkpoints of an earlier run (last.ckpt)")


def test_a_stage_folder_resolves_to_its_one_run(tmp_path):
    stage = tmp_path / "runs" / "pretrain"
    with pytest.raises(ConfigError, match="pretrained checkpoint not found"):
        resolve_pretrained(stage)
    roco = fake_checkpoint(stage / "roco" / "last.ckpt", "pretrain")
    assert resolve_pretrained(stage) == roco
    fake_checkpoint(stage / "medpix" / "last.ckpt", "pretrain")
    with pytest.raises(ConfigError, match=r"holds 2 runs .*medpix/last\.ckpt.*roco/last\.ckpt"):
        resolve_pretrained(stage)
    best = fake_checkpoint(tmp_path / "runs" / "calib" / "vqa_rad" / "best.ckpt", "calib")
    fake_checkpoint(best.parent / "last.ckpt", "calib")
    assert resolve_pretrained(best.parent) == best  # a run hands on its best checkpoint


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.init_args.image_size", "30"], "image_size=30 must be a positive multiple of the vision tower's"),
        (["--model.init_args.mask_ratio_image", "1.0"], "model.init_args.mask_ratio_image=1.0 is outside its valid"),
        (["--data.init_args.mask_ratio_text", "-0.1"], "data.init_args.mask_ratio_text=-0.1 is outside its valid"),
        (["--data.init_args.batch_size", "0"], "data.init_args.batch_size=0 is outside its valid range [1, inf)"),
        (["--data.init_args.num_workers", "-1"], "data.init_args.num_workers=-1 is outside its valid range [0"),
        (["--data.init_args.max_text_length", "600"], "max_text_length=600 exceeds the text tower's 512 positions"),
        (["--data.init_args.batch_size", "64"], "fewer than data.init_args.batch_size=64"),
        (["--model.init_args.lr", "0"], "model.init_args.lr=0.0 is outside its valid range (0.0, inf)"),
    ],
    ids=[
        "image_size",
        "mask_ratio_image",
        "mask_ratio_text",
        "batch_size",
        "num_workers",
        "text_length",
        "split",
        "lr",
    ],
)
def test_settings_the_model_cannot_run_are_refused_in_one_line(tmp_path, capsys, override, message):
    fails_with(capsys, ["fit", "--config", str(pretrain_config(tmp_path)), *override], message)


def test_downstream_and_gm_coord_settings_are_refused_in_one_line(tmp_path, capsys):
    config = finetune_config(tmp_path)
    fails_with(
        capsys,
        ["fit", "--config", str(config), "--data.init_args.val_fraction", "0"],
        "data.init_args.val_fraction=0.0 is outside its valid range (0.0, 1.0)",
    )
    gm = '{"class_path": "umd_lightning.callbacks.GMCoord", "init_args": {"alpha": -1}}'
    fails_with(capsys, ["fit", "--config", str(config), f"--trainer.callbacks+={gm}"], "GMCoord alpha=-1")


# ----------------------------------------------------------------------------------------------- hand-off
def save_stage(model, path: Path, stage: str) -> Path:
    torch.save({"state_dict": model.state_dict(), "umd_stage": stage}, path)
    return path


def test_position_embeddings_are_resampled_across_image_sizes_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    pretrained = MRPretrain(preset="tiny", text_model="minilm", image_size=24)
    path = save_stage(pretrained, tmp_path / "pretrain.ckpt", "pretrain")
    calib = TDCalib(preset="tiny", text_model="minilm", image_size=32)
    calib.load_pretrained(path)
    source = pretrained.backbone.vision.vit.pos_embed.detach()
    expected = resample_abs_pos_embed(source, new_size=[4, 4], old_size=[3, 3], num_prefix_tokens=1)
    assert calib.backbone.vision.vit.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(calib.backbone.vision.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(calib.backbone.vision.vit.pos_embed[:, 0], source[:, 0])  # class token as is
    for name, value in pretrained.backbone.state_dict().items():
        if not name.endswith("pos_embed"):
            torch.testing.assert_close(calib.backbone.state_dict()[name], value, msg=name)
    wider = TDCalib(preset="tiny", text_model="minilm", image_size=32, backbone_overrides={"fusion.ffn": 96})
    with pytest.raises(StageError, match="shape mismatches"):
        wider.load_pretrained(path)


def test_the_itm_head_passes_through_td_calib_to_the_retrieval_head(tmp_path, caplog):
    torch.manual_seed(0)
    pretrained = MRPretrain(preset="tiny", text_model="minilm")
    calib = TDCalib(preset="tiny", text_model="minilm")
    calib.load_pretrained(save_stage(pretrained, tmp_path / "pretrain.ckpt", "pretrain"))
    torch.testing.assert_close(calib.itm_head.linear.weight, pretrained.itm_head.linear.weight)
    # Frozen (w_itm = 0): the optimiser never sees it, so it leaves TD-Calib untouched.
    frozen = {id(p) for p in calib.itm_head.parameters()} | {id(p) for p in calib.backbone.text_pooler.parameters()}
    assert all(not p.requires_grad for p in calib.itm_head.parameters())
    assert not frozen & {id(p) for group in calib.parameter_groups() for p in group["params"]}

    retrieval = FineTune(preset="tiny", text_model="minilm", task="retrieval")
    retrieval.load_pretrained(save_stage(calib, tmp_path / "calib.ckpt", "calib"))
    torch.testing.assert_close(retrieval.head.linear.weight[0], pretrained.itm_head.linear.weight[1])

    no_itm = MRPretrain(preset="tiny", text_model="minilm", w_itm=0.0)
    with pytest.warns(UserWarning, match="has no itm_head: it starts from a fresh initialisation"):
        TDCalib(preset="tiny", text_model="minilm").load_pretrained(save_stage(no_itm, tmp_path / "x.ckpt", "pretrain"))


# ----------------------------------------------------------------------------------------------- gradients
def pair_batch(image_size: int = 32) -> dict:
    tokenizer = load_tokenizer("minilm")
    collate = PretrainCollator(tokenizer, max_length=16, mask_ratio_text=0.5, seed=0)
    texts = ["a bright circle in the left lung", "two dim squares near the spine", "no lesion", "one round mass"]
    torch.manual_seed(0)
    return collate(
        [{"image": torch.randn(3, image_size, image_size), "text": t, "id": str(i)} for i, t in enumerate(texts)]
    )


@pytest.mark.parametrize(
    ("stage", "options"),
    [
        (MRPretrain, {}),
        (MRPretrain, {"feature_loss": "reference"}),
        (MRPretrain, {"mask_mode": "separate"}),
        (MRPretrain, {"feature_loss": "reference", "mask_mode": "separate"}),
        (MRPretrain, {"w_itm": 0.0, "backbone_overrides": {"decoder.mim_layer": 1}}),
        (TDCalib, {}),
        (TDCalib, {"feature_loss": "reference"}),
        (TDCalib, {"w_mim": 0.0, "w_feamim": 0.0}),
    ],
    ids=[
        "pretrain",
        "pretrain-reference",
        "pretrain-separate",
        "pretrain-reference-separate",
        "pretrain-no-itm-mim-layer-1",
        "calib",
        "calib-reference",
        "calib-text-only",
    ],
)
def test_every_trainable_parameter_gets_a_gradient(stage, options):
    """What DDP needs without ``find_unused_parameters``: a parameter no loss reaches is frozen, not left waiting."""
    torch.manual_seed(0)
    model = stage(preset="tiny", text_model="minilm", **options)
    model.train()
    terms, _ = model.reconstruction_losses(pair_batch())
    terms["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert any(p.requires_grad for p in model.backbone.parameters())


# ----------------------------------------------------------------------------------------------- seeds
def first_batches(seed: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What the loop sees for two batches: ids, text masks, and the draws of the step after each fetch (patch
    masks and ITM swaps come from the global RNG the loader seeds)."""
    seed_everything(seed)
    data = PretrainDataModule(
        [SourceSpec("roco", str(FIXTURES / "roco"))], image_size=32, batch_size=2, num_workers=0, scan="none"
    )
    data.setup("fit")
    seen = []
    for batch, _ in zip(data.train_dataloader(), range(2)):
        keep, _mask = random_masking(2, 16, 0.75, torch.device("cpu"))
        swap = torch.rand(2)
        seen.append((batch["ids"], batch["mlm_labels"], keep, swap))
    return seen


def same(a, b) -> bool:
    return all(x[0] == y[0] and all(torch.equal(u, v) for u, v in zip(x[1:], y[1:])) for x, y in zip(a, b))


def test_one_seed_drives_the_data_order_masks_and_negatives():
    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    assert same(first, again)
    assert [ids for ids, *_ in first] != [ids for ids, *_ in other]
    for (_, _, keep_a, swap_a), (_, _, keep_b, swap_b) in zip(first, other):
        assert not torch.equal(keep_a, keep_b) and not torch.equal(swap_a, swap_b)


def test_an_explicit_data_seed_wins_over_the_run_seed():
    seed_everything(3)
    module = VQADataModule("vqa_rad", str(FIXTURES / "vqa_rad"), image_size=32, num_workers=0, seed=7)
    loader = module._loader("train", dataset=list(range(10)))
    assert loader.seed == 7
    seed_everything(4)
    assert (
        VQADataModule("vqa_rad", str(FIXTURES / "vqa_rad"), num_workers=0)._loader("train", list(range(10))).seed == 4
    )


# ----------------------------------------------------------------------------------------------- SLAKE, leaks
def slake_copy(tmp_path: Path, extra: list[dict]) -> Path:
    import shutil

    root = tmp_path / "slake"
    shutil.copytree(FIXTURES / "slake", root)
    train = json.loads((root / "train.json").read_text())
    template = next(r for r in train if r["q_lang"] == "en")
    train += [{**template, **record} for record in extra]
    (root / "train.json").write_text(json.dumps(train))
    return root


def test_slake_empty_answer_is_skipped_and_counted_by_the_shipped_configs(tmp_path):
    import yaml

    root = slake_copy(
        tmp_path,
        [{"qid": 1622, "answer": ""}, {"qid": 9001, "q_lang": "EN", "answer": "Yes"}, {"qid": 9002, "q_lang": "zh"}],
    )
    shipped = yaml.safe_load((REPO / "configs" / "finetune" / "slake.yaml").read_text())["data"]["init_args"]
    assert shipped["skip_empty_answers"] is True
    options = {k: v for k, v in shipped.items() if k in ("dataset", "validation", "language", "skip_empty_answers")}
    module = VQADataModule(root=str(root), tokenizer="minilm", num_workers=0, **options)
    report = next(r for r in module.scan_reports if r.name == "slake/train")
    assert report.problems["empty_answer"] == 1 and "record 1622" in report.examples["empty_answer"][0]
    assert "9001" in {r.id for r in module.records["train"] + module.records["val"]}  # "EN" is English
    with pytest.raises(Exception, match=r"record 1622: answer '' is empty after normalisation \[empty_answer\]"):
        VQADataModule(root=str(root), tokenizer="minilm", num_workers=0, **{**options, "skip_empty_answers": False})

    missing = slake_copy(tmp_path / "missing", [{"qid": 9003, "q_lang": None}])
    with pytest.raises(Exception, match=r"record 9003: q_lang must be a language code, got None \[missing_field\]"):
        VQADataModule("slake", str(missing), validation="official", num_workers=0)


@pytest.mark.slow
def test_leaky_policies_are_named_in_test_output_results_and_predictions(tmp_path, capsys):
    config = finetune_config(tmp_path)
    leaky = ["--data.init_args.vocab", "all_splits", "--data.init_args.validation", "val_is_test"]
    main(["fit", "--config", str(config), *leaky])
    main(["test", "--config", str(config), *leaky, "--ckpt_path", "best"])
    out = capsys.readouterr().out
    assert "test evaluation: LEAKY: vocabulary built from all splits including test; validation is the test set" in out
    results = json.loads((tmp_path / "finetune" / "checkpoints" / "test_results.json").read_text())
    assert results["leaky"] and results["metrics"]["test/n"] == 11
    predictions = tmp_path / "predictions.jsonl"
    main(["predict", "--config", str(config), *leaky, "--ckpt_path", "best", "--predictions.output", str(predictions)])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows and all(row["leaky"] and "validation is the test set" in row["leak_notes"] for row in rows)


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    import os

    from umd_lightning.cli import UMDCLI

    folder = tmp_path / "runs" / "pretrain" / "roco"
    assert UMDCLI._resume_candidate(folder) is None
    older = fake_checkpoint(folder / "epoch=0-step=4.ckpt", "pretrain")
    newer = fake_checkpoint(folder / "epoch=1-step=8.ckpt", "pretrain")
    os.utime(older, (1, 1))
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 torn by a full disk")
    with pytest.warns(UserWarning, match=r"last\.ckpt is missing or unreadable: resuming from .*epoch=1-step=8\.ckpt"):
        assert UMDCLI._resume_candidate(folder) == newer
    last = fake_checkpoint(folder / "last.ckpt", "pretrain")
    assert UMDCLI._resume_candidate(folder) == last
    hpc = fake_checkpoint(folder / "hpc_ckpt_2.ckpt", "pretrain")  # written by Lightning's SLURM requeue
    os.utime(last, (1, 1))
    assert UMDCLI._resume_candidate(folder) == hpc


def test_predictor_settings_are_checked():
    from umd_lightning.hub import UMDInferenceModel
    from umd_lightning.predict import Predictor

    model = FineTune(preset="tiny", task="vqa", num_outputs=2, labels=["yes", "no"], text_model="minilm", image_size=32)
    inference = UMDInferenceModel.from_stage(model)
    with pytest.raises(ConfigError, match=r"Predictor max_length=600 is outside its valid range \[1, 512\]"):
        Predictor(inference, max_length=600)
    image = next((FIXTURES / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))
    with pytest.raises(ConfigError, match=r"top_k=0 is outside its valid range \[1, inf\)"):
        Predictor(inference).answer(image, "is there a lesion?", top_k=0)
