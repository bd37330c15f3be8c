"""Parity with the authors' code: the reference-parity fixture (a tiny model of helenypzhang/UMD, its batch and
its own outputs) is converted with ``umd convert`` and every saved output is recomputed by our model, in eval
mode and fp32, to 1e-5. Negative controls show the comparison fails for a wrong activation, norm placement,
pooling or key mapping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from umd_lightning import losses
from umd_lightning.callbacks.gm_coord import coefficients, scores, unimodal_logits
from umd_lightning.convert import ConversionError, ReferenceSizes, convert_checkpoint, map_key
from umd_lightning.models.masking import normalized_pixel_targets, patchify
from umd_lightning.stages import FineTune, MRPretrain
from umd_lightning.stages import reconstruction as reconstruction_module

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / ".." / "shared" / "fixtures" / "reference_parity"
TOLERANCE = 1e-5
PATCH = 16

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/reference_parity is absent")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's RoBERTa config as a local folder: the converter reads the text tower's sizes from it."""
    folder = tmp_path_factory.mktemp("roberta_tiny")
    config = json.loads((FIXTURE / "reference_config.json").read_text())["text_tower_hf_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, text_folder: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    pretrain, _ = convert_checkpoint(
        FIXTURE / "pretrain.ckpt", out / "pretrain.ckpt", text_model=str(text_folder), sizes=ReferenceSizes(2)
    )
    finetune, _ = convert_checkpoint(
        FIXTURE / "finetune_vqa_state_dict.safetensors",
        out / "finetune.ckpt",
        text_model=str(text_folder),
        sizes=ReferenceSizes(vision_heads=2, fusion_heads=2, decoder_heads=2),
    )
    return {"pretrain": pretrain, "finetune": finetune}


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    return load_file(str(FIXTURE / "inputs.safetensors"))


@pytest.fixture(scope="module")
def reference() -> dict[str, Tensor]:
    return load_file(str(FIXTURE / "outputs.safetensors"))


def load_stage(path: Path, overrides: dict | None = None):
    """The converted checkpoint as our stage module, in eval mode; ``overrides`` change backbone fields."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = dict(checkpoint["hyper_parameters"])
    kwargs["backbone_overrides"] = {**kwargs["backbone_overrides"], **(overrides or {})}
    stage = (FineTune if checkpoint["umd_stage"] == "finetune" else MRPretrain)(**kwargs)
    stage.load_state_dict(checkpoint["state_dict"], strict=True)
    return stage.eval()


class Recorder:
    """Forward hooks that keep a copy of what named submodules take in or give out."""

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}
        self.handles: list = []

    def output(self, name: str, module: nn.Module) -> None:
        def hook(_module, _args, result):
            self.values[name] = (result[0] if isinstance(result, tuple) else result).detach().clone()

        self.handles.append(module.register_forward_hook(hook))

    def input(self, name: str, module: nn.Module, index: int = 0) -> None:
        def hook(_module, args):
            self.values[name] = args[index].detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def watch_backbone(recorder: Recorder, backbone: nn.Module, prefix: str) -> None:
    vit, hf = backbone.vision.vit, backbone.text.encoder
    recorder.output(f"{prefix}.text_tower.embeddings", hf.embeddings)
    for i, layer in enumerate(hf.encoder.layer):
        recorder.output(f"{prefix}.text_tower.layer{i}", layer)
    recorder.input(f"{prefix}.vision_tower.tokens_before_ln_pre", vit.norm_pre)
    for i, block in enumerate(vit.blocks):
        recorder.output(f"{prefix}.vision_tower.block{i}", block)
    recorder.output(f"{prefix}.vision_tower.ln_post", vit.norm)
    recorder.input(f"{prefix}.fusion.input.text", backbone.fusion, 0)
    recorder.input(f"{prefix}.fusion.input.image", backbone.fusion, 1)
    for stream, layers in (("text", backbone.fusion.text_layers), ("image", backbone.fusion.image_layers)):
        for i, layer in enumerate(layers[:-1]):
            recorder.output(f"{prefix}.fusion.layer{i}.{stream}.after_self_attn", layer.self_norm)
            recorder.output(f"{prefix}.fusion.layer{i}.{stream}.after_cross_attn", layer.cross_norm)
            recorder.output(f"{prefix}.fusion.layer{i}.{stream}", layer)


def pooled_outputs(prefix: str, out) -> dict[str, Tensor]:
    return {
        f"{prefix}.text_feats": out.text_feats,
        f"{prefix}.image_feats": out.image_feats,
        f"{prefix}.text_cls_feats": out.text_pooled,
        f"{prefix}.image_cls_feats": out.image_pooled,
        f"{prefix}.cls_feats": out.pooled,
    }


@torch.no_grad()
def our_outputs(
    pretrain: MRPretrain, finetune: FineTune, batch: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Tensor]:
    """Every tensor of ``outputs.safetensors``, computed by our modules on the fixture's batch."""
    pixels, ids, masks = batch["pixel_values"], batch["text_ids"], batch["text_masks"]
    keep, mask = batch["mim_ids_keep"], batch["mim_mask"].bool()
    grid = (pixels.shape[-2] // PATCH, pixels.shape[-1] // PATCH)
    backbone = pretrain.backbone
    got: dict[str, Tensor] = {}
    recorder = Recorder()
    watch_backbone(recorder, backbone, "unmasked")
    unmasked = backbone(pixels, ids, masks)
    recorder.close()
    got.update(recorder.values)
    got.update(pooled_outputs("unmasked", unmasked))
    got["unmasked.extended_text_masks"] = (~masks.bool())[:, None, None, :].float() * -10000.0
    got["unmasked.itm_logits"] = pretrain.itm_head(unmasked.pooled)

    recorder = Recorder()
    watch_backbone(recorder, backbone, "joint_masked")
    joint = backbone(pixels, batch["mlm_ids"], masks, keep)
    recorder.close()
    # The reference saves the masked pass's fusion layers, not their steps, and no text tower of it.
    got.update({k: v for k, v in recorder.values.items() if "text_tower" not in k and ".after_" not in k})
    got.update(pooled_outputs("joint_masked", joint))
    teacher = pretrain.teacher(pixels, ids, masks)
    pixel_pred, _ = pretrain.mim_decoder(joint.image_feats, keep, grid)
    mlm_logits = pretrain.mlm_head(joint.text_feats)
    embed = pretrain.mim_decoder.embed
    got.update(
        {
            "joint_masked.mim_masks": mask.float(),
            "joint_masked.mim_ids_restore": batch["mim_ids_restore"],
            "joint_masked.mlm_logits": mlm_logits,
            "joint_masked.mim_logits": pixel_pred,
            "joint_masked.mim_labels": normalized_pixel_targets(patchify(pixels, PATCH)),
            "joint_masked.feal_logits": pretrain.feamlm_predictor(joint.text_feats),
            "joint_masked.feal_labels": pretrain.feamlm_predictor(teacher.text_feats),
            "joint_masked.feai_logits": pretrain.mim_decoder.insert_mask_tokens(
                embed(joint.image_feats), keep, grid[0] * grid[1]
            )[:, 1:],
            "joint_masked.feai_labels": embed(teacher.image_feats)[:, 1:],
        }
    )
    # The losses through the stage's own training code, with the fixture's mask instead of a random one.
    monkeypatch.setattr(reconstruction_module, "random_masking", lambda *args, **kwargs: (keep, mask))
    stage_batch = {
        "pixel_values": pixels,
        "input_ids": ids,
        "attention_mask": masks,
        "mlm_input_ids": batch["mlm_ids"],
        "mlm_labels": batch["mlm_labels"],
    }
    terms, _ = pretrain.reconstruction_losses(stage_batch)
    alpha = pretrain.hparams.alpha
    for ours, theirs in (("mim", "mim"), ("mlm", "mlm"), ("feamim", "feai"), ("feamlm", "feal")):
        got[f"joint_masked.{theirs}_loss"] = alpha * terms[ours]
    got["joint_masked.total_loss_without_itm"] = terms["loss"] - pretrain.hparams.w_itm * terms["itm"]

    layer1_pred, _ = pretrain.mim_decoder(joint.image_layers[0], keep, grid)
    target = got["joint_masked.mim_labels"]
    got["joint_masked_mim_layer1.mim_loss"] = alpha * losses.mim_loss(layer1_pred, target, mask)
    text_masked = backbone(pixels, batch["mlm_ids"], masks)
    got["text_masked.text_feats"] = text_masked.text_feats
    text_logits = pretrain.mlm_head(text_masked.text_feats)
    got["text_masked.mlm_loss"] = alpha * losses.mlm_loss(text_logits, batch["mlm_labels"])
    image_masked = backbone(pixels, ids, masks, keep)
    got["image_masked.image_feats"] = image_masked.image_feats
    image_pred, _ = pretrain.mim_decoder(image_masked.image_feats, keep, grid)
    got["image_masked.mim_loss"] = alpha * losses.mim_loss(image_pred, target, mask)

    tuned = finetune.backbone(pixels, ids, masks)
    got.update({k: v for k, v in pooled_outputs("finetune_unmasked", tuned).items() if "_feats" in k})
    del got["finetune_unmasked.text_feats"], got["finetune_unmasked.image_feats"]
    logits = finetune.head(tuned.pooled)
    got["finetune_unmasked.vqa_logits"] = logits
    got["finetune_unmasked.vqa_loss"] = finetune._loss(logits, {"targets": batch["vqa_targets"]})[0]
    z_t, z_v = unimodal_logits(finetune.head, tuned.text_pooled, tuned.image_pooled, "reference")
    _, k_t, k_v = coefficients(scores(z_t, batch["vqa_labels"]), scores(z_v, batch["vqa_labels"]), 0.1, "reference")
    got.update(
        {
            "finetune_unmasked.gm_out_t": z_t,
            "finetune_unmasked.gm_out_i": z_v,
            "finetune_unmasked.gm_coeff_t": k_t,
            "finetune_unmasked.gm_coeff_i": k_v,
        }
    )
    return got


def differences(got: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Max absolute difference per reference tensor (inf where shapes differ)."""
    assert got.keys() == reference.keys(), sorted(got.keys() ^ reference.keys())
    return {
        name: float((got[name].float() - value.float()).abs().max()) if got[name].shape == value.shape else math.inf
        for name, value in reference.items()
    }


def run(converted, inputs, monkeypatch, pretrain_overrides=None, finetune_overrides=None, edit=None):
    pretrain = load_stage(converted["pretrain"], pretrain_overrides)
    finetune = load_stage(converted["finetune"], finetune_overrides)
    if edit is not None:
        edit(pretrain, finetune)
    return our_outputs(pretrain, finetune, inputs, monkeypatch)


def test_every_reference_output_matches(converted, inputs, reference, monkeypatch) -> None:
    diffs = differences(run(converted, inputs, monkeypatch), reference)
    print("\n".join(f"{diff:.3e} {name}" for name, diff in sorted(diffs.items())))
    worst = {name: diff for name, diff in diffs.items() if not diff <= TOLERANCE}
    assert not worst, worst
    assert len(diffs) == len(reference) == 63


def _swap_activation(old: type[nn.Module], new: Callable[[], nn.Module]) -> Callable:
    def edit(pretrain, finetune) -> None:
        for model in (pretrain, finetune):
            for module in list(model.modules()):
                for name, child in module.named_children():
                    if type(child) is old:
                        setattr(module, name, new())

    return edit


def _swap_query_key(pretrain, finetune) -> None:
    for model in (pretrain, finetune):
        attention = model.backbone.fusion.image_layers[0].cross_attn
        with torch.no_grad():
            query = attention.query.weight.clone()
            attention.query.weight.copy_(attention.key.weight)
            attention.key.weight.copy_(query)


@pytest.mark.parametrize(
    ("case", "kwargs", "moved"),
    [
        ("GELU -> QuickGELU in the fusion", {"edit": "gelu"}, "unmasked.fusion.layer0.text"),
        ("QuickGELU -> GELU in the vision tower", {"edit": "quickgelu"}, "unmasked.vision_tower.block0"),
        ("pre-norm fusion", {"pretrain_overrides": {"fusion.prenorm": True}}, "unmasked.text_feats"),
        ("first-token fine-tuning", {"finetune_overrides": {"pooling": "first"}}, "finetune_unmasked.vqa_logits"),
        ("query and key swapped", {"edit": "swap"}, "unmasked.image_feats"),
        ("row-first sin-cos", {"pretrain_overrides": {"decoder.pos_embed": "row_first"}}, "joint_masked.mim_logits"),
    ],
)
def test_a_single_difference_breaks_parity(converted, inputs, reference, monkeypatch, case, kwargs, moved) -> None:
    from timm.layers import QuickGELU

    edits = {
        "gelu": _swap_activation(nn.GELU, QuickGELU),
        "quickgelu": _swap_activation(QuickGELU, nn.GELU),
        "swap": _swap_query_key,
    }
    if "edit" in kwargs:
        kwargs = {**kwargs, "edit": edits[kwargs["edit"]]}
    diffs = differences(run(converted, inputs, monkeypatch, **kwargs), reference)
    assert diffs[moved] > 1e-3, case


def test_teacher_comes_from_the_ema_keys(tmp_path: Path, text_folder: Path) -> None:
    """The fixture's teacher equals its student; move the saved teacher and check our teacher follows it."""
    from umd_lightning.convert import read_reference_checkpoint

    checkpoint = read_reference_checkpoint(FIXTURE / "pretrain.ckpt")
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith("ema.module.")]:
        if state[key].is_floating_point():
            state[key] = state[key] + 1.0
    source = tmp_path / "moved.pt"
    torch.save({"state_dict": state, "hyper_parameters": checkpoint["hyper_parameters"]}, source)
    out, conversion = convert_checkpoint(
        source, tmp_path / "out.ckpt", text_model=str(text_folder), sizes=ReferenceSizes(2)
    )
    saved = torch.load(out, weights_only=True)["state_dict"]
    key = "multi_modal_vision_layers.1.crossattention.self.key.weight"
    assert conversion.mapped["ema.module." + key] == "teacher.module.fusion.image_layers.1.cross_attn.key.weight"
    assert torch.equal(saved["teacher.module.fusion.image_layers.1.cross_attn.key.weight"], state["ema.module." + key])
    assert torch.equal(saved["backbone.fusion.image_layers.1.cross_attn.key.weight"], state[key])
    stage = MRPretrain(**torch.load(out, weights_only=True)["hyper_parameters"])
    stage.load_pretrained(out)
    teacher = stage.teacher.module.fusion.image_layers[1].cross_attn.key.weight
    assert torch.equal(teacher, state["ema.module." + key]) and stage._teacher_from_checkpoint


def test_unknown_keys_and_shapes_fail_with_the_key_named(tmp_path: Path, text_folder: Path) -> None:
    with pytest.raises(ConversionError, match=r"'surprise\.weight'"):
        map_key("surprise.weight")
    state = load_file(str(FIXTURE / "finetune_vqa_state_dict.safetensors"))
    state["multi_modal_vision_proj.bias"] = torch.zeros(65)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"multi_modal_vision_proj\.bias") as caught:
        convert_checkpoint(
            tmp_path / "bad.pt", tmp_path / "x.ckpt", text_model=str(text_folder), sizes=ReferenceSizes(2, 2, 2)
        )
    assert "\n" not in str(caught.value)


def test_convert_command_line(tmp_path: Path, text_folder: Path) -> None:
    out = tmp_path / "converted.ckpt"
    command = [sys.executable, "-m", "umd_lightning", "convert", str(FIXTURE / "pretrain.ckpt"), str(out)]
    result = subprocess.run(
        [*command, "--text-model", str(text_folder), "--vision-heads", "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "391 keys mapped, 45 dropped" in result.stdout and "ema.module.mlm_head" in result.stdout
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["umd_stage"] == "pretrain" and saved["umd_backbone_config"]["pooling"] == "first"
    assert saved["umd_backbone_config"]["vision"]["arch"] == "vit_base_patch16_clip_quickgelu_224"
    assert any(k.startswith("teacher.module.") for k in saved["state_dict"])
    missing = subprocess.run([*command[:-2], str(tmp_path / "nope.ckpt"), str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


def _tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with RoBERTa's special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<mask>`` 999)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["is", "there", "a", "lesion", "?", "where", "the", "shape"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 999, **{w: 4 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [("<s>", 0), ("</s>", 2)]
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.save_pretrained(folder)


def test_converted_vqa_model_exports_and_predicts(tmp_path: Path, text_folder: Path, inputs, reference) -> None:
    import shutil

    from umd_lightning.hub import UMDInferenceModel
    from umd_lightning.predict import Predictor

    text = tmp_path / "roberta_tiny"
    shutil.copytree(text_folder, text)
    _tiny_tokenizer(text)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", "no", "left", "right", "ct", "mri", "x-ray"]))
    convert_checkpoint(
        FIXTURE / "finetune_vqa_state_dict.safetensors",
        tmp_path / "vqa.ckpt",
        text_model=str(text),
        sizes=ReferenceSizes(2, 2, 2),
        answers=answers,
        export_dir=tmp_path / "export",
    )
    model = UMDInferenceModel.from_pretrained(str(tmp_path / "export"))
    assert model.backbone_config.pooling == "mean" and model.labels[3] == "right"
    with torch.no_grad():
        logits = model(inputs["pixel_values"], inputs["text_ids"], inputs["text_masks"])
    assert (logits - reference["finetune_unmasked.vqa_logits"]).abs().max() <= TOLERANCE
    assert "finetune_vqa_state_dict.safetensors" in (tmp_path / "export" / "README.md").read_text()
    image = next((REPO / "tests" / "data" / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))
    top = Predictor.from_export(tmp_path / "export").answer(image, "is there a lesion ?")
    assert len(top) == 5 and {label for label, _ in top} <= set(model.labels)


def test_converted_pretraining_checkpoint_starts_td_calib_and_fine_tuning(converted) -> None:
    from umd_lightning.stages import TDCalib

    saved = torch.load(converted["pretrain"], map_location="cpu", weights_only=True)
    common = {k: saved["hyper_parameters"][k] for k in ("preset", "backbone_overrides", "text_model")}
    calib = TDCalib(**common, feature_loss="reference")
    left_out, _ = calib.load_pretrained(converted["pretrain"])
    assert all(k.startswith(("teacher.", "itm_head.")) for k in left_out)
    tune = FineTune(**common, task="vqa", num_outputs=3)
    tune.load_pretrained(converted["pretrain"])
    assert torch.equal(tune.backbone.text_proj.weight, saved["state_dict"]["backbone.text_proj.weight"])
