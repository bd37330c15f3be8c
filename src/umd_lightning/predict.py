"""The Predictor: a small Python API for a fine-tuned checkpoint or an exported folder.

(``umd predict --config <finetune yaml> --ckpt_path <checkpoint>`` writes one JSON object per sample to
``predictions.jsonl`` in the run folder, ``--predictions.output`` to choose: see
:class:`umd_lightning.callbacks.predictions.JsonlPredictionWriter`.) In Python::

    predictor = Predictor.from_checkpoint("runs/.../best.ckpt")
    predictor.answer("scan.jpg", "is there a pneumothorax?")   # [("no", 0.91), ("yes", 0.07), ...]
    predictor = Predictor.from_export("exported/")   # a save_pretrained / export folder (or hub id): no pickle
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from umd_lightning.data.common import is_visible, load_image
from umd_lightning.errors import check_range
from umd_lightning.hub import UMDInferenceModel
from umd_lightning.stages.tasks.vqa import TOP_ANSWERS


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
        return cls(UMDInferenceModel.from_checkpoint(path).to(map_location))

    @classmethod
    def from_export(cls, folder: str | Path, map_location: str = "cpu") -> Predictor:
        """Load a folder written by ``save_pretrained`` / ``python -m umd_lightning.export`` (safetensors and JSON
        only), or a hub id with network access.

        Raises:
            ExportError: a folder of the old export format, a missing or damaged file, or answers that do not
                match the weights (one line naming the file).
        """
        return cls(UMDInferenceModel.from_pretrained(str(folder), map_location=map_location))

    @torch.no_grad()
    def predict(self, image: str | Path, text: str, top_k: int = TOP_ANSWERS) -> list[tuple[str, float]]:
        """The ``top_k`` answers (or classes) with their probabilities for one image file and a question/caption.

        Raises:
            ValueError: ``text`` is not a string with a visible character (a model answers anything, even nothing).
            DataError: the image is missing or does not decode.
        """
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
