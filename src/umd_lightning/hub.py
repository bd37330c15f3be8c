"""A fine-tuned UMD model as one Hugging Face Hub-ready module: backbone, task head, answer vocabulary, tokenizer
and preprocessing.

:class:`UMDInferenceModel` uses ``huggingface_hub.PyTorchModelHubMixin``, so it has ``save_pretrained(folder)``,
``from_pretrained(folder or hub id)`` and ``push_to_hub(repo_id)``. A saved folder holds::

    model.safetensors   the backbone and head weights, with the answer vocabulary's sha256 in its metadata
    config.json         backbone config, task, answers / classes, image and text preprocessing, model card facts
    text/               the tokenizer and the text tower's transformers config (JSON only)
    README.md           the generated model card (data set, stages, vocabulary / validation policy, metrics, seeds)

Loading reads safetensors and JSON only (no pickle), and checks the folder: answers edited in ``config.json``, a
vocabulary of another size or a damaged ``model.safetensors`` stop with one line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, PyTorchModelHubMixin, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from umd_lightning.data.transforms import CLIP_MEAN, CLIP_STD, image_transform
from umd_lightning.errors import ConfigError, ExportError, StageError
from umd_lightning.models.backbone import UMDBackbone
from umd_lightning.models.config import BackboneConfig
from umd_lightning.models.heads import ClassifierHead
from umd_lightning.models.text import load_tokenizer
from umd_lightning.vocabulary import VOCABULARY_CHECKSUM_KEY, vocabulary_checksum
from umd_lightning.weights import load_checkpoint_file

HUB_FORMAT = "umd_lightning.hub/1"
LEGACY_FORMAT = "umd_lightning.export/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_FOLDER = "text"
LEAKY_SETTINGS = {"vocab": "all_splits", "validation": "val_is_test"}
"""Data-module settings that let test answers or test questions into training or model selection."""


def default_max_length(task: str | None) -> int:
    """Texts are truncated to this many tokens when nothing else is known (the data modules' defaults)."""
    return 32 if task == "vqa" else 128


class UMDInferenceModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="umd_lightning",
    tags=["medical", "vision-language", "umd"],
    license="apache-2.0",
):
    """A fine-tuned UMD backbone with its VQA or classification head, ready to answer.

    Args:
        backbone: the backbone config (:meth:`BackboneConfig.to_dict`), text tower named ``text`` (the folder
            beside the weights).
        task: ``vqa`` or ``classification``.
        labels: answer or class names in output order.
        max_text_length: tokens kept per question / caption.
        image_mean: per-channel normalisation mean of the evaluation transform.
        image_std: per-channel normalisation std.
        card: facts for the model card (data set, stages, policies, leak notes, metrics, seeds).
        format: the folder format written by this class.
        text_dir: where the text tower's config and tokenizer are (not saved; set when loading).

    Attributes:
        tokenizer: the fast tokenizer (set by :meth:`from_stage` and :meth:`from_pretrained`).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        task: str,
        labels: list[str],
        max_text_length: int,
        image_mean: list[float] = list(CLIP_MEAN),  # noqa: B006 - a JSON default the hub mixin records
        image_std: list[float] = list(CLIP_STD),  # noqa: B006
        card: dict[str, Any] | None = None,
        format: str = HUB_FORMAT,
        text_dir: Path | None = None,
    ) -> None:
        super().__init__()
        if task not in ("vqa", "classification"):
            raise ConfigError(f"an inference model answers 'vqa' or 'classification', got task {task!r}")
        cfg = BackboneConfig.from_dict(json.loads(json.dumps(backbone)))
        if text_dir is not None:
            cfg.text.name_or_path = str(text_dir)
        cfg.text.pretrained = False
        cfg.vision.pretrained_path, cfg.vision.pretrained_hub = None, False
        self.backbone_config = cfg
        self.task = task
        self.labels = list(labels)
        self.max_text_length = max_text_length
        self.card = dict(card or {})
        self.backbone = UMDBackbone(cfg)
        self.head = ClassifierHead(2 * self.backbone.width, len(self.labels))
        self.transform = image_transform(cfg.image_size, train=False, mean=image_mean, std=image_std)
        self.tokenizer = None

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Task logits (B, |A|) for images (B, 3, H, W) and texts (B, L)."""
        return self.head(self.backbone(pixel_values, input_ids, attention_mask).pooled)

    # ------------------------------------------------------------------------------------- building
    @classmethod
    def from_stage(cls, stage: nn.Module, card: Mapping[str, Any] | None = None, max_text_length: int | None = None):
        """The inference part of a fine-tuned ``FineTune`` module (weights copied).

        Raises:
            ExportError: the module is not a fine-tuned VQA / classification model.
        """
        hp = stage.hparams
        if getattr(stage, "stage_name", None) != "finetune" or hp.get("task") not in ("vqa", "classification"):
            raise ExportError("only a fine-tuned VQA or classification model becomes an inference model")
        labels = list(hp.labels or [str(i) for i in range(hp.num_outputs)])
        data_card = dict(hp.get("data_card") or {})
        backbone = stage.backbone_config.to_dict()
        backbone["text"]["name_or_path"] = TEXT_FOLDER
        model = cls(
            backbone=backbone,
            task=hp.task,
            labels=labels,
            max_text_length=max_text_length or data_card.get("max_text_length") or default_max_length(hp.task),
            card={**model_card_facts(hp), **dict(card or {})},
            text_dir=Path(stage.backbone_config.text.name_or_path),
        )
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in stage.state_dict().items() if k in own}, strict=True)
        model.tokenizer = load_tokenizer(stage.backbone_config.text.name_or_path)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, card: Mapping[str, Any] | None = None, max_text_length=None):
        """Build from a fine-tuning checkpoint (read with ``weights_only=True``).

        Raises:
            StageError: the file is missing, unreadable, needs full unpickling, or is not a fine-tuning checkpoint
                (each named in one line).
        """
        from umd_lightning.stages.finetune import FineTune

        checkpoint = load_checkpoint_file(path)
        saved_stage = checkpoint.get("umd_stage")
        if saved_stage != "finetune":
            kind = f"a {saved_stage}" if saved_stage else "not a UMD"
            raise StageError(f"{path} is {kind} checkpoint; Predictor needs a finetune one (`umd fit` of FineTune)")
        # The saved hyper-parameters rebuild the model (Lightning's loader, without reading the file again).
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        stage = FineTune(**{**hparams, "pretrained": None})
        stage.load_state_dict(checkpoint["state_dict"], strict=True)
        facts = {"metrics": checkpoint_metrics(checkpoint), "global_step": checkpoint.get("global_step")}
        if "umd_converted_from" in checkpoint:
            facts["converted_from"] = str(checkpoint["umd_converted_from"].get("source"))
        return cls.from_stage(stage, {**facts, **dict(card or {})}, max_text_length)

    # ------------------------------------------------------------------------------------- saving
    def _save_pretrained(self, save_directory: Path) -> None:
        text_dir = save_directory / TEXT_FOLDER
        text_dir.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is None:
            raise ExportError("the model has no tokenizer to save: build it with from_stage / from_pretrained")
        self.tokenizer.save_pretrained(text_dir)
        self.backbone.text.encoder.config.save_pretrained(text_dir)
        # safetensors refuses tensors sharing memory (tied weights): store a copy of each.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        metadata = {
            "format": "pt",
            VOCABULARY_CHECKSUM_KEY: vocabulary_checksum(self.labels),
            "num_labels": str(len(self.labels)),
        }
        save_file(tensors, str(save_directory / WEIGHTS_FILE), metadata=metadata)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        card = super().generate_model_card(*args, **kwargs)
        card.text = model_card_text(self.task, self.labels, self.card, self.backbone_config)
        return card

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a folder (offline) or a hub id (online); a local ``config.json`` that does not parse is named in one
        line (the mixin would raise a bare JSON error before :meth:`_from_pretrained` can check anything)."""
        config_file = Path(str(pretrained_model_name_or_path)) / CONFIG_FILE
        if config_file.is_file():
            try:
                json.loads(config_file.read_text(encoding="utf-8-sig"))
            except (ValueError, RecursionError) as exc:
                reason = str(exc).strip().splitlines()[0][:160]
                raise ExportError(f"{config_file} is not valid JSON ({reason}); export the model again") from None
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> UMDInferenceModel:
        if os.path.isdir(model_id):
            folder = Path(model_id)
        else:
            folder = Path(
                snapshot_download(
                    model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for file in (config_file, weights_file, folder / TEXT_FOLDER):
            if not file.exists():
                raise ExportError(f"{file} is missing: {folder} is not a UMD inference model folder")
        fmt = model_kwargs.get("format")
        if fmt == LEGACY_FORMAT:
            raise ExportError(
                f"{config_file} is an export of the old format {LEGACY_FORMAT}: re-export its checkpoint with "
                "`python -m umd_lightning.export CHECKPOINT FOLDER`"
            )
        if fmt != HUB_FORMAT or not isinstance(model_kwargs.get("labels"), list):
            raise ExportError(f"{config_file} is not a UMD inference model config (format {fmt!r})")
        try:
            with safe_open(str(weights_file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(weights_file), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(f"{weights_file} cannot be read ({str(exc).strip().splitlines()[0]})") from None
        labels = model_kwargs["labels"]
        if metadata.get(VOCABULARY_CHECKSUM_KEY) != vocabulary_checksum(labels):
            raise ExportError(
                f"{config_file}: its {len(labels)} labels do not match the vocabulary checksum stored in "
                f"{WEIGHTS_FILE} ({metadata.get('num_labels', '?')} labels): the answers were edited or reordered"
            )
        model = cls(**{**model_kwargs, "text_dir": folder / TEXT_FOLDER})
        try:
            model.load_state_dict(tensors, strict=strict)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1].strip()
            raise ExportError(f"{weights_file} does not fit {config_file}: {detail}") from None
        model.tokenizer = load_tokenizer(str(folder / TEXT_FOLDER))
        return model.to(map_location).eval()


# ----------------------------------------------------------------------------------------------- model card
def checkpoint_metrics(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """``{monitor: best score}`` of the checkpoint's ``ModelCheckpoint`` callbacks (empty when none monitored)."""
    metrics: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            metrics[str(state["monitor"])] = float(state["best_model_score"])
    return metrics


def model_card_facts(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The model card's facts that a ``FineTune`` module's hyper-parameters hold."""
    data_card = dict(hparams.get("data_card") or {})
    return {
        "dataset": data_card.get("dataset"),
        "vocab": data_card.get("vocab"),
        "validation": data_card.get("validation"),
        "leak_notes": list(hparams.get("leak_notes") or []),
        "seeds": {"seed_everything": data_card.get("seed"), "data_split_seed": data_card.get("data_seed")},
        "stages": ["pretrain (from `pretrained:`)" if hparams.get("pretrained") else "no pre-training", "finetune"],
        "preset": hparams.get("preset"),
    }


def model_card_text(task: str, labels: Sequence[str], facts: Mapping[str, Any], cfg: BackboneConfig) -> str:
    """The model card's Markdown body."""
    leaky = [f"`{key}: {value}`" for key, value in LEAKY_SETTINGS.items() if facts.get(key) == value]
    notes = list(facts.get("leak_notes") or [])
    if leaky or notes:
        leak = (
            "**Leaky evaluation.** "
            + (f"Leaky settings used: {', '.join(leaky)}. " if leaky else "")
            + (f"Notes: {'; '.join(notes)}." if notes else "")
        )
    else:
        leak = (
            "No leaky setting recorded (`vocab: all_splits` and `validation: val_is_test` would let the test set "
            "into the vocabulary or the model selection)."
        )
    metrics = facts.get("metrics") or {}
    metric_lines = "\n".join(f"- `{name}`: {value:.4f}" for name, value in metrics.items()) or "- none recorded"
    seeds = facts.get("seeds") or {}
    return f"""# UMD {task} model

A {task} model of [umd_lightning](https://github.com/helenypzhang/UMD) (UMD: MR-Pretrain, TD-Calib, fine-tuning
with GM-Coord). Load it with `UMDInferenceModel.from_pretrained(...)` or `Predictor.from_export(...)`.

## Training

- Data set: {facts.get("dataset") or "not recorded"}
- Stages run: {", ".join(facts.get("stages") or ["not recorded"])}
- Converted from: {facts.get("converted_from") or "-"}
- Preset: {facts.get("preset") or "-"}; vision `{cfg.vision.arch}`, fusion width {cfg.fusion.width}, \
{cfg.fusion.layers} layers, pooling `{cfg.pooling}`, image size {cfg.image_size}
- Seeds: seed_everything {seeds.get("seed_everything")}, data split {seeds.get("data_split_seed")}

## Vocabulary and validation

- {len(labels)} {"answers" if task == "vqa" else "classes"}; \
vocabulary policy `{facts.get("vocab") or "not recorded"}`, \
validation policy `{facts.get("validation") or "not recorded"}`.
- {leak}

## Metrics

{metric_lines}
"""
