"""Predictions: JSON lines from ``umd predict`` and a small Python API for a fine-tuned checkpoint.

``umd predict --config <finetune yaml> --ckpt_path <checkpoint>`` writes one JSON object per sample to
``predictions.jsonl`` in the run folder (``--predictions.output`` to choose). In Python::

    predictor = Predictor.from_checkpoint("runs/.../best.ckpt")
    predictor.answer("scan.jpg", "is there a pneumothorax?")   # [("no", 0.91), ("yes", 0.07), ...]
    predictor = Predictor.from_export("exported/")   # a `python -m umd_lightning.export` folder: no pickle
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

TOP_ANSWERS = 5
TOP_CAPTIONS = 10


def describe_predictions(
    task: str, logits: Tensor, batch: dict[str, Any], labels: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Turn a batch of task outputs into one JSON-ready dict per sample.

    - ``vqa``: ``{"qid", "question", "answer", "top5": [[answer, probability], ...]}`` (sigmoid probabilities, as the
      head is trained with a per-answer BCE).
    - ``classification``: ``{"id", "label", "probabilities": {class: p}}`` (softmax).
    - ``retrieval``: ``{"image_index", "top10": [[caption id, score], ...]}``; ``labels`` are the caption ids.
    """
    logits = logits.detach().float().cpu()
    names = list(labels) if labels is not None else [str(i) for i in range(logits.shape[-1])]
    rows: list[dict[str, Any]] = []
    if task == "vqa":
        probabilities = logits.sigmoid()
        top = probabilities.topk(min(TOP_ANSWERS, probabilities.shape[-1]), dim=-1)
        for i in range(logits.shape[0]):
            pairs = [[names[j], round(float(p), 6)] for p, j in zip(top.values[i], top.indices[i])]
            rows.append(
                {
                    "qid": batch["qids"][i],
                    "question": batch["questions"][i],
                    "answer": pairs[0][0],
                    "top5": pairs,
                }
            )
    elif task == "classification":
        probabilities = logits.softmax(-1)
        for i in range(logits.shape[0]):
            rows.append(
                {
                    "id": batch["ids"][i],
                    "label": names[int(probabilities[i].argmax())],
                    "probabilities": {name: round(float(p), 6) for name, p in zip(names, probabilities[i])},
                }
            )
    elif task == "retrieval":
        top = logits.topk(min(TOP_CAPTIONS, logits.shape[-1]), dim=-1)
        for i in range(logits.shape[0]):
            rows.append(
                {
                    "image_index": int(batch["image_index"][i]),
                    "top10": [[names[j], round(float(s), 6)] for s, j in zip(top.values[i], top.indices[i])],
                }
            )
    else:
        raise ValueError(f"unknown task {task!r}")
    return rows


class JsonlPredictionWriter(Callback):
    """Writes what ``predict_step`` returns as JSON lines, one file per process (rank suffix under DDP).

    Args:
        output: the file to write; default ``predictions.jsonl`` in the trainer's log folder.
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self._handle = None
        self.path: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("w", encoding="utf-8")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for row in outputs or []:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            print(f"predictions written to {self.path}")


class Predictor:
    """Answers questions (VQA) or classifies image-text pairs with a fine-tuned model, one call per image.

    Build it with :meth:`from_checkpoint` or :meth:`from_export`; both carry the preset, tokenizer, image size and
    labels.

    Args:
        model: a fine-tuned ``FineTune`` module (VQA or classification).
        max_length: tokens kept per question or caption; ``None``: 32 for VQA, else 128.
    """

    def __init__(self, model: LightningModule, max_length: int | None = None) -> None:
        from umd_lightning.data.transforms import image_transform
        from umd_lightning.export import default_max_length
        from umd_lightning.models.text import load_tokenizer

        self.model = model.eval()
        hp = model.hparams
        if hp.task == "retrieval":
            raise ValueError("Predictor answers VQA and classification models; use `umd predict` for retrieval")
        self.tokenizer = load_tokenizer(model.backbone_config.text.name_or_path)
        self.transform = image_transform(model.backbone_config.image_size, train=False)
        self.max_length = max_length if max_length is not None else default_max_length(hp.task)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> Predictor:
        """Load a fine-tuning checkpoint with ``torch.load(weights_only=True)``.

        Raises:
            StageError: the file is missing, unreadable, needs full unpickling, or is not a fine-tuning checkpoint
                (each named in one line).
        """
        from umd_lightning.stages.base import StageError, load_checkpoint_file
        from umd_lightning.stages.finetune import FineTune

        checkpoint = load_checkpoint_file(path)
        stage = checkpoint.get("umd_stage")
        if stage != "finetune":
            kind = f"a {stage}" if stage else "not a UMD"
            raise StageError(f"{path} is {kind} checkpoint; Predictor needs a finetune one (`umd fit` of FineTune)")
        # The saved hyper-parameters rebuild the model (Lightning's loader, without reading the file again).
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        model = FineTune(**{**hparams, "pretrained": None})
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return cls(model.to(map_location))

    @classmethod
    def from_export(cls, out_dir: str | Path, map_location: str = "cpu") -> Predictor:
        """Load a folder written by :func:`umd_lightning.export.export_model` (safetensors and JSON only).

        Raises:
            ValueError: the export is not of a fine-tuned model, or one of its files is truncated, broken or does
                not fit the other (the file is named; see :func:`umd_lightning.export.read_export_config`).
        """
        from safetensors.torch import load_file

        from umd_lightning.export import CONFIG_FILE, TEXT_FOLDER, WEIGHTS_FILE, read_export_config
        from umd_lightning.stages.finetune import FineTune

        folder = Path(out_dir)
        config = read_export_config(folder)
        if config.get("stage") != "finetune":
            raise ValueError(f"{folder} holds a {config.get('stage')} model; Predictor needs a fine-tuned one")
        try:
            backbone = config["backbone"]
            backbone["text"]["name_or_path"] = str(folder / TEXT_FOLDER)
            # Every field of the saved backbone config overrides the preset's, so the architecture is the saved one.
            overrides = {
                f"{section}.{key}": value
                for section in ("vision", "text", "fusion", "decoder")
                for key, value in backbone[section].items()
            }
            overrides["image_size"] = backbone["image_size"]
            task, num_outputs, labels = config["task"], config["num_outputs"], config["labels"]
            max_length = config["max_text_length"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{folder / CONFIG_FILE} lacks or mangles field {exc}; export the model again") from exc
        model = FineTune(
            preset=config.get("preset") or "tiny",
            backbone_overrides=overrides,
            task=task,
            num_outputs=num_outputs,
            labels=labels,
            leak_notes=config.get("leak_notes"),
        )
        weights = load_file(str(folder / WEIGHTS_FILE), device=str(map_location))
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{folder / WEIGHTS_FILE} does not fit {folder / CONFIG_FILE}: {first}") from exc
        return cls(model.to(map_location), max_length=max_length)

    @torch.no_grad()
    def predict(self, image: str | Path, text: str, top_k: int = TOP_ANSWERS) -> list[tuple[str, float]]:
        """The ``top_k`` answers (or classes) with their probabilities for one image file and a question/caption.

        Raises:
            ValueError: ``text`` is not a string with a visible character (a model answers anything, even nothing).
            DataError: the image is missing or does not decode.
        """
        from umd_lightning.data.common import is_visible, load_image

        if not isinstance(text, str) or not is_visible(text):
            raise ValueError(f"the question/text is empty ({text!r}): give the question to answer")
        pixels = self.transform(load_image(image)).unsqueeze(0).to(self.model.device)
        tokens = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
        logits = self.model(
            pixels, tokens["input_ids"].to(self.model.device), tokens["attention_mask"].to(self.model.device)
        )[0].float()
        probabilities = logits.sigmoid() if self.model.hparams.task == "vqa" else logits.softmax(-1)
        labels = self.model.hparams.labels or [str(i) for i in range(logits.shape[-1])]
        top = probabilities.topk(min(top_k, probabilities.shape[-1]))
        return [(labels[j], float(p)) for p, j in zip(top.values, top.indices)]

    answer = predict
