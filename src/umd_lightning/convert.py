"""Convert a checkpoint of the authors' code (UMD reference or M3AE) into a UMD stage checkpoint.

``umd convert REFERENCE.ckpt OUT.ckpt --text-model roberta-base`` (or ``python -m umd_lightning.convert``) reads
a PyTorch Lightning 1.3 ``.ckpt`` of ``UMDTransformerSS`` (or its bare ``state_dict`` as ``.pt`` / ``.safetensors``),
maps every key onto :class:`~umd_lightning.models.backbone.UMDBackbone` and our heads (or drops it, with the
reason), and writes a checkpoint in the layout our stages save (``state_dict``, ``umd_stage``,
``umd_backbone_config``, ``hyper_parameters``):

- a pre-training checkpoint becomes an ``umd_stage: pretrain`` checkpoint that ``pretrained:`` of MR-Pretrain,
  TD-Calib and fine-tuning accepts; its EMA teacher (``ema.module.``) becomes our MR-Pretrain teacher;
- a fine-tuned VQA / classification / retrieval checkpoint becomes an ``umd_stage: finetune`` checkpoint for
  ``umd test`` / :class:`~umd_lightning.predict.Predictor`, and ``--export DIR`` also writes a predict-ready
  :class:`~umd_lightning.hub.UMDInferenceModel` folder (the text model must then hold a tokenizer).

The weights cannot say how the reference pools: its MR-Pretrain takes the first token, its TD-Calib and
fine-tuning code the mean over all tokens (padding included). A converted pre-training checkpoint keeps
``pooling: first``; a converted fine-tuned one gets ``pooling: mean``. To continue from a pre-training checkpoint
exactly as the reference's TD-Calib / fine-tuning does, set ``backbone_overrides: {pooling: mean}`` there.

The ``.ckpt`` is read with ``torch.load(weights_only=True)``. PL 1.3 pickles its ``ModelCheckpoint`` class as a
dictionary key; when the only globals ``weights_only`` refuses are Lightning classes, they are replaced by empty
placeholder classes (nothing is imported or run). Any other global needs the explicit opt-in ``UMD_TRUST_PICKLE=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from umd_lightning.errors import ConfigError, ConversionError
from umd_lightning.models.config import BackboneConfig, DecoderConfig, FusionConfig, TextConfig, VisionConfig
from umd_lightning.models.heads import sincos_pos_embed_2d
from umd_lightning.weights import TRUST_PICKLE_ENV, trusts_pickle

REFERENCE_VISION_ARCH = "vit_base_patch16_clip_quickgelu_224"
"""timm's CLIP ViT with QuickGELU, pre-norm (``ln_pre``) and a final norm on all tokens: the reference's tower."""

LIGHTNING_MODULES = ("pytorch_lightning", "lightning")


Transform = Callable[[Tensor], Tensor]


def _same(value: Tensor) -> Tensor:
    return value


def _cls_token(value: Tensor) -> Tensor:
    return value.reshape(1, 1, -1)


def _batch_dim(value: Tensor) -> Tensor:
    return value.unsqueeze(0)


_CLIP_BLOCK = [
    (r"ln_1\.", "norm1."),
    (r"ln_2\.", "norm2."),
    (r"attn\.in_proj_(weight|bias)", r"attn.qkv.\1"),
    (r"attn\.out_proj\.", "attn.proj."),
    (r"mlp\.c_fc\.", "mlp.fc1."),
    (r"mlp\.c_proj\.", "mlp.fc2."),
]
_BERT_CROSS_LAYER = [
    (r"attention\.self\.(query|key|value)\.", r"self_attn.\1."),
    (r"attention\.output\.dense\.", "self_attn.out."),
    (r"attention\.output\.LayerNorm\.", "self_norm."),
    (r"crossattention\.self\.(query|key|value)\.", r"cross_attn.\1."),
    (r"crossattention\.output\.dense\.", "cross_attn.out."),
    (r"crossattention\.output\.LayerNorm\.", "cross_norm."),
    (r"intermediate\.dense\.", "ffn.0."),
    (r"output\.dense\.", "ffn.3."),
    (r"output\.LayerNorm\.", "ffn_norm."),
]
_CLASSIFIER = [(r"0\.", "hidden.0."), (r"1\.", "hidden.1."), (r"3\.", "final.")]


def _expand(prefix: str, target: str, inner: list[tuple[str, str]]) -> list[tuple[str, str, Transform]]:
    """Rules for ``prefix + pattern``, where a pattern ending in ``.`` takes a ``weight`` or ``bias`` after it; the
    inner replacements' group numbers are shifted past the prefix's."""
    shift = re.compile(prefix).groups

    def shifted(replacement: str) -> str:
        return re.sub(r"\\(\d)", lambda m: f"\\g<{int(m.group(1)) + shift}>", replacement)

    rules = []
    for pattern, replacement in inner:
        if pattern.endswith("\\."):
            pattern, replacement = pattern + "(?P<leaf>weight|bias)", replacement + "\\g<leaf>"
        rules.append((prefix + pattern, target + shifted(replacement), _same))
    return rules


# (reference key regex, our key, tensor transform); the backbone part is shared by the student and the teacher.
BACKBONE_RULES: list[tuple[str, str, Transform]] = [
    (r"vision_encoder\.visual\.class_embedding", "vision.vit.cls_token", _cls_token),
    (r"vision_encoder\.visual\.positional_embedding", "vision.vit.pos_embed", _batch_dim),
    (r"vision_encoder\.visual\.conv1\.weight", "vision.vit.patch_embed.proj.weight", _same),
    (r"vision_encoder\.visual\.ln_pre\.(weight|bias)", r"vision.vit.norm_pre.\1", _same),
    (r"vision_encoder\.visual\.ln_post\.(weight|bias)", r"vision.vit.norm.\1", _same),
    *_expand(r"vision_encoder\.visual\.transformer\.resblocks\.(\d+)\.", r"vision.vit.blocks.\1.", _CLIP_BLOCK),
    (r"language_encoder\.(embeddings\.(?!position_ids).*)", r"text.encoder.\1", _same),
    (r"language_encoder\.(encoder\.layer\.\d+\..*)", r"text.encoder.\1", _same),
    (r"multi_modal_language_proj\.(weight|bias)", r"text_proj.\1", _same),
    (r"multi_modal_vision_proj\.(weight|bias)", r"image_proj.\1", _same),
    (r"modality_type_embeddings\.weight", "type_embed.weight", _same),
    *_expand(r"multi_modal_language_layers\.(\d+)\.", r"fusion.text_layers.\1.", _BERT_CROSS_LAYER),
    *_expand(r"multi_modal_vision_layers\.(\d+)\.", r"fusion.image_layers.\1.", _BERT_CROSS_LAYER),
    (r"multi_modal_language_pooler\.dense\.(weight|bias)", r"text_pooler.linear.\1", _same),
    (r"multi_modal_vision_pooler\.dense\.(weight|bias)", r"image_pooler.linear.\1", _same),
]

HEAD_RULES: list[tuple[str, str, Transform]] = [
    (r"mlm_head\.transform\.dense\.(weight|bias)", r"mlm_head.transform.0.\1", _same),
    (r"mlm_head\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.transform.2.\1", _same),
    (r"mlm_head\.decoder\.weight", "mlm_head.decoder.weight", _same),
    (r"mlm_head\.bias", "mlm_head.decoder.bias", _same),
    (r"mim_head\.decoder_embed\.(weight|bias)", r"mim_decoder.embed.\1", _same),
    (r"mim_head\.mask_token", "mim_decoder.mask_token", _same),
    *_expand(r"mim_head\.decoder\.resblocks\.(\d+)\.", r"mim_decoder.blocks.\1.", _CLIP_BLOCK),
    (r"mim_head\.decoder_norm\.(weight|bias)", r"mim_decoder.norm.\1", _same),
    (r"mim_head\.decoder_pred\.(weight|bias)", r"mim_decoder.pixel_out.\1", _same),
    (r"itm_head\.fc\.(weight|bias)", r"itm_head.linear.\1", _same),
    (r"feal_proj\.(weight|bias)", r"feamlm_predictor.\1", _same),
    *_expand(r"vqa_head\.", "head.", _CLASSIFIER),
    *_expand(r"cls_head\.", "head.", _CLASSIFIER),
    (r"irtr_head\.(weight|bias)", r"head.linear.\1", _same),
]

DROPPED: list[tuple[str, str]] = [
    (
        r"vision_encoder\.(token_embedding|positional_embedding|ln_final)\..*|vision_encoder\.positional_embedding",
        "CLIP's text-side leftovers, never used by the reference",
    ),
    (r"language_encoder\.embeddings\.position_ids", "an int64 buffer of transformers 4.6; recomputed by ours"),
    (r"language_encoder\.pooler\..*", "RoBERTa's pooler, never used by the reference"),
    (
        r"mim_head\.decoder_pos_embed",
        "the fixed 2-D sin-cos table (not trained); checked equal to the one our "
        "decoder computes (decoder.pos_embed: column_first)",
    ),
    # The authors' ITCHead is a LayerNorm per side over the *fused* pooled features with a fixed temperature
    # (cl_temp): it scores a pair only after the cross-encoder has run, so it cannot rank pairs before fusion, which
    # is what ours (umd_lightning.models.heads.ITCHead: projections of the towers' own tokens) is for.
    (
        r"itc_head\..*",
        "the ITC head (off in the committed reference, loss_names.itc = 0) normalises fused features; ours projects "
        "the towers' features before fusion, so it has no counterpart here",
    ),
    (r"preteacher\..*", "a second teacher of an unpublished variant, not used by the committed reference"),
]
TEACHER_PREFIX = "ema.module."
TEACHER_HEAD_REASON = (
    "a head of the EMA teacher: the reference computes the feature targets with the student's heads, so our "
    "teacher is a copy of the backbone only"
)
FRESH_REASON = "not in the reference; initialised as our stage initialises it"


@dataclass
class Conversion:
    """The outcome of :func:`convert_state_dict`.

    Attributes:
        state_dict: our stage's state dict.
        mapped: reference key -> our key.
        dropped: reference key -> why it is not carried.
        fresh: our keys with no reference counterpart (initialised as our stage does).
    """

    state_dict: dict[str, Tensor]
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)


def map_key(key: str) -> tuple[str | None, Transform | str]:
    """Our key for one reference key: ``(our_key, transform)``, or ``(None, reason)`` for a dropped key.

    Raises:
        ConversionError: a key no rule knows (named in the message).
    """
    teacher = key.startswith(TEACHER_PREFIX)
    inner = key.removeprefix(TEACHER_PREFIX)
    for pattern, reason in DROPPED:
        if re.fullmatch(pattern, inner):
            return None, reason
    for pattern, target, transform in BACKBONE_RULES:
        if re.fullmatch(pattern, inner):
            prefix = "teacher.module." if teacher else "backbone."
            return prefix + re.sub(pattern, target, inner), transform
    for pattern, target, transform in HEAD_RULES:
        if re.fullmatch(pattern, inner):
            if teacher:
                return None, TEACHER_HEAD_REASON
            return re.sub(pattern, target, inner), transform
    raise ConversionError(f"unexpected key in the reference checkpoint: {key!r} (no rule maps or drops it)")


# ------------------------------------------------------------------------------------------------- reading
def _placeholder(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name})


def read_reference_checkpoint(path: str | Path, trust_pickle: bool | None = None) -> dict[str, Any]:
    """Read a reference checkpoint without running pickled code: a dict with ``state_dict`` (and, for a
    Lightning ``.ckpt``, its ``hyper_parameters``, ``global_step`` ...).

    A bare state dict (``.safetensors``, or a ``torch.save`` of the ``state_dict``) is wrapped as
    ``{"state_dict": ...}``.

    Raises:
        ConversionError: missing file, a file that needs full unpickling without the opt-in, or no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"reference checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path), device="cpu")}
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        raise ConversionError(f"{path} is not a torch checkpoint ({str(exc).strip().splitlines()[0]})") from exc
    if not unsafe:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    elif all(name.split(".")[0] in LIGHTNING_MODULES for name in unsafe):
        # PL 1.3 keys `callbacks` by the callback class: an empty stand-in class is all the unpickler needs.
        with torch.serialization.safe_globals([_placeholder(name) for name in unsafe]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    elif trusts_pickle(trust_pickle):
        print(
            f"umd convert: {path} pickles {', '.join(unsafe)}; unpickling it fully because {TRUST_PICKLE_ENV}=1 "
            "(or trust_pickle=True) was given",
            file=sys.stderr,
        )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    else:
        raise ConversionError(
            f"{path} pickles {', '.join(unsafe)}, which only full unpickling (able to run code) restores: if you "
            f"trust the file, set {TRUST_PICKLE_ENV}=1"
        )
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return {"state_dict": checkpoint}
    raise ConversionError(f"{path} holds no state_dict of tensors")


# ------------------------------------------------------------------------------------------------- config
@dataclass
class ReferenceSizes:
    """What the weights cannot tell: attention heads (shapes do not depend on them) and the MIM layer.

    ``None`` takes the checkpoint's ``hyper_parameters.config`` value, else the reference's real one.

    Attributes:
        vision_heads: the CLIP ViT's heads (the reference's CLIP class uses ``width // 64``).
        fusion_heads: the co-attention layers' heads (``num_heads``; 12).
        decoder_heads: the MIM decoder's heads (``mim_decoder_num_heads``; 6).
        mim_layer: ``mim_layer`` (-1).
    """

    vision_heads: int | None = None
    fusion_heads: int | None = None
    decoder_heads: int | None = None
    mim_layer: int | None = None


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    return max(indices) + 1 if indices else 0


def backbone_config_from_reference(
    state: Mapping[str, Tensor],
    reference_config: Mapping[str, Any],
    text_model: str,
    sizes: ReferenceSizes,
    pooling: str,
) -> BackboneConfig:
    """Our :class:`BackboneConfig` for a reference state dict (student keys) and its Sacred config.

    Raises:
        ConversionError: a key the sizes are read from is missing.
    """

    def need(key: str) -> Tensor:
        if key not in state:
            raise ConversionError(f"the reference checkpoint has no {key!r}: is it a UMDTransformerSS state dict?")
        return state[key]

    conv = need("vision_encoder.visual.conv1.weight")
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(need("vision_encoder.visual.positional_embedding").shape[0] - 1)
    fusion_width = need("multi_modal_language_proj.weight").shape[0]
    ffn = need("multi_modal_language_layers.0.intermediate.dense.weight").shape[0]

    def pick(given: int | None, key: str, default: int) -> int:
        return given if given is not None else int(reference_config.get(key, default))

    # A fine-tuned checkpoint has no decoder: the reference's real sizes stand in (the stage builds none).
    decoder = DecoderConfig(
        heads=pick(sizes.decoder_heads, "mim_decoder_num_heads", 6),
        mim_layer=pick(sizes.mim_layer, "mim_layer", -1),
        act="quick_gelu",
        pos_embed="column_first",
    )
    if "mim_head.decoder_embed.weight" in state:
        decoder.width = state["mim_head.decoder_embed.weight"].shape[0]
        decoder.depth = _count(state, r"mim_head\.decoder\.resblocks\.(\d+)\..*")
    return BackboneConfig(
        vision=VisionConfig(
            arch=REFERENCE_VISION_ARCH,
            patch_size=patch,
            width=vision_width,
            depth=_count(state, r"vision_encoder\.visual\.transformer\.resblocks\.(\d+)\..*"),
            heads=sizes.vision_heads if sizes.vision_heads is not None else max(1, vision_width // 64),
        ),
        text=TextConfig(name_or_path=text_model, pretrained=False),
        fusion=FusionConfig(
            width=fusion_width,
            layers=_count(state, r"multi_modal_language_layers\.(\d+)\..*"),
            heads=pick(sizes.fusion_heads, "num_heads", 12),
            ffn=ffn,
            dropout=float(reference_config.get("drop_rate", 0.1)),
            norm_eps=1e-12,
        ),
        decoder=decoder,
        image_size=grid * patch,
        pooling=pooling,
    )


def flat_overrides(cfg: BackboneConfig) -> dict[str, Any]:
    """Every field of ``cfg`` as dotted-key ``backbone_overrides``, so any preset rebuilds exactly ``cfg``."""
    data = cfg.to_dict()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


# ------------------------------------------------------------------------------------------------- converting
def convert_state_dict(reference: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Conversion:
    """Map every reference key onto ``template`` (our stage's state dict, which gives the target shapes).

    Our keys the reference does not have keep the template's (freshly initialised) values and are listed in
    :attr:`Conversion.fresh`.

    Raises:
        ConversionError: an unknown key, a key that maps to nothing of this stage, a shape that does not fit, or
            a decoder position table that is not the fixed sin-cos one (each names the key).
    """
    out = {k: v.clone() for k, v in template.items()}
    conversion = Conversion(state_dict=out)
    for key, value in reference.items():
        target, how = map_key(key)
        if target is None:
            conversion.dropped[key] = str(how)
            continue
        if target not in out:
            raise ConversionError(f"reference key {key!r} maps to {target!r}, which this model does not have")
        converted = how(value)
        if converted.shape != out[target].shape:
            raise ConversionError(
                f"reference key {key!r} has shape {tuple(value.shape)}, which does not fit {target!r} "
                f"{tuple(out[target].shape)}"
            )
        out[target] = converted.to(out[target].dtype).clone()
        conversion.mapped[key] = target
    _check_pos_table(reference)
    conversion.fresh = sorted(set(out) - set(conversion.mapped.values()))
    return conversion


def _check_pos_table(reference: Mapping[str, Tensor]) -> None:
    key = "mim_head.decoder_pos_embed"
    if key not in reference:
        return
    table = reference[key][0]
    grid = math.isqrt(table.shape[0] - 1)
    expected = sincos_pos_embed_2d(table.shape[1], (grid, grid), "column_first")
    if table[0].abs().max() > 0 or not torch.allclose(table[1:].float(), expected, atol=1e-5):
        raise ConversionError(f"reference key {key!r} is not the fixed 2-D sin-cos table our decoder computes")


def _load_answers(path: str | Path) -> list[str]:
    """An answer vocabulary: a JSON list (``label2ans``) or a JSON object answer -> index (``ans2label``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = [answer for answer, _ in sorted(data.items(), key=lambda item: int(item[1]))]
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise ConversionError(f"{path}: expected a JSON list of answers or an object answer -> index")
    return data


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    text_model: str | None = None,
    sizes: ReferenceSizes | None = None,
    feature_loss: str = "reference",
    answers: str | Path | None = None,
    export_dir: str | Path | None = None,
    trust_pickle: bool | None = None,
) -> tuple[Path, Conversion]:
    """Convert a reference checkpoint and write ours (``torch.save``, readable with ``weights_only=True``).

    Args:
        source: the reference ``.ckpt`` (PL 1.3) or its state dict (``.pt`` / ``.safetensors``).
        destination: the checkpoint to write.
        text_model: the RoBERTa the reference was built from (a local HF folder or a hub name): its config
            sizes the text tower; ``None`` takes the checkpoint's ``config.tokenizer``, else ``roberta-base``.
        sizes: attention heads and the MIM layer, see :class:`ReferenceSizes`.
        feature_loss: the MR-Pretrain ``feature_loss`` the checkpoint is for: ``reference`` carries
            ``feal_proj`` (a Linear) as our reference FeaMLM predictor; ``predictive`` drops it and writes our
            two-layer predictor freshly initialised.
        answers: the fine-tuned model's answer / class names (JSON list or object answer -> index).
        export_dir: also write a predict-ready export folder there (fine-tuned checkpoints only).
        trust_pickle: see :func:`read_reference_checkpoint`.

    Returns:
        ``destination`` and the :class:`Conversion` (what was mapped, dropped and freshly initialised).

    Raises:
        ConversionError: see :func:`read_reference_checkpoint` and :func:`convert_state_dict`.
    """
    import lightning

    from umd_lightning.stages.finetune import FineTune
    from umd_lightning.stages.pretrain import MRPretrain

    checkpoint = read_reference_checkpoint(source, trust_pickle)
    reference: dict[str, Tensor] = dict(checkpoint["state_dict"])
    hparams = checkpoint.get("hyper_parameters") or {}
    reference_config: dict[str, Any] = dict(hparams.get("config", {})) if isinstance(hparams, Mapping) else {}
    text_model = text_model or reference_config.get("tokenizer") or "roberta-base"
    student = {k: v for k, v in reference.items() if not k.startswith(TEACHER_PREFIX)}
    task = next(
        (
            t
            for t, head in (("vqa", "vqa_head."), ("classification", "cls_head."), ("retrieval", "irtr_head."))
            if any(k.startswith(head) for k in student)
        ),
        None,
    )
    cfg = backbone_config_from_reference(
        student, reference_config, text_model, sizes or ReferenceSizes(), "first" if task is None else "mean"
    )
    common = {"preset": "base", "backbone_overrides": flat_overrides(cfg), "text_model": text_model}
    dropped_by_choice: dict[str, str] = {}
    if task is None:
        if feature_loss not in ("reference", "predictive"):
            raise ConversionError(f"feature_loss must be 'reference' or 'predictive', got {feature_loss!r}")
        if feature_loss == "predictive":
            dropped_by_choice = {
                k: "feature_loss: predictive uses our two-layer FeaMLM predictor instead (initialised fresh)"
                for k in reference
                if k.removeprefix(TEACHER_PREFIX).startswith("feal_proj.")
            }
        has_teacher = any(k.startswith(TEACHER_PREFIX) for k in reference)
        umd_features = 1.0 if has_teacher or "feal_proj.weight" in student else 0.0
        kwargs = {
            **common,
            "feature_loss": feature_loss,
            "w_itm": 1.0 if "itm_head.fc.weight" in student else 0.0,
            "w_feamlm": umd_features,
            "w_feamim": umd_features,
        }
        stage = MRPretrain(**kwargs)
    else:
        labels = _load_answers(answers) if answers is not None else None
        head_key = {"vqa": "vqa_head.3.weight", "classification": "cls_head.3.weight"}.get(task)
        num_outputs = student[head_key].shape[0] if head_key else None
        if labels is not None and len(labels) != num_outputs:
            raise ConversionError(f"{answers} lists {len(labels)} answers but the head has {num_outputs} outputs")
        kwargs = {**common, "task": task, "num_outputs": num_outputs, "labels": labels}
        stage = FineTune(**kwargs)
    kept = {k: v for k, v in reference.items() if k not in dropped_by_choice}
    conversion = convert_state_dict(kept, stage.state_dict())
    conversion.dropped.update(dropped_by_choice)
    if task is None and stage.teacher is not None and not has_teacher:
        # A bare student state dict: the teacher starts as the student, as in a fresh MR-Pretrain run.
        for key in [k for k in conversion.fresh if k.startswith("teacher.module.")]:
            conversion.state_dict[key] = conversion.state_dict["backbone." + key.removeprefix("teacher.module.")]
        conversion.fresh = [k for k in conversion.fresh if not k.startswith("teacher.module.")]
    stage_name = "pretrain" if task is None else "finetune"
    saved = {
        "state_dict": conversion.state_dict,
        "umd_stage": stage_name,
        "umd_backbone_config": cfg.to_dict(),
        "hyper_parameters": kwargs,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(checkpoint.get("epoch", 0)),
        "global_step": int(checkpoint.get("global_step", 0)),
        "umd_converted_from": {
            "source": str(source),
            "dropped": conversion.dropped,
            "fresh": conversion.fresh,
            "reference_config": json.loads(json.dumps(reference_config, default=str)),
        },
    }
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, destination)
    if export_dir is not None:
        if task is None:
            raise ConversionError("--export needs a fine-tuned checkpoint (vqa_head / cls_head / irtr_head keys)")
        from umd_lightning.export import export_model

        export_model(destination, export_dir)
    return destination, conversion


def main(argv: list[str] | None = None) -> int:
    """``umd convert`` / ``python -m umd_lightning.convert``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="umd convert",
        description="Convert a checkpoint of the authors' code (UMD reference / M3AE) into a UMD stage checkpoint.",
    )
    parser.add_argument("source", help="the reference .ckpt (PyTorch Lightning 1.3) or state dict (.pt/.safetensors)")
    parser.add_argument("destination", help="the checkpoint to write (give it to `pretrained:` or `--ckpt_path`)")
    parser.add_argument("--text-model", help="the RoBERTa folder or hub name the reference used (its config.json)")
    parser.add_argument("--vision-heads", type=int, help="CLIP ViT heads (default: width // 64, as the reference)")
    parser.add_argument("--fusion-heads", type=int, help="co-attention heads (default: config num_heads, else 12)")
    parser.add_argument("--decoder-heads", type=int, help="MIM decoder heads (default: config, else 6)")
    parser.add_argument("--mim-layer", type=int, help="MIM layer (default: config mim_layer, else -1)")
    parser.add_argument("--feature-loss", default="reference", choices=("reference", "predictive"))
    parser.add_argument("--answers", help="answer / class names of a fine-tuned model (JSON list or answer -> index)")
    parser.add_argument("--export", help="also write a predict-ready folder (fine-tuned checkpoints)")
    args = parser.parse_args(argv)
    sizes = ReferenceSizes(args.vision_heads, args.fusion_heads, args.decoder_heads, args.mim_layer)
    try:
        out, conversion = convert_checkpoint(
            args.source,
            args.destination,
            text_model=args.text_model,
            sizes=sizes,
            feature_loss=args.feature_loss,
            answers=args.answers,
            export_dir=args.export,
        )
    except ConfigError as exc:
        print(f"umd convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"umd convert: {len(conversion.mapped)} keys mapped, {len(conversion.dropped)} dropped")
    by_reason: dict[str, list[str]] = {}
    for key, reason in conversion.dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for key in conversion.fresh:
        by_reason.setdefault(FRESH_REASON, []).append(key)
    for reason, keys in by_reason.items():
        kind = "fresh" if reason == FRESH_REASON else "dropped"
        print(f"  {kind} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}): {reason}")
    print(f"umd convert: wrote {out}" + (f" and {args.export}" if args.export else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
