"""Medical VQA: :func:`read_vqa_records` over the publishers' readers (``data/sources/vqa_rad.py``, ``slake.py``,
``vqa_med_2019.py``; DATA.md, "Downstream VQA"), the held-out split, the dataset and the collate.

Each ``*_records`` function reads one layout's annotation files (no image is opened) and returns
``records.Record``s with ``id`` (the question's qid), ``image`` (a path), ``image_id``, ``question``, ``answer``
(normalised), ``answer_type`` (``open`` or ``closed``) and ``split``.

A bad annotation record (empty question, unsafe image path, ...) raises ``DataError`` or, with
``on_error="skip"``, is dropped and counted in a ``ScanReport`` appended to ``reports`` when one is given.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from umd_lightning.data.answers import AnswerVocab
from umd_lightning.data.common import OnError
from umd_lightning.data.datasets import ScannedRecords
from umd_lightning.data.records import Record
from umd_lightning.data.scan import ScanMode, ScanReport
from umd_lightning.data.sources.slake import slake_records
from umd_lightning.data.sources.vqa_med_2019 import vqa_med_2019_m3ae_records, vqa_med_2019_records
from umd_lightning.data.sources.vqa_rad import vqa_rad_preprocessed_records, vqa_rad_records

VQADatasetName = Literal["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"]


log = logging.getLogger(__name__)


def read_vqa_records(
    dataset: VQADatasetName,
    root: str | Path,
    *,
    language: str | None = "en",
    categories: Sequence[str] | None = None,
    on_error: OnError = "raise",
    reports: list[ScanReport] | None = None,
    skip_empty_answers: bool = False,
) -> list[Record]:
    """Read any supported VQA layout by name (``language`` and ``skip_empty_answers`` apply to SLAKE,
    ``categories`` to VQA-Med).

    Raises:
        ValueError: unknown data set name (the message lists the valid ones).
    """
    if dataset == "vqa_rad":
        return vqa_rad_records(root, on_error=on_error, reports=reports)
    if dataset == "vqa_rad_preprocessed":
        return vqa_rad_preprocessed_records(root, on_error=on_error, reports=reports)
    if dataset == "slake":
        return slake_records(
            root, language=language, on_error=on_error, reports=reports, skip_empty_answers=skip_empty_answers
        )
    if dataset == "vqa_med_2019":
        return vqa_med_2019_records(root, categories=categories, on_error=on_error, reports=reports)
    if dataset == "vqa_med_2019_m3ae":
        return vqa_med_2019_m3ae_records(root, categories=categories, on_error=on_error, reports=reports)
    valid = ["vqa_rad", "vqa_rad_preprocessed", "slake", "vqa_med_2019", "vqa_med_2019_m3ae"]
    raise ValueError(f"unknown VQA data set {dataset!r}: choose one of {valid}")


def holdout_by_image(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into (train, val) by image: a seeded ``fraction`` of the distinct images, with all their
    questions, goes to val, so no image is in both.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than two distinct images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    images = sorted({record.image_id for record in records})
    if len(images) < 2:
        raise ValueError(f"cannot hold out images for validation from {len(images)} distinct image(s)")
    random.Random(seed).shuffle(images)
    count = min(len(images) - 1, max(1, round(fraction * len(images))))
    held = set(images[:count])
    train = [record for record in records if record.image_id not in held]
    val = [record for record in records if record.image_id in held]
    return train, val


class VQADataset(ScannedRecords):
    """VQA samples from records; the images are scanned at construction.

    Args:
        records: records from a ``*_records`` function.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
        answer_vocab: the label space; an answer outside it gets ``answer_index = -1`` (counted as wrong).
        name: name in the scan report.
        on_error: ``raise`` fails on the first bad image, ``skip`` drops and counts its questions; an image
            that stops decoding after the scan raises ``DataError`` from ``__getitem__`` (``raise``) or gives a
            ``None`` sample that the collate drops (``skip``).
        scan: how much of each image the set-up scan reads (each distinct image once).

    Samples: ``{"image": (3, H, W) tensor, "question": str, "answer": str, "answer_index": int,
    "is_closed": bool, "qid": str, "image_id": str, "question_types": tuple[str, ...]}``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Any], torch.Tensor],
        answer_vocab: AnswerVocab,
        *,
        name: str = "vqa",
        on_error: OnError = "raise",
        scan: ScanMode = "full",
        progress: bool = True,
    ) -> None:
        super().__init__(records, transform, name=name, on_error=on_error, scan=scan, progress=progress)
        self.answer_vocab = answer_vocab

    @property
    def num_out_of_vocabulary(self) -> int:
        """Questions whose answer is not in the vocabulary (always scored wrong)."""
        return sum(self.answer_vocab.index(record.answer) is None for record in self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = self._load_image(record)
        if image is None:
            return None
        answer_index = self.answer_vocab.index(record.answer)
        return {
            "image": self.transform(image),
            "question": record.question,
            "answer": record.answer,
            "answer_index": -1 if answer_index is None else answer_index,
            "is_closed": record.answer_type == "closed",
            "qid": record.id,
            "image_id": record.image_id,
            "question_types": record.question_types,
        }


class VQACollator:
    """Batch VQA samples: tokenise the questions, build one-hot answer targets.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: question length in tokens (longer questions are truncated).
        num_answers: size ``A`` of the answer vocabulary.

    Returns (from ``__call__``): ``pixel_values (B, 3, H, W)``, ``input_ids (B, L)``, ``attention_mask (B,
    L)``, ``targets (B, A)`` float one-hot (an all-zero row for an answer outside the vocabulary),
    ``answer_index (B,)`` long (-1 outside), ``is_closed (B,)`` bool, ``qids``, ``questions``, ``answers``
    (lists of str), ``question_types`` (a tuple of str per question). ``None`` samples are dropped; a batch of
    nothing but ``None`` samples gives ``None`` (the training step skips it).
    """

    def __init__(self, tokenizer: Any, max_length: int = 32, *, num_answers: int) -> None:
        if num_answers < 1:
            raise ValueError(f"num_answers must be positive, got {num_answers}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_answers = num_answers

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        if not samples:
            raise ValueError("VQACollator got an empty batch")
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        questions = [sample["question"] for sample in samples]
        tokens = self.tokenizer(
            questions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        answer_index = torch.tensor([sample["answer_index"] for sample in samples], dtype=torch.long)
        if int(answer_index.max()) >= self.num_answers:
            raise ValueError(f"answer index {int(answer_index.max())} >= num_answers {self.num_answers}")
        targets = torch.zeros(len(samples), self.num_answers)
        inside = answer_index >= 0
        targets[inside.nonzero().squeeze(1), answer_index[inside]] = 1.0
        return {
            "pixel_values": torch.stack([sample["image"] for sample in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "targets": targets,
            "answer_index": answer_index,
            "is_closed": torch.tensor([sample["is_closed"] for sample in samples], dtype=torch.bool),
            "qids": [sample["qid"] for sample in samples],
            "questions": questions,
            "answers": [sample["answer"] for sample in samples],
            "question_types": [sample["question_types"] for sample in samples],
        }
