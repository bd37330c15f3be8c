"""Predictions: JSON lines from ``umd predict`` and a small Python API for a fine-tuned checkpoint.

``umd predict --config <finetune yaml> --ckpt_path <checkpoint>`` writes one JSON object per sample to
``predictions.jsonl`` in the run folder (``--predictions.output`` to choose). In Python::

    predictor = Predictor.from_checkpoint("runs/.../best.ckpt")
    predictor.answer("scan.jpg", "is there a pneumothorax?")   # [("no", 0.91), ("yes", 0.07), ...]
    predictor = Predictor.from_export("exported/")   # a save_pretrained / export folder (or hub id): no pickle
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from umd_lightning.errors import check_range

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
        self._label: dict[str, Any] = {}
        self.path: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from umd_lightning.runs import evaluation_leaks

        # A model selected or scored under a leaky policy says so in every row it writes.
        notes = evaluation_leaks(pl_module, trainer.datamodule)
        self._label = {"leaky": True, "leak_notes": notes} if notes else {}
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("w", encoding="utf-8")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for row in outputs or []:
            self._handle.write(json.dumps({**row, **self._label}, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            leaky = f" (LEAKY evaluation: {'; '.join(self._label['leak_notes'])})" if self._label else ""
            print(f"predictions written to {self.path}{leaky}")


class Predictor:
    """Answers questions (VQA) or classifies image-text pairs with a fine-tuned model, one call per image.

    Build it with :meth:`from_checkpoint` or :meth:`from_export`; both carry the tokenizer, the image
    preprocessing and the labels (a :class:`~umd_lightning.hub.UMDInferenceModel`).

    Args:
        model: the inference model.
        max_length: tokens kept per question or caption; ``None``: the model's.
    """

    def __init__(self, model: Any, max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.transform = model.transform
        self.max_length = max_length if max_length is not None else model.max_text_length
        limit = model.backbone.text.max_positions
        if limit is not None:
            check_range("Predictor max_length", self.max_length, low=1, high=limit)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> Predictor:
        """Load a fine-tuning checkpoint with ``torch.load(weights_only=True)``.

        Raises:
            StageError: the file is missing, unreadable, needs full unpickling, or is not a fine-tuning checkpoint
                (each named in one line).
        """
        from umd_lightning.hub import UMDInferenceModel

        return cls(UMDInferenceModel.from_checkpoint(path).to(map_location))

    @classmethod
    def from_export(cls, folder: str | Path, map_location: str = "cpu") -> Predictor:
        """Load a folder written by ``save_pretrained`` / ``python -m umd_lightning.export`` (safetensors and JSON
        only), or a hub id with network access.

        Raises:
            ExportError: a folder of the old export format, a missing or damaged file, or answers that do not
                match the weights (one line naming the file).
        """
        from umd_lightning.hub import UMDInferenceModel

        return cls(UMDInferenceModel.from_pretrained(str(folder), map_location=map_location))

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
        check_range("top_k", top_k, low=1)
        device = next(self.model.parameters()).device
        pixels = self.transform(load_image(image)).unsqueeze(0).to(device)
        tokens = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
        logits = self.model(pixels, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))[0].float()
        probabilities = logits.sigmoid() if self.model.task == "vqa" else logits.softmax(-1)
        top = probabilities.topk(min(top_k, probabilities.shape[-1]))
        return [(self.model.labels[j], float(p)) for p, j in zip(top.values, top.indices)]

    answer = predict

    def explain(self, image: Any, question: str, methods: Sequence[str] = ("rollout", "gradcam"), top_k: int = 5):
        """The answer, its ``top_k`` and per-patch maps of where the model looked (see :mod:`umd_lightning.explain`)."""
        from umd_lightning.explain import explain

        return explain(self.model, image, question, methods=methods, top_k=top_k, max_length=self.max_length)
